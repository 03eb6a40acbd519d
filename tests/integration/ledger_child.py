"""A process that records LLM calls until it is told to stop (for test_ledger.py).

Usage: ``python ledger_child.py DATABASE_URL SPILL_DIR TENANT``. It submits ledger
entries in a loop and prints each entry's request id on stdout once ``submit``
returned. SIGTERM makes it stop the sink (which drains the queue and the spill files)
and exit 0, with its counters as one JSON line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from ragplane.config import LedgerSettings
from ragplane.data import Database
from ragplane.gateway.ledger import LedgerSink
from ragplane.gateway.types import LedgerEntry, Usage
from ragplane.observe.logging import configure_logging

__all__: list[str] = []


async def main(url: str, spill_dir: Path, tenant: str) -> None:
    configure_logging("warning")  # logs to stderr: stdout carries only request ids
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Database(url, max_size=2, name="ledger-child") as db:
        # a small queue and a slow cadence: bursts overflow into the spill file
        sink = LedgerSink(
            db, LedgerSettings(queue_size=16, batch_size=8, flush_interval_s=0.05), spill_dir
        )
        await sink.start()
        n = 0
        while not stop.is_set():
            request_id = f"child-{n:06d}"
            sink.submit(
                LedgerEntry(
                    request_id=request_id,
                    tenant_id=tenant,
                    alias="support-quality",
                    route="support-quality/extractive",
                    provider="local",
                    model="local-extractive",
                    api="openai",
                    stream=n % 2 == 0,
                    status="ok",
                    http_status=200,
                    attempts=1,
                    usage=Usage(input_tokens=n, output_tokens=1),
                    cost_usd=0.0,
                    latency_ms=1.0,
                    ttft_ms=None,
                )
            )
            print(request_id, flush=True)
            n += 1
            await asyncio.sleep(0.002 if n % 25 == 0 else 0)
        await sink.stop(timeout_s=60)
        counters = {
            k: getattr(sink, k)
            for k in ("submitted", "written", "overflowed", "spilled_pending", "lost", "rejected")
        }
        print(json.dumps(counters), file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
