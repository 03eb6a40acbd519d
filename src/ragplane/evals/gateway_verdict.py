"""The gateway benchmark's targets (issue 4), checked against a report.

- ``cpu``: ragplane's CPU time per request <= 1.0 ms at every concurrency;
- ``added_latency``: ragplane's added p50 and p99 <= 2 x the floor's + 1 ms at every
  concurrency;
- ``vs_litellm``: at the highest concurrency, LiteLLM's added p99 >= 20 x ragplane's;
- ``rss_growth``: ragplane's RSS grows <= 5 % over the soak after warm-up.

A target whose inputs were not measured (a target skipped) has ``met: null``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["assess"]

CPU_MS_PER_REQ = 1.0
LITELLM_FACTOR = 20.0
RSS_GROWTH_PCT = 5.0


def _per_c(report: dict[str, Any], target: str) -> dict[str, Any] | None:
    entry = report.get(target)
    if not isinstance(entry, dict) or entry.get("skipped"):
        return None
    per_c = entry.get("concurrency")
    return per_c if isinstance(per_c, dict) else None


def assess(report: dict[str, Any], concurrencies: tuple[int, ...]) -> list[dict[str, Any]]:
    """One entry per target: ``name``, ``goal``, ``measured`` (text) and ``met``."""
    ours, floor, litellm = (_per_c(report, t) for t in ("ragplane", "floor", "litellm"))
    out: list[dict[str, Any]] = []
    if ours is None:
        return out
    cs = [str(c) for c in concurrencies]
    cpu = {c: ours[c]["cpu_ms_per_req"] for c in cs}
    out.append(
        {
            "name": "cpu",
            "goal": f"CPU per request <= {CPU_MS_PER_REQ} ms",
            "measured": ", ".join(f"c={c}: {v:.3f} ms" for c, v in cpu.items()),
            "met": all(v <= CPU_MS_PER_REQ for v in cpu.values()),
        }
    )
    if floor is not None:
        parts, met = [], True
        for c in cs:
            for q in ("p50", "p99"):
                key = f"added_{q}_ms"
                limit = 2 * max(floor[c][key], 0.0) + 1.0
                met = met and ours[c][key] <= limit
                parts.append(f"c={c} {q}: {ours[c][key]:.2f} <= {limit:.2f}")
        out.append(
            {
                "name": "added_latency",
                "goal": "added p50 and p99 <= 2 x floor's + 1 ms, every concurrency",
                "measured": "; ".join(parts),
                "met": met,
            }
        )
    top = str(max(concurrencies))
    if litellm is not None:
        theirs, mine = litellm[top]["added_p99_ms"], ours[top]["added_p99_ms"]
        ratio = theirs / mine if mine > 0 else float("inf")
        out.append(
            {
                "name": "vs_litellm",
                "goal": f"at c={top}: LiteLLM's added p99 >= {LITELLM_FACTOR:g} x ragplane's",
                "measured": f"{theirs:.2f} ms vs {mine:.2f} ms: {ratio:.1f}x",
                "met": ratio >= LITELLM_FACTOR,
            }
        )
    else:
        out.append(
            {
                "name": "vs_litellm",
                "goal": f"at c={top}: LiteLLM's added p99 >= {LITELLM_FACTOR:g} x ragplane's",
                "measured": "LiteLLM skipped",
                "met": None,
            }
        )
    growth = report["ragplane"]["rss"]["growth_pct"]
    out.append(
        {
            "name": "rss_growth",
            "goal": f"RSS growth after warm-up <= {RSS_GROWTH_PCT:g} %",
            "measured": f"{growth:.2f} % over {report['ragplane']['rss']['soak_requests']:,} "
            "requests",
            "met": growth <= RSS_GROWTH_PCT,
        }
    )
    return out
