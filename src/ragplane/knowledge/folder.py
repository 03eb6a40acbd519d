"""Ingesting files from disk in-process (``ragplane ingest PATH``).

A folder is walked recursively for files with a supported extension (hidden files and
folders are skipped); a single file is taken whatever its extension. Each file's source
URI is its absolute ``file://`` URI, so the same folder re-ingested from anywhere keys
the same documents. Files are read and parsed in a thread, one at a time, and streamed
into the :class:`~ragplane.knowledge.ingest.Ingestor`; a file that cannot be read or
parsed becomes a per-document error and the batch goes on.

With ``prune``, documents under the path whose files are gone are deleted -- unless a
file failed to parse, because then its earlier version would be taken for gone; the
prune is skipped and :attr:`FolderReport.prune_skipped` says so.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread

from ragplane.control.namespaces import NamespaceConfig
from ragplane.knowledge.ingest import DocumentError, Ingestor, IngestProgress, IngestReport
from ragplane.knowledge.parsers import DEFAULT_MAX_BYTES, MEDIA_TYPES, parse_many
from ragplane.knowledge.types import ParsedDocument

__all__ = [
    "FolderProgress",
    "FolderReport",
    "collect_files",
    "ingest_files",
    "prune_prefix",
    "source_uri",
]


def source_uri(path: Path) -> str:
    return path.resolve().as_uri()


def prune_prefix(path: Path) -> str:
    """The source-URI prefix of every document that came from ``path``."""
    root = source_uri(path)
    return root + "/" if path.is_dir() else root


def collect_files(path: Path) -> tuple[list[Path], int]:
    """(files to ingest, how many files were skipped for their extension), sorted."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        return [path], 0
    files: list[Path] = []
    skipped = 0
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix.lower() in MEDIA_TYPES:
            files.append(p)
        else:
            skipped += 1
    return files, skipped


@dataclass(frozen=True)
class FolderProgress:
    files_done: int
    files_total: int
    documents: int
    errors: int
    chunks_written: int
    tokens_embedded: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class FolderReport:
    files: int
    ingest: IngestReport
    errors: list[DocumentError] = field(default_factory=list)
    prune_skipped: bool = False

    @property
    def failed(self) -> bool:
        return bool(self.errors)


def _read_and_parse(
    path: Path, uri: str, max_bytes: int
) -> tuple[tuple[ParsedDocument, ...], list[DocumentError]]:
    try:
        size = path.stat().st_size
        if size > max_bytes:  # do not read a file only to refuse it
            return (), [
                DocumentError(
                    uri, "too_large", f"{size} bytes exceeds the limit of {max_bytes} bytes"
                )
            ]
        data = path.read_bytes()
    except OSError as exc:
        return (), [DocumentError(uri, "unreadable", f"cannot read the file: {exc.strerror}")]
    result = parse_many(uri, data, max_bytes=max_bytes)
    return result.documents, [
        DocumentError(e.source_uri or uri, e.code, e.message) for e in result.errors
    ]


async def ingest_files(
    ingestor: Ingestor,
    config: NamespaceConfig,
    files: list[Path],
    *,
    prune: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    on_progress: Callable[[FolderProgress], None] | None = None,
) -> FolderReport:
    """Ingest ``files`` (see :func:`collect_files`); failures are per-document errors in the
    report. ``prune``: a :func:`prune_prefix` under which documents not among ``files`` are
    deleted."""
    started = time.perf_counter()
    file_errors: list[DocumentError] = []
    failed_files = 0
    # the number of documents yielded once each file was parsed: a file is done when
    # the ingestor has committed that many documents
    yielded_after: list[int] = []
    yielded = 0
    last = IngestProgress(0, 0, 0, 0.0)

    def report(p: IngestProgress) -> None:
        nonlocal last
        last = p
        if on_progress is not None:
            done = sum(1 for n in yielded_after if n <= p.documents_done)
            on_progress(
                FolderProgress(
                    files_done=done,
                    files_total=len(files),
                    documents=p.documents_done + len(file_errors),
                    errors=len(file_errors),
                    chunks_written=p.chunks_written,
                    tokens_embedded=p.tokens_embedded,
                    elapsed_s=time.perf_counter() - started,
                )
            )

    async def documents() -> AsyncIterator[ParsedDocument]:
        nonlocal yielded, failed_files
        for f in files:
            uri = source_uri(f)
            docs, errors = await anyio.to_thread.run_sync(_read_and_parse, f, uri, max_bytes)
            file_errors.extend(errors)
            failed_files += bool(errors) and not docs
            for d in docs:
                yielded += 1
                yield d
            yielded_after.append(yielded)
            if not docs:
                report(last)

    result = await ingestor.ingest(config, documents(), on_progress=report)
    report(
        IngestProgress(
            result.documents + len(result.errors), result.chunks_written, result.tokens_embedded, 0
        )
    )
    prune_skipped = False
    if prune is not None:
        if failed_files:
            prune_skipped = True
        else:
            # whether to prune is known only once every file was parsed: a second pass,
            # which embeds nothing for documents that are unchanged by now
            pruned = await ingestor.ingest(config, _again(files, max_bytes), prune_prefix=prune)
            result.deleted += pruned.deleted
            result.kb_version = pruned.kb_version or result.kb_version
    return FolderReport(
        files=len(files),
        ingest=result,
        errors=[*file_errors, *result.errors],
        prune_skipped=prune_skipped,
    )


async def _again(files: list[Path], max_bytes: int) -> AsyncIterator[ParsedDocument]:
    for f in files:
        docs, _ = await anyio.to_thread.run_sync(_read_and_parse, f, source_uri(f), max_bytes)
        for d in docs:
            yield d
