"""Golden costs: real-shaped provider bodies and streams (tests/fixtures/gateway/costs)
go through the real adapter → Usage → cost_usd and must match the hand-computed cost
(each fixture's ``why`` shows the arithmetic) within 1e-6 USD — in fact to 1e-12."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragplane.config import ModelSettings
from ragplane.gateway.pricing import COST_DECIMALS, cost_usd
from ragplane.gateway.providers import (
    AnthropicToAnthropic,
    AnthropicToOpenAI,
    EmbeddingsToOpenAI,
    OpenAIToAnthropic,
    OpenAIToOpenAI,
)
from ragplane.gateway.types import ChatAdapter, Usage
from tests.unit.adapter_support import make_route, run_stream

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures" / "gateway" / "costs").glob("*.json"))
ADAPTERS: dict[str, ChatAdapter] = {
    "openai_openai": OpenAIToOpenAI(),
    "openai_anthropic": OpenAIToAnthropic(),
    "anthropic_anthropic": AnthropicToAnthropic(),
    "anthropic_openai": AnthropicToOpenAI(),
    "embeddings_openai": EmbeddingsToOpenAI(),
}


def test_there_are_at_least_twenty_golden_fixtures_covering_each_case() -> None:
    cases = [json.loads(path.read_text()) for path in FIXTURES]
    assert len(cases) >= 20
    assert {c["adapter"] for c in cases} == set(ADAPTERS)
    assert {c["stream"] for c in cases if c["adapter"] != "embeddings_openai"} == {True, False}
    usages = [c["expected_usage"] for c in cases]
    assert any(u.get("cache_read_tokens") for u in usages)
    assert any(u.get("cache_write_tokens") for u in usages)
    assert any(u.get("reasoning_tokens") for u in usages)
    assert all(c["why"] for c in cases)


def usage_of(case: dict[str, Any]) -> Usage:
    adapter = ADAPTERS[case["adapter"]]
    prices = {k: v for k, v in case["model"].items() if k != "upstream"}
    provider = "anthropic" if adapter.upstream_api == "anthropic" else "openai"
    route = make_route(provider, upstream=case["model"]["upstream"], prices=prices)
    if not case["stream"]:
        return adapter.parse_response(json.dumps(case["response"]).encode(), route)[1]
    translator = adapter.stream_translator(route, include_usage=False)
    run_stream(translator, ("\n".join(case["sse"]) + "\n").encode(), split=13)
    assert translator.finished
    assert translator.usage is not None
    return translator.usage


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_golden_cost(path: Path) -> None:
    case = json.loads(path.read_text())
    usage = usage_of(case)
    assert usage == Usage(**case["expected_usage"])
    model = ModelSettings(provider="p", **case["model"])
    cost = cost_usd(usage, model)
    assert abs(cost - case["expected_cost_usd"]) < 1e-6
    assert cost == pytest.approx(case["expected_cost_usd"], rel=0, abs=1e-12)


PRICES = ModelSettings(
    provider="p",
    upstream="m",
    input_per_mtok=0.15,
    output_per_mtok=0.6,
    cache_read_per_mtok=0.075,
    cache_write_per_mtok=0.1875,
)


def test_reasoning_tokens_are_not_billed_twice() -> None:
    plain = cost_usd(Usage(input_tokens=10, output_tokens=100), PRICES)
    assert cost_usd(Usage(input_tokens=10, output_tokens=100, reasoning_tokens=90), PRICES) == plain


def test_each_price_applies_to_its_own_tokens() -> None:
    assert cost_usd(Usage(), PRICES) == 0.0
    assert cost_usd(Usage(input_tokens=1_000_000), PRICES) == 0.15
    assert cost_usd(Usage(output_tokens=1_000_000), PRICES) == 0.6
    assert cost_usd(Usage(cache_read_tokens=1_000_000), PRICES) == 0.075
    assert cost_usd(Usage(cache_write_tokens=1_000_000), PRICES) == 0.1875


def test_binary_noise_is_rounded_away() -> None:
    # 0.1 + 0.2 style noise: 3 x $0.1 is 0.30000000000000004 in floats
    model = ModelSettings(provider="p", upstream="m", input_per_mtok=0.1)
    assert cost_usd(Usage(input_tokens=3), model) == 3e-7
    assert COST_DECIMALS == 10
    assert cost_usd(Usage(input_tokens=1), model) == round(1e-7, COST_DECIMALS)
