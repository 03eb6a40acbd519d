"""Spill files of the ledger sink: ledger rows as JSON lines, on local disk.

A spill file is written by one live sink, which holds an exclusive ``flock`` on it
for as long as it has it open; another sink (another process on the same data
directory, or a later start) claims a file only when that lock is free, i.e. when
the sink that wrote it is gone or closed it. Each append is whole lines in one
``write`` loop on an unbuffered descriptor: a row that was appended survives a crash
of the process (not of the machine: there is no fsync per row).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from ragplane.data.ledger_store import LedgerRow, new_row_id

__all__ = ["SPILL_GLOB", "SpillFile", "dumps_row", "loads_row"]

SPILL_GLOB = "spill-*.jsonl"


def dumps_row(row: LedgerRow) -> bytes:
    """One JSON line (``extra`` values JSON cannot hold are written as strings)."""
    return orjson.dumps(row, default=str) + b"\n"


def loads_row(line: bytes) -> LedgerRow:
    """The row of one line; ValueError, TypeError or KeyError if it is not one."""
    d: dict[str, Any] = orjson.loads(line)
    d["id"] = uuid.UUID(d["id"])
    d["created_at"] = datetime.fromisoformat(d["created_at"])
    return LedgerRow(**d)


class SpillFile:
    """One spill file this process holds the lock of."""

    def __init__(self, path: Path, handle: IO[bytes], rows: int) -> None:
        self.path = path
        self.handle = handle
        self.rows = rows  # complete lines in the file
        self.done_offset = 0  # bytes whose rows are committed (this process's view)

    @classmethod
    def create(cls, directory: Path) -> SpillFile:
        """A new, empty, locked file (time-ordered name: replayed oldest first)."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"spill-{new_row_id().hex}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it
        return cls(path, os.fdopen(fd, "ab", buffering=0), 0)

    @classmethod
    def claim(cls, path: Path) -> SpillFile | None:
        """Open and lock an existing file; None when a live sink holds it (or it is gone)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():  # replayed and removed by its owner just before we locked
            os.close(fd)
            return None
        with path.open("rb") as f:
            rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return cls(path, os.fdopen(fd, "ab", buffering=0), rows)

    def append(self, rows: list[LedgerRow]) -> None:
        view = memoryview(b"".join(dumps_row(r) for r in rows))
        while view:  # a raw write may take less than all of it
            view = view[self.handle.write(view) :]
        self.rows += len(rows)

    def read_from(self, offset: int, max_lines: int) -> tuple[list[bytes], int]:
        """Up to ``max_lines`` lines from byte ``offset``, and the offset after them."""
        with self.path.open("rb") as f:
            f.seek(offset)
            lines = [line for _ in range(max_lines) if (line := f.readline())]
            return lines, f.tell()

    def close(self) -> None:
        """Release the lock; the file stays for whoever starts next."""
        self.handle.close()

    def remove(self) -> None:
        """Delete the file (all its rows are committed), then release the lock."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.handle.close()
