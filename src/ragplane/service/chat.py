"""The RAG request lifecycle behind ``POST /v1/chat``.

:meth:`ChatService.prepare` runs what may still refuse the request with a plain HTTP
error — the query's checks and the input guard (step 2) — and :meth:`ChatService.answer`
then yields the answer as typed events (``meta``, ``delta``, ``citations``, ``done``,
``error``), which the API sends as SSE or gathers into one JSON body:

1. tenant context: verified at the edge; the tenant's guard policy and output mode come
   with its registry row;
2. input guard: block (400 with a reason code), redact, or log, per the tenant's policy;
   the learned injection model reads the query's vector as soon as it is embedded
   (before the near cache path, or before a follow-up's rewrite), and a question it
   flags is never written back to the cache;
3. semantic cache: the exact path (no embedding), then the near path, verified by the
   cache policy and the answer's evidence (:mod:`ragplane.service.semcache`);
4. query rewrite through the gateway's rewrite alias, only for a follow-up in a session
   (before the cache, which then sees the standalone question) or when retrieval's best
   match is weak; each skip is counted;
5. hybrid retrieval (:class:`~ragplane.knowledge.search.Retriever`), with the query
   vector the cache step already computed;
6. context assembly under the alias's token budget (:mod:`ragplane.service.context`);
7. generation streamed through the gateway client; the ``ai-inference-enabled`` kill
   switch stops new generation (cache hits still serve);
8. output guard: PII redaction on each finished sentence before it is sent (or on the
   whole answer for a buffered tenant, who gets nothing before the guard has passed),
   and citation verification (:mod:`ragplane.service.citations`);
9. citations attached; the answer written back to the cache when it passed and cites;
10. the request log and an eval sample (``chat.eval_sample_rate``) queued for the
    :class:`~ragplane.service.events.EventSink`, never written on the stream's path.

When every route of the alias is down (the gateway says ``no_healthy_route``) or the
kill switch is off, a question the cache can answer at the offline threshold gets that
answer, else the opening sentences of its best passages, quoted and cited without a
model — both in ``offline`` mode with a banner; with neither, the request fails with an
error that names why. Every step's time is a span of the request's trace: kept on its
request-log row, observed in ``/metrics`` and exported over OTLP
(:mod:`ragplane.service.tracing`), all from the request's record once it ended. An
``error`` that comes first (the injection model's refusal, inference switched off with
nothing cached) is sent by the API as a plain HTTP error; a failure after the answer
started ends the stream with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ragplane.config import ChatSettings, GatewaySettings, ModelSettings
from ragplane.control.flags import AI_INFERENCE_ENABLED, FlagStore
from ragplane.control.namespaces import NamespaceConfig
from ragplane.control.tenants import Tenant
from ragplane.edge.context import TenantContext
from ragplane.errors import ApiError, BadRequest, RagplaneError
from ragplane.knowledge.search import Retriever, SearchResult
from ragplane.observe.logging import get_logger
from ragplane.observe.tracecontext import TraceContext
from ragplane.service.citations import VerifiedAnswer, verify_citations
from ragplane.service.context import (
    PROMPT_VERSION,
    AssembledContext,
    assemble,
    excerpt,
    prompt_messages,
)
from ragplane.service.events import EvalSample, EventSink, RequestRecord
from ragplane.service.guardrails import GuardPolicy, GuardResult, InputGuard, redact_pii
from ragplane.service.llm import GatewayClient, LlmCallError, LlmDelta, LlmUsage
from ragplane.service.metrics import ChatMetrics
from ragplane.service.semcache import CacheHit, CacheScope, SemanticCache
from ragplane.service.sessions import SessionStore, Turn

if TYPE_CHECKING:
    from ragplane.service.tracing import LifecycleTracer

__all__ = [
    "ChatEvent",
    "ChatRequest",
    "ChatService",
    "InferenceDisabled",
    "Prepared",
    "Trace",
]

log = get_logger("ragplane.chat")

ChatEvent = tuple[str, dict[str, Any]]
_OFFLINE_CODES = frozenset({"no_healthy_route", "upstream_unavailable", "gateway_unreachable"})
# a finished sentence: its end, the markers that follow it, and the start of the next
# (a marker may still be on its way until a character that is not one arrives)
_SENTENCE_END = re.compile(r"(?:[.!?](?:\s*\[\d{1,3}\])*|\n)\s+(?=[^\s\[])")
_HOLD_CHARS = 160
_WORD_GAP = re.compile(r"(?<=[A-Za-z,;])\s+(?=[A-Za-z])")
_REWRITE_PROMPT = (
    "Rewrite the last question of this conversation as one standalone question that "
    "needs no earlier message to be understood. Reply with the question only."
)


class InferenceDisabled(ApiError):
    status_code = 503
    code = "inference_disabled"


@dataclass(frozen=True)
class ChatRequest:
    query: str
    kb: str = "default"
    session_id: str | None = None
    filters: Mapping[str, Any] | None = None
    stream: bool = False
    feature: str | None = None


@dataclass
class Trace:
    """The request's step spans (name, start offset, duration in ms) and counters."""

    begun: float = field(default_factory=time.perf_counter)
    begun_unix_ns: int = field(default_factory=time.time_ns)
    spans: list[dict[str, Any]] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        start = time.perf_counter()
        record: dict[str, Any] = {"name": name, "start_ms": (start - self.begun) * 1000}
        record.update(attributes)
        try:
            yield record
        finally:
            record["ms"] = (time.perf_counter() - start) * 1000
            self.spans.append(record)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.begun) * 1000


