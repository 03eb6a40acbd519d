"""The cost of one call in USD, from the model's price table (USD per 1M tokens)::

    cost = (input x input_per_mtok + output x output_per_mtok
            + cache_read x cache_read_per_mtok + cache_write x cache_write_per_mtok) / 1e6

``Usage.input_tokens`` already excludes cached input (see ``Usage``); reasoning tokens
are inside ``output_tokens`` and are not added again.

Rounding: the four products are summed exactly (``math.fsum``), divided by 1e6 and
rounded to 10 decimal places (1e-10 USD). Binary floating point cannot hold most
prices exactly (0.15 is 0.1499999999999999944...), so the rounding removes that noise:
the result equals the decimal arithmetic to within 1e-10, far below the 1e-6 the
ledger promises and far below the cheapest token (1e-9 USD at $0.001 per 1M).
"""

from __future__ import annotations

import math

from ragplane.config import ModelSettings
from ragplane.gateway.types import Usage

__all__ = ["COST_DECIMALS", "cost_usd"]

COST_DECIMALS = 10


def cost_usd(usage: Usage, model: ModelSettings) -> float:
    total = math.fsum(
        (
            usage.input_tokens * model.input_per_mtok,
            usage.output_tokens * model.output_per_mtok,
            usage.cache_read_tokens * model.cache_read_per_mtok,
            usage.cache_write_tokens * model.cache_write_per_mtok,
        )
    )
    return round(total / 1e6, COST_DECIMALS)
