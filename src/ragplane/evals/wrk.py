"""Load for the gateway benchmark: ``wrk`` for requests, an aiohttp client for streams.

``run_wrk`` writes a Lua script that POSTs one JSON body with the given headers on
every request and, in ``done()``, prints one line ``WRK_JSON {…}``: requests, duration,
error counts (connect, read, write, timeout, non-2xx status) and latency percentiles
in microseconds from wrk's own histogram. The bench parses that line, never wrk's
human-readable summary. wrk runs with one thread (``-c`` keep-alive connections).

``measure_ttft`` times streams, which wrk cannot: ``concurrency`` tasks each send
streaming requests back to back for ``duration_s`` and record the time from sending
the request to the first ``data:`` line (the first token), then read the stream to
its end.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from ragplane.errors import RagplaneError

__all__ = ["WrkFigures", "measure_ttft", "run_wrk", "wrk_version"]

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class WrkFigures:
    requests: int
    duration_s: float
    errors: int  # connect + read + write + timeouts + non-2xx answers
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def _wrk() -> str:
    exe = shutil.which("wrk")
    if exe is None:
        raise RagplaneError("the gateway bench needs wrk: apt-get install wrk")
    return exe


def wrk_version() -> str:
    done = subprocess.run([_wrk(), "-v"], capture_output=True, text=True, check=False)  # noqa: S603
    first = (done.stdout or done.stderr).splitlines()
    return " ".join(first[0].split()[:2]) if first else "wrk"


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    script: Path,
    *,
    concurrency: int,
    duration_s: int,
    timeout_s: int = 10,
) -> WrkFigures:
    """One wrk run: ``concurrency`` connections for ``duration_s`` whole seconds."""
    lines = [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append('wrk.headers["Content-Type"] = "application/json"')
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body may not contain ']==]'")
    script.write_text(_LUA.format(body=text, headers="\n".join(lines)))
    argv = [_wrk(), "-t1", f"-c{concurrency}", f"-d{max(1, duration_s)}s"]
    argv += [f"--timeout={timeout_s}s", "-s", str(script), url]
    done = subprocess.run(  # noqa: S603 (argv built here)
        argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 60, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            f = orjson.loads(line[len("WRK_JSON ") :])
            break
    else:
        raise RagplaneError(f"wrk failed (exit {done.returncode}): {done.stderr or done.stdout}")
    errors = sum(
        f[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkFigures(
        requests=int(f["requests"]),
        duration_s=f["duration_us"] / 1e6,
        errors=int(errors),
        p50_ms=f["p50_us"] / 1000,
        p90_ms=f["p90_us"] / 1000,
        p99_ms=f["p99_us"] / 1000,
        max_ms=f["max_us"] / 1000,
    )


async def measure_ttft(
    url: str, headers: Mapping[str, str], body: bytes, *, concurrency: int, duration_s: float
) -> tuple[list[float], int]:
    """Times to first token in ms of the streams that produced one, and the failures."""
    samples: list[float] = []
    errors = 0
    sent = dict(headers) | {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        stop_at = time.perf_counter() + duration_s

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            first: float | None = None
            async with session.post(url, data=body, headers=sent) as r:
                async for line in r.content:
                    if first is None and line.startswith(b"data:") and b"[DONE]" not in line:
                        first = time.perf_counter() - started
            if r.status == 200 and first is not None:
                samples.append(1000 * first)
            else:
                errors += 1

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                try:
                    await one()
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, errors