@dataclass
class Prepared:
    """A request that passed steps 1-2; :meth:`ChatService.answer` runs the rest."""

    ctx: TenantContext
    request: ChatRequest
    namespace: NamespaceConfig
    query: str  # after the input guard
    session_id: str
    buffered: bool
    trace: Trace
    traceparent: str
    span_id: str  # the edge's span of this request: the lifecycle's spans hang under it
    guard: GuardPolicy
    answer: str = ""  # set once answered: what the session records


@dataclass
class _Outcome:
    mode: str = "normal"
    cache_hit: bool = False
    flagged: bool = False  # the injection model flagged the query (a tenant that logs it)
    outcome: str = "answered"
    status: int = 200
    usage: LlmUsage = field(default_factory=LlmUsage)
    cost_usd: float = 0.0
    answer: str = ""
    citations: list[dict[str, Any]] = field(default_factory=list)
    contexts: list[dict[str, Any]] = field(default_factory=list)


class ChatService:
    def __init__(
        self,
        settings: ChatSettings,
        gateway_settings: GatewaySettings,
        *,
        retriever: Retriever,
        cache: SemanticCache,
        llm: GatewayClient,
        sessions: SessionStore,
        events: EventSink,
        flags: FlagStore,
        guard: InputGuard | None = None,
        metrics: ChatMetrics | None = None,
        tracer: LifecycleTracer | None = None,
    ) -> None:
        self.settings = settings
        self._gateway = gateway_settings
        self.retriever = retriever
        self.cache = cache
        self.llm = llm
        self.sessions = sessions
        self.events = events
        self.flags = flags
        self.guard = guard or InputGuard()
        self.metrics = metrics
        self.tracer = tracer
        self._rng = random.Random()  # noqa: S311 -- sampling, not secrets
        alias = gateway_settings.aliases.get(settings.model_alias)
        if alias is not None:
            models = [gateway_settings.models[r.model] for r in alias.routes]
        else:  # a gateway elsewhere (chat.gateway_url) knows it; else every call will say so
            log.warning("chat_alias_not_local", alias=settings.model_alias)
            models = [ModelSettings(provider="?", upstream="?")]
        # the budget every route of the alias can take
        self.context_window = min(m.context_window for m in models)
        self.reserved_output = min(max(m.max_output_tokens for m in models), 1024)

    # -- steps 1-2 --------------------------------------------------------------------

    def prepare(
        self,
        ctx: TenantContext,
        tenant: Tenant,
        request: ChatRequest,
        namespace: NamespaceConfig,
        trace: TraceContext,
    ) -> Prepared:
        t = Trace()
        query = request.query.strip()
        if not query:
            raise BadRequest("the query is empty", code="empty_query")
        if len(query) > self.settings.max_query_chars:
            raise BadRequest(
                f"the query has {len(query)} characters; at most "
                f"{self.settings.max_query_chars} are allowed",
                code="query_too_long",
            )
        try:
            policy = GuardPolicy.from_mapping(tenant.guard_policy)
        except RagplaneError as exc:
            log.warning("guard_policy_invalid", tenant_id=tenant.id, error=str(exc))
            policy = GuardPolicy.from_mapping(None)
        with t.span("guard_input") as span:
            result = self.guard.scan(query, policy)
            span["findings"] = len(result.findings)
            span["redacted"] = list(result.redacted)
        if result.blocked:
            log.info("input_blocked", reason=result.reason, findings=len(result.findings))
            t.counters["guard_blocked"] += 1
            self._submit(
                RequestRecord(
                    tenant_id=ctx.tenant_id,
                    request_id=ctx.request_id,
                    trace_id=ctx.trace_id,
                    route="/v1/chat",
                    status=400,
                    latency_ms=t.elapsed_ms(),
                    session_id=request.session_id,
                    namespace=namespace.name,
                    model_alias=self.settings.model_alias,
                    mode="normal",
                    cache_hit=False,
                    outcome=str(result.reason),
                    spans=t.spans,
                    counters=dict(t.counters),
                    started_unix_ns=t.begun_unix_ns,
                    parent_span_id=trace.span_id,
                )
            )
            raise _refused(result)
        session_id = request.session_id or str(uuid.uuid4())
        return Prepared(
            ctx=ctx,
            request=request,
            namespace=namespace,
            query=result.text,
            session_id=session_id,
            buffered=tenant.output_mode == "buffered" or not request.stream,
            trace=t,
            traceparent=trace.traceparent,
            span_id=trace.span_id,
            guard=policy,
        )

    # -- steps 3-10 -------------------------------------------------------------------

    async def answer(self, p: Prepared) -> AsyncIterator[ChatEvent]:
        out = _Outcome()
        try:
            async for event in self._answer(p, out):
                yield event
        except ApiError as exc:
            out.outcome, out.status = exc.code, exc.status_code
            yield "error", self._error(p, exc.code, str(exc), exc.status_code)
        except LlmCallError as exc:
            out.outcome, out.status = exc.code, exc.status
            yield "error", self._error(p, exc.code, str(exc), exc.status)
        except (GeneratorExit, asyncio.CancelledError):  # the client left mid-answer
            out.outcome, out.status = "client_closed", 499
            raise
        except Exception as exc:  # the stream must end with an error event, never silently
            log.exception("chat_failed")
            out.outcome, out.status = "internal_error", 500
            yield "error", self._error(p, "internal_error", f"{type(exc).__name__}: {exc}", 500)
        finally:
            self._record(p, out)

    def _error(self, p: Prepared, code: str, message: str, status: int) -> dict[str, Any]:
        return {"code": code, "message": message, "request_id": p.ctx.request_id, "status": status}

    def _meta(self, p: Prepared, out: _Outcome) -> dict[str, Any]:
        meta = {
            "request_id": p.ctx.request_id,
            "trace_id": p.ctx.trace_id,
            "session_id": p.session_id,
            "cache_hit": out.cache_hit,
            "mode": out.mode,
            "model_alias": self.settings.model_alias,
        }
        if out.mode == "offline":
            meta["banner"] = self.settings.offline_banner
        return meta

    async def _answer(self, p: Prepared, out: _Outcome) -> AsyncIterator[ChatEvent]:
        s = self.settings
        t = p.trace
        tenant_id = p.ctx.tenant_id
        query = p.query
        history: list[Turn] = []
        if p.request.session_id is not None and s.history_turns:
            with t.span("session"):
                history = await self.sessions.history(tenant_id, p.session_id)
        with t.span("flags"):
            inference_on = await self.flags.is_on(AI_INFERENCE_ENABLED, tenant_id)
        rewritten = False
        model = p.namespace.embedding_model
        if history:
            # the rewrite model reads the user's words: the injection model sees them first
            self._screen(p, out, query, await self._embed(t, query, model))
            query = await self._rewrite(
                p, query, history, reason="follow_up", use_model=inference_on
            )
            rewritten = True
        scope = CacheScope(s.model_alias, p.namespace.name, PROMPT_VERSION, p.request.filters)
        vector: npt.NDArray[np.float32] | None = None
        if s.cache_enabled:
            # Exact hits skip the injection model: only screened questions are written
            # back, and a hit reaches no model.
            with t.span("cache_exact") as span:
                hit = await self.cache.exact(tenant_id, scope, query)
                span["hit"] = hit is not None
            if hit is None:
                vector = await self._embed(t, query, model)
                if not rewritten:
                    self._screen(p, out, query, vector)
                with t.span("cache_near") as span:
                    hit, reason = await self.cache.near(tenant_id, scope, query, vector, model)
                    span["hit"] = hit is not None
                    span["reason"] = reason
                if hit is None:
                    t.counters[f"cache_miss_{reason}"] += 1
            if hit is not None:
                t.counters["rewrite_skipped"] += not rewritten
                async for event in self._serve_cached(p, out, hit, mode="normal"):
                    yield event
                return
        if not inference_on:
            t.counters["kill_switch"] += 1
            async for event in self._offline(
                p,
                out,
                query,
                vector,
                scope,
                InferenceDisabled(
                    "new inference is switched off (ai-inference-enabled); only cached answers "
                    "are served"
                ),
            ):
                yield event
            return
        if vector is None:
            vector = await self._embed(t, query, model)
            if not rewritten:
                self._screen(p, out, query, vector)
        found = await self._retrieve(p, query, vector)
        if not rewritten and self._weak(found):
            better = await self._rewrite(p, query, [], reason="low_confidence")
            if better != query:
                query, rewritten = better, True
                found = await self._retrieve(p, query, None)
        t.counters["rewrite_skipped"] += not rewritten  # once per request that needed none
        turns = [{"role": h.role, "content": h.content} for h in history]
        context = self._assemble(p, found, query, turns)
        messages = prompt_messages(context, query, turns)
        out.contexts = [
            {"marker": x.marker, "chunk_id": x.chunk.chunk_id, "text": x.chunk.text}
            for x in context.passages
        ]
        async for event in self._generate(
            p, out, messages, context, query, vector, scope, found.kb_version
        ):
            yield event

    def _assemble(
        self, p: Prepared, found: SearchResult, query: str, turns: list[dict[str, str]]
    ) -> AssembledContext:
        with p.trace.span("assemble") as span:
            context = assemble(
                found.chunks,
                query,
                context_window=self.context_window,
                reserved_output=self.reserved_output,
                history=turns,
            )
            span["passages"] = len(context.passages)
            span["tokens"] = context.tokens
        p.trace.counters["context_duplicates"] += context.skipped_duplicates
        p.trace.counters["context_over_budget"] += context.skipped_over_budget
        return context

    def _screen(
        self, p: Prepared, out: _Outcome, query: str, vector: npt.NDArray[np.float32]
    ) -> None:
        """Step 2's second half: the learned injection model on the query's vector."""
        with p.trace.span("guard_model") as span:
            verdict = self.guard.classify(query, vector, p.namespace.embedding_model, p.guard)
            span["scored"] = verdict is not None
            if verdict is None:
                return
            score, result = verdict
            span["score"] = round(score, 4)
            span["flagged"] = bool(result.findings)
        if result.blocked:
            p.trace.counters["guard_blocked"] += 1
            log.info("input_blocked", reason=result.reason, by="model", score=round(score, 4))
            raise _refused(result)
        if result.findings:
            p.trace.counters["guard_model_flagged"] += 1
            out.flagged = True

    async def _embed(self, t: Trace, query: str, model: str) -> npt.NDArray[np.float32]:
        with t.span("embed"):
            return await self.retriever.embed_query(query, model)

    async def _retrieve(
        self, p: Prepared, query: str, vector: npt.NDArray[np.float32] | None
    ) -> SearchResult:
        with p.trace.span("retrieve") as span:
            found = await self.retriever.search(
                p.namespace,
                query,
                top_k=self.settings.top_k,
                filters=p.request.filters,
                query_vector=vector,
            )
            span["chunks"] = len(found.chunks)
        return found

    def _weak(self, found: SearchResult) -> bool:
        best = max((c.dense_score or 0.0 for c in found.chunks), default=0.0)
        return best < self.settings.rewrite_below_score

    async def _rewrite(
        self,
        p: Prepared,
        query: str,
        history: list[Turn],
        *,
        reason: str,
        use_model: bool = True,
    ) -> str:
        """A standalone question from the gateway's rewrite alias; if its answer is not a
        usable question (or inference is switched off), the last user question and this
        one together (counted)."""
        t = p.trace
        t.counters[f"rewrite_{reason}"] += 1
        if not use_model:
            return _joined(query, history, t)
        transcript = "\n".join(f"{h.role}: {h.content}" for h in history)
        messages = [
            {"role": "system", "content": _REWRITE_PROMPT},
            {"role": "user", "content": f"{transcript}\nuser: {query}" if transcript else query},
        ]
        with t.span("rewrite", reason=reason) as span:
            try:
                text, _ = await self.llm.complete(
                    self.settings.rewrite_alias,
                    messages,
                    tenant_id=p.ctx.tenant_id,
                    request_id=p.ctx.request_id,
                    traceparent=p.traceparent,
                    feature="rewrite",
                    max_tokens=96,
                )
            except LlmCallError as exc:
                log.warning("rewrite_failed", code=exc.code)
                text = ""
            text = text.strip()
            usable = 0 < len(text) <= max(300, 3 * len(query)) and "could not find" not in text
            span["fallback"] = not usable
        return text if usable else _joined(query, history, t)

    async def _serve_cached(
        self, p: Prepared, out: _Outcome, hit: CacheHit, *, mode: str
    ) -> AsyncIterator[ChatEvent]:
        out.cache_hit, out.mode = True, mode
        out.answer, out.citations = hit.answer, hit.citations
        p.trace.counters[f"cache_{hit.reason}"] += 1
        yield "meta", self._meta(p, out)
        yield "delta", {"text": hit.answer}
        yield "citations", {"citations": hit.citations, "dropped": 0}
        yield "done", self._done(p, out)

    async def _offline(
        self,
        p: Prepared,
        out: _Outcome,
        query: str,
        vector: npt.NDArray[np.float32] | None,
        scope: CacheScope,
        error: ApiError | LlmCallError,
        context: AssembledContext | None = None,
    ) -> AsyncIterator[ChatEvent]:
        """No model to ask: the cache at the offline threshold; else the knowledge base's
        own words (the opening sentence of the best passages, cited — no model); else
        fail with ``error``. Either answer is marked ``offline``, with the banner."""
        model = p.namespace.embedding_model
        if vector is None:
            vector = await self._embed(p.trace, query, model)
        if self.settings.cache_enabled:
            with p.trace.span("cache_offline") as span:
                hit, _ = await self.cache.near(
                    p.ctx.tenant_id, scope, query, vector, model, offline=True
                )
                span["hit"] = hit is not None
            if hit is not None:
                async for event in self._serve_cached(p, out, hit, mode="offline"):
                    yield event
                return
        if context is None:
            context = self._assemble(p, await self._retrieve(p, query, vector), query, [])
        verified = verify_citations(excerpt(context), context)
        if not verified.citations:
            raise error
        p.trace.counters["offline_excerpt"] += 1
        out.mode = "offline"
        out.answer = verified.text
        out.citations = _cited(verified, p.guard)
        yield "meta", self._meta(p, out)
        yield "delta", {"text": redact_pii(out.answer, p.guard).text}
        yield "citations", {"citations": out.citations, "dropped": verified.dropped}
        yield "done", self._done(p, out)

    async def _generate(
        self,
        p: Prepared,
        out: _Outcome,
        messages: list[dict[str, str]],
        context: AssembledContext,
        query: str,
        vector: npt.NDArray[np.float32],
        scope: CacheScope,
        kb_version: int,
    ) -> AsyncIterator[ChatEvent]:
        t = p.trace
        parts: list[str] = []
        pending = ""
        sent_meta = False
        usage = LlmUsage()
        guard_ms = 0.0  # redacting the released sentences
        try:
            with t.span("generate") as span:
                stream = self.llm.stream(
                    self.settings.model_alias,
                    messages,
                    tenant_id=p.ctx.tenant_id,
                    request_id=p.ctx.request_id,
                    traceparent=p.traceparent,
                    feature=p.request.feature,
                    max_tokens=self.reserved_output,
                )
                async for piece in stream:
                    if isinstance(piece, LlmUsage):
                        usage = piece
                        continue
                    assert isinstance(piece, LlmDelta)
                    if "ttft_ms" not in span:
                        span["ttft_ms"] = (time.perf_counter() - t.begun) * 1000 - span["start_ms"]
                    parts.append(piece.text)
                    if p.buffered:
                        continue
                    if not sent_meta:
                        sent_meta = True
                        yield "meta", self._meta(p, out)
                    pending += piece.text
                    ready, pending = _split_finished(pending)
                    if ready:
                        g0 = time.perf_counter()
                        text = redact_pii(ready, p.guard).text
                        guard_ms += (time.perf_counter() - g0) * 1000
                        yield "delta", {"text": text}
                span["guard_stream_ms"] = round(guard_ms, 3)
        except LlmCallError as exc:
            if exc.started or exc.code not in _OFFLINE_CODES:
                raise
            t.counters["offline_fallback"] += 1
            async for event in self._offline(p, out, query, vector, scope, exc, context):
                yield event
            return
        out.usage = usage
        out.cost_usd = self._cost(usage)
        with t.span("guard_output") as gspan:
            guarded = redact_pii("".join(parts), p.guard)
            verified = verify_citations(guarded.text, context)
            gspan["redacted"] = list(guarded.redacted)
            gspan["citations"] = len(verified.citations)
            gspan["dropped"] = verified.dropped
        t.counters["citations_dropped"] += verified.dropped
        out.answer = verified.text
        out.citations = _cited(verified, p.guard)
        if p.buffered:
            yield "meta", self._meta(p, out)
            yield "delta", {"text": out.answer}
        else:
            if not sent_meta:
                yield "meta", self._meta(p, out)
            if pending:
                yield "delta", {"text": redact_pii(pending, p.guard).text}
        yield "citations", {"citations": out.citations, "dropped": verified.dropped}
        if self.settings.cache_enabled and out.citations and not out.flagged:
            # before "done": a client that asks again once it has the answer finds it
            await self._write_back(p, scope, query, vector, kb_version, out)
        yield "done", self._done(p, out)

    async def _write_back(
        self,
        p: Prepared,
        scope: CacheScope,
        query: str,
        vector: npt.NDArray[np.float32],
        kb_version: int,
        out: _Outcome,
    ) -> None:
        with p.trace.span("cache_write"):
            try:
                await self.cache.store(
                    p.ctx.tenant_id,
                    scope,
                    query=query,
                    vector=vector,
                    embedding_model=p.namespace.embedding_model,
                    kb_version=kb_version,
                    answer=out.answer,
                    citations=out.citations,
                    usage={
                        "input_tokens": out.usage.input_tokens,
                        "output_tokens": out.usage.output_tokens,
                    },
                )
            except RagplaneError as exc:  # the answer stands; the cache will miss
                log.warning("cache_write_failed", error=str(exc))

    def _cost(self, usage: LlmUsage) -> float:
        for model in self._gateway.models.values():
            if model.upstream == usage.model:
                return (
                    usage.input_tokens * model.input_per_mtok
                    + usage.output_tokens * model.output_per_mtok
                ) / 1e6
        return 0.0

    def _done(self, p: Prepared, out: _Outcome) -> dict[str, Any]:
        return {
            "usage": {
                "input_tokens": out.usage.input_tokens,
                "output_tokens": out.usage.output_tokens,
                "cost_usd": round(out.cost_usd, 9),
            },
            "cache_hit": out.cache_hit,
            "mode": out.mode,
            "latency_ms": round(p.trace.elapsed_ms(), 2),
        }

    def _record(self, p: Prepared, out: _Outcome) -> None:
        """Step 10: queue the request log (and an eval sample); session turns are written
        by :meth:`remember` once the response is done."""
        sample = None
        if (
            out.outcome == "answered"
            and not out.cache_hit
            and self._rng.random() < self.settings.eval_sample_rate
        ):
            sample = EvalSample(
                p.ctx.tenant_id,
                p.ctx.request_id,
                p.query,
                out.answer,
                out.contexts,
                out.citations,
            )
        record = RequestRecord(
            tenant_id=p.ctx.tenant_id,
            request_id=p.ctx.request_id,
            trace_id=p.ctx.trace_id,
            route="/v1/chat",
            status=out.status,
            latency_ms=p.trace.elapsed_ms(),
            session_id=p.session_id,
            namespace=p.namespace.name,
            model_alias=self.settings.model_alias,
            mode=out.mode,
            cache_hit=out.cache_hit,
            outcome=out.outcome,
            input_tokens=out.usage.input_tokens,
            output_tokens=out.usage.output_tokens,
            cost_usd=out.cost_usd,
            spans=p.trace.spans,
            counters=dict(p.trace.counters),
            started_unix_ns=p.trace.begun_unix_ns,
            parent_span_id=p.span_id,
        )
        self._submit(record, sample)
        p.answer = out.answer if out.outcome == "answered" else ""

    def _submit(self, record: RequestRecord, sample: EvalSample | None = None) -> None:
        """The request's record to its outputs: the request log, metrics, traces."""
        self.events.submit(record, sample)
        if self.metrics is not None:
            self.metrics.observe(record)
        if self.tracer is not None:
            self.tracer.export(record)

    async def remember(self, p: Prepared) -> None:
        """Append the question and the answer to the session (after the response)."""
        if not p.answer:
            return
        try:
            await self.sessions.append(
                p.ctx.tenant_id,
                p.session_id,
                p.namespace.name,
                p.ctx.subject,
                [Turn("user", p.query), Turn("assistant", p.answer)],
            )
        except RagplaneError as exc:
            log.warning("session_write_failed", error=str(exc))


