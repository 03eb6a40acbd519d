"""Synthetic data for the retrieval scale run: tenant sizes, vectors, bulk rows, memory.

- Tenant sizes follow a Zipf-Mandelbrot law, share of the tenant of rank ``k``
  proportional to ``(k + 16.7) ** -2.81``. With 100 tenants that gives the
  largest tenant 10.03% of the rows, rank 24 0.97%, rank 75 0.099% and the
  smallest 0.050%: one tenant at each share the scale run measures.
- Vectors come from a mixture of Gaussians: 1,000 components in a 32-dimensional
  latent space (component means N(0, 1), spread 0.35 around them), mapped into
  384 dimensions by one fixed random orthonormal matrix, plus isotropic noise
  (0.01 per dimension), then L2-normalised. Real sentence embeddings have a low
  intrinsic dimension and topical clusters; uniform noise on the 384-sphere has
  neither and is a worst case no ANN index is tuned for. Every tenant draws from
  the same mixture, so a tenant's filter is uncorrelated with where its
  vectors lie — the hard case for filtered ANN. Queries are fresh draws.
- Chunk rows are encoded for ``COPY … (FORMAT BINARY)`` a batch at a time with
  numpy (fixed-width rows), which keeps loading a million rows to seconds.
- Memory is read from ``/proc`` (RSS, and PSS where readable, so the shared
  buffers of Postgres processes are not counted once per process).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "COPY_SIGNATURE",
    "COPY_TRAILER",
    "Mixture",
    "ProcessMemory",
    "chunk_rows",
    "postgres_memory",
    "self_memory",
    "tenant_sizes",
]

ZIPF_OFFSET = 16.7
ZIPF_EXPONENT = 2.81
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)


def tenant_sizes(total: int, tenants: int) -> list[int]:
    """Rows per tenant, largest first, summing to ``total``; every tenant holds at least one."""
    if tenants < 1 or total < tenants:
        raise ValueError(f"need at least one row per tenant ({total} rows, {tenants} tenants)")
    ranks = np.arange(1, tenants + 1, dtype=np.float64)
    shares = (ranks + ZIPF_OFFSET) ** -ZIPF_EXPONENT
    ideal = shares / shares.sum() * (total - tenants)
    sizes = np.floor(ideal).astype(np.int64) + 1
    # largest remainders get the rows rounding left over
    for i in np.argsort(-(ideal - np.floor(ideal)))[: total - int(sizes.sum())]:
        sizes[i] += 1
    return [int(s) for s in sizes]


class Mixture:
    """Unit vectors from a Gaussian mixture in a low-dimensional latent space."""

    def __init__(
        self,
        *,
        dims: int = 384,
        latent_dims: int = 32,
        components: int = 1000,
        spread: float = 0.35,
        noise: float = 0.01,
        seed: int = 7,
    ) -> None:
        rng = np.random.default_rng(seed)
        self._means = rng.standard_normal((components, latent_dims))
        basis, _ = np.linalg.qr(rng.standard_normal((dims, latent_dims)))
        self._basis = basis.T  # (latent, dims), orthonormal rows
        self._spread = spread
        self._noise = noise
        self.dims = dims

    def sample(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
        which = rng.integers(0, len(self._means), n)
        latent = self._means[which] + self._spread * rng.standard_normal((n, self._means.shape[1]))
        x = latent @ self._basis + self._noise * rng.standard_normal((n, self.dims))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out: npt.NDArray[np.float32] = x.astype(np.float32)
        return out


def _text(value: str) -> tuple[str, bytes]:
    raw = value.encode()
    return f"S{len(raw)}", raw


def chunk_rows(
    *,
    ids: npt.NDArray[np.void],
    tenant_id: str,
    document_ids: npt.NDArray[np.void],
    namespace: str,
    model: str,
    ordinals: npt.NDArray[np.int64],
    text: str,
    vectors: npt.NDArray[np.float32],
) -> bytes:
    """Binary COPY rows for ``chunks (id, tenant_id, document_id, namespace,
    embedding_model, ordinal, text, embedding)``, without signature or trailer."""
    n, dims = vectors.shape
    fields = [
        ("id", "V16", ids),
        ("tenant", *_text(tenant_id)),
        ("doc", "V16", document_ids),
        ("ns", *_text(namespace)),
        ("model", *_text(model)),
        ("ord", ">i4", ordinals),
        ("text", *_text(text)),
    ]
    dtype: list[tuple[str, str] | tuple[str, str, tuple[int]]] = [("nfields", ">i2")]
    for name, kind, _ in fields:
        dtype += [(f"{name}_len", ">i4"), (name, kind)]
    dtype += [("vec_len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dims,))]
    rows = np.zeros(n, dtype=np.dtype(dtype))
    rows["nfields"] = len(fields) + 1
    for name, _, value in fields:
        rows[f"{name}_len"] = rows.dtype[name].itemsize
        rows[name] = value
    rows["vec_len"] = 4 + 4 * dims
    rows["dim"] = dims
    rows["vec"] = vectors
    return rows.tobytes()


@dataclass(frozen=True)
class ProcessMemory:
    processes: int
    rss_mb: float  # sum over processes: counts shared memory once per process
    pss_mb: float | None  # proportional share: shared pages divided among their users

    def as_json(self) -> dict[str, float | int | None]:
        return {
            "processes": self.processes,
            "rss_mb": round(self.rss_mb, 1),
            "pss_mb": None if self.pss_mb is None else round(self.pss_mb, 1),
        }


def _status(pid: int | str) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _kb(value: str | None) -> float:
    return float(value.split()[0]) if value else 0.0


def _pss_kb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return _kb(line.split(":", 1)[1])
    except OSError:
        return None
    return None


def postgres_memory(backend_pid: int) -> ProcessMemory:
    """Memory of the Postgres server that runs ``backend_pid``: postmaster and all children."""
    postmaster = int(_kb(_status(backend_pid).get("PPid")))
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(_kb(_status(entry).get("PPid"))) == postmaster:
            pids.append(int(entry))
    rss = 0.0
    pss: float | None = 0.0
    found = 0
    for pid in pids:
        share = _pss_kb(pid)
        status = _status(pid)
        if "VmRSS" not in status:
            continue  # ended since it was listed (a parallel worker, a closed connection)
        found += 1
        rss += _kb(status.get("VmRSS"))
        pss = None if share is None or pss is None else pss + share
    return ProcessMemory(found, rss / 1024, None if pss is None else pss / 1024)


def self_memory() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MiB."""
    status = _status("self")
    return {
        "rss_mb": round(_kb(status.get("VmRSS")) / 1024, 1),
        "peak_rss_mb": round(_kb(status.get("VmHWM")) / 1024, 1),
    }
