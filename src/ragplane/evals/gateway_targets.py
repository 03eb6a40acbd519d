"""The processes of the gateway benchmark, and what they cost the machine.

Every target runs as its own process (tree) on loopback, started here and stopped
here: the mock provider (the upstream every target forwards to, and the ``direct``
target itself), the aiohttp floor (:mod:`ragplane.evals.floor_proxy`), ``ragplane
serve gateway`` and the LiteLLM proxy from its own virtual environment. Each writes
its output to a log file; readiness is a line in that log or an HTTP probe.

CPU time and RSS come from ``/proc``: each thread's time on a CPU (``schedstat``, in
nanoseconds; the clock-tick ``utime + stime`` is too coarse for a few hundred requests),
compared thread by thread between two snapshots, and ``rss``, of the process and all its
descendants (LiteLLM's workers are children of its master), summed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ragplane.errors import RagplaneError

__all__ = [
    "CpuSnapshot",
    "TargetProcess",
    "cpu_between",
    "free_port",
    "start_process",
    "tree_cpu",
    "tree_pids",
    "tree_rss_mb",
    "wait_http",
    "wait_log_url",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_URL = re.compile(r"listening on (http://[^\s]+)")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


CpuSnapshot = dict[tuple[int, str], float]


def tree_cpu(root: int) -> CpuSnapshot:
    """CPU seconds so far of every thread of the live process tree under ``root``: time
    on a CPU from ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``utime + stime``
    of ``/proc/<pid>/stat`` counts 10 ms ticks, too coarse for a short run)."""
    snap: CpuSnapshot = {}
    for pid in tree_pids(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process ended meanwhile
        for tid in tids:
            try:
                raw = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            except OSError:
                continue
            snap[(pid, tid)] = int(raw.split()[0]) / 1e9
    return snap


def cpu_between(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPU seconds spent between two snapshots by the threads alive at the second (a
    thread that ended in between is not counted; one that started is, whole)."""
    return sum(t - before.get(key, 0.0) for key, t in after.items())


def tree_rss_mb(root: int) -> float:
    """Resident set size of the process tree under ``root``, summed, in MiB."""
    pages = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            pages += int(fields[21])
    return pages * _PAGE / 2**20


@dataclass
class TargetProcess:
    """One started process (tree): its root pid, base URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        return tree_pids(self.pid)

    def cpu(self) -> CpuSnapshot:
        return tree_cpu(self.pid)

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RagplaneError(
                f"{self.name} exited with {self.proc.returncode}; its log:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL of its process group if it does not end in time."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its tree
            self.proc.wait(5)


def start_process(
    name: str, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None
) -> TargetProcess:
    """Start ``argv`` in its own session with stdout and stderr to ``log``."""
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: S603 (argv built by the bench)
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    return TargetProcess(name, proc, log)


def _wait(target: TargetProcess, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        target.check_alive()
        if ready():
            return
        time.sleep(0.1)
    target.stop()
    raise RagplaneError(f"{target.name} did not {what} within {timeout_s:.0f} s:\n{target.tail()}")


def wait_log_url(target: TargetProcess, timeout_s: float = 60.0) -> str:
    """Wait for ``listening on http://…`` in the log; the URL becomes ``target.url``."""
    found: list[str] = []

    def ready() -> bool:
        match = _URL.search(target.log.read_text(errors="replace"))
        if match:
            found.append(match.group(1))
        return bool(found)

    _wait(target, ready, timeout_s, "print its URL")
    target.url = found[0].rstrip("/")
    return target.url


def wait_http(target: TargetProcess, url: str, timeout_s: float = 60.0) -> None:
    """Wait until ``GET url`` answers 200."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback URL)
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    _wait(target, ready, timeout_s, f"answer GET {url}")