def _refused(result: GuardResult) -> BadRequest:
    """The 400 for a request the input guard blocked; its code is the guard's reason."""
    return BadRequest(
        f"the request was refused by the input guard ({result.reason})", code=str(result.reason)
    )


def _cited(verified: VerifiedAnswer, guard: GuardPolicy) -> list[dict[str, Any]]:
    """The supported citations as sent; the quotes are the sources' words, and the output
    guard covers them too."""
    return [c.as_dict() | {"quote": redact_pii(c.quote, guard).text} for c in verified.citations]


def _joined(query: str, history: list[Turn], t: Trace) -> str:
    """The rewrite's fallback: the conversation's last question, then this one."""
    t.counters["rewrite_fallback"] += 1
    last_user = next((h.content for h in reversed(history) if h.role == "user"), "")
    return f"{last_user} {query}".strip() if last_user else query


def _split_finished(text: str) -> tuple[str, str]:
    """``text`` cut after its last finished sentence (and the markers that follow it); a
    run of more than ``_HOLD_CHARS`` without one is cut at its last space between two
    letters (never inside a number, an address or a key the output guard must see whole)."""
    last = None
    for m in _SENTENCE_END.finditer(text):
        last = m
    if last is not None:
        return text[: last.end()], text[last.end() :]
    if len(text) > _HOLD_CHARS:
        cut = None
        for m in _WORD_GAP.finditer(text):
            cut = m
        if cut is not None:
            return text[: cut.end()], text[cut.end() :]
    return "", text
