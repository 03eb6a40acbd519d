"""The composition root: settings in, a running platform (and its ASGI app) out.

:class:`Platform` starts the data plane (the embedded Postgres, or the URLs from
settings), seeds the demo tenants in dev mode, and wires the edge. ``create_app``
wraps it in a FastAPI app whose lifespan starts and stops it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ragplane import __version__
from ragplane.config import Region, Settings
from ragplane.control.changes import ControlChanges
from ragplane.control.namespaces import NamespaceRegistry, get_namespace
from ragplane.control.tenants import TenantRegistry, add_tenant
from ragplane.data import Database, DatabaseUrls, EmbeddedPostgres
from ragplane.edge.auth import (
    Authenticator,
    ChainedKeySource,
    FileKeySource,
    JwtVerifier,
    KeySource,
    StaticKeySource,
    UrlKeySource,
)
from ragplane.edge.devkeys import DevKeys, load_or_create_dev_keys
from ragplane.edge.errors import install_error_handlers
from ragplane.edge.middleware import RequestContextMiddleware
from ragplane.edge.tenancy import Edge
from ragplane.errors import ConfigError, RagplaneError
from ragplane.gateway.runtime import Gateway
from ragplane.observe.logging import get_logger
from ragplane.service.admin_api import router as admin_router
from ragplane.service.api import router as platform_router
from ragplane.service.chat_api import router as chat_router
from ragplane.service.documents import router as documents_router
from ragplane.service.kbmodel import router as kbmodel_router

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from ragplane.control.flags import FlagStore
    from ragplane.knowledge.embedder import LocalEmbedder
    from ragplane.knowledge.ingest import Ingestor
    from ragplane.knowledge.jobs import IngestQueue
    from ragplane.knowledge.models import EmbedderRegistry
    from ragplane.service.chat import ChatService
    from ragplane.service.events import EventSink
    from ragplane.service.metrics import ChatMetrics

__all__ = ["DEMO_TENANTS", "Platform", "create_app", "create_gateway_app", "database_urls"]

log = get_logger("ragplane.platform")


@dataclass(frozen=True)
class DemoTenant:
    id: str
    name: str
    region: Region


DEMO_KB = Path(__file__).parent / "demo" / "kb"
DEMO_TENANTS = (
    DemoTenant("tnt_acme_eu", "Acme Europe", "eu"),
    DemoTenant("tnt_globex_us", "Globex US", "us"),
)


def database_urls(settings: Settings) -> DatabaseUrls:
    """The role URLs of an external database (production)."""
    db = settings.database
    if db.url is None:
        raise ConfigError("database.url is not set (no DATABASE_URL): use the embedded database")
    return DatabaseUrls(
        app=db.url.get_secret_value(),
        owner=db.owner_url.get_secret_value() if db.owner_url else None,
        reporting=db.reporting_url.get_secret_value() if db.reporting_url else None,
    )


class Platform:
    """Every long-lived part of one ragplane process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedPostgres | None = None
        self.urls: DatabaseUrls | None = None
        self.db: Database | None = None
        self.dev_keys: DevKeys | None = None
        self.edge: Edge | None = None
        self.embedder: LocalEmbedder | None = None
        self.ingestor: Ingestor | None = None
        self.embedders: EmbedderRegistry | None = None
        self.ingest_queue: IngestQueue | None = None
        self._http: httpx.AsyncClient | None = None
        self.gateway: Gateway | None = None
        self.changes: ControlChanges | None = None
        self.chat: ChatService | None = None
        self.events: EventSink | None = None
        self.flags: FlagStore | None = None
        self._gateway_http: httpx.AsyncClient | None = None
        self._service_key = ""
        self.owner_db: Database | None = None  # admin API writes (flags), when configured
        self.namespaces: NamespaceRegistry | None = None
        self.metrics: ChatMetrics | None = None
        self._tracing: TracerProvider | None = None

    async def start(self) -> None:
        s = self.settings
        if s.embedded_database:
            self.embedded = EmbeddedPostgres(s.data_dir)
            self.urls = await anyio.to_thread.run_sync(self.embedded.start)
        else:
            self.urls = database_urls(s)
        if s.dev_mode:
            self.dev_keys = load_or_create_dev_keys(s.data_dir)
            await self._seed_demo_tenants()
        self.db = Database(
            self.urls.app,
            min_size=s.database.pool_min_size,
            max_size=s.database.pool_max_size,
            timeout_s=s.database.connect_timeout_s,
        )
        await self.db.open()
        if self.urls.owner is not None:  # connects on first use
            self.owner_db = Database(self.urls.owner, min_size=0, max_size=1, name="owner")
            await self.owner_db.open()
        # tenant and key changes pushed by Postgres: the caches below forget at once
        self.changes = ControlChanges(self.db)
        await self.changes.start()
        registry = TenantRegistry(
            self.db,
            ttl_s=s.edge.tenant_cache_s,
            changes=self.changes,
            listening_ttl_s=s.edge.tenant_cache_listening_s,
        )
        self.edge = Edge(
            authenticator=Authenticator(self._verifier(), self.db),
            registry=registry,
            dev_mode=s.dev_mode,
        )
        self._service_key = "rps_" + secrets.token_urlsafe(32)  # this process's AI service
        self.gateway = Gateway(
            s, self.db, registry=registry, changes=self.changes, service_keys=(self._service_key,)
        )
        await self.gateway.start()
        await self._start_knowledge()
        await self._start_chat()
        if s.knowledge.demo_kb and s.dev_mode:
            await self._seed_demo_kb()

    async def _start_chat(self) -> None:
        """The RAG lifecycle's parts: retriever, semantic cache, gateway client, sessions,
        the request-log sink and the feature flags."""
        from ragplane.control.flags import FlagStore
        from ragplane.knowledge.search import Retriever
        from ragplane.service.cache_policy import CachePolicy
        from ragplane.service.chat import ChatService
        from ragplane.service.events import EventSink
        from ragplane.service.llm import GatewayClient, InProcessTransport
        from ragplane.service.metrics import ChatMetrics
        from ragplane.service.semcache import SemanticCache
        from ragplane.service.sessions import SessionStore
        from ragplane.service.tracing import LifecycleTracer, build_provider

        assert self.db is not None
        assert self.embedders is not None
        assert self.gateway is not None
        s = self.settings
        c = s.chat
        if c.gateway_url is not None:
            if c.gateway_key is None:
                raise ConfigError("chat.gateway_url is set without chat.gateway_key")
            self._gateway_http = httpx.AsyncClient(base_url=c.gateway_url)
            key = c.gateway_key.get_secret_value()
        else:
            self._gateway_http = httpx.AsyncClient(
                transport=InProcessTransport(self.gateway.app), base_url="http://gateway"
            )
            key = self._service_key
        self.events = EventSink(
            self.db,
            capacity=c.events_capacity,
            batch_size=c.events_batch_size,
            flush_interval_s=c.events_flush_s,
        )
        await self.events.start()
        self.metrics = ChatMetrics(self.events)
        self._tracing = build_provider(s.tracing)
        self.flags = FlagStore(self.db, changes=self.changes, ttl_s=c.flags_refresh_s)
        self.namespaces = NamespaceRegistry(
            self.db,
            ttl_s=s.edge.tenant_cache_s,
            changes=self.changes,
            listening_ttl_s=s.edge.tenant_cache_listening_s,
        )
        self.chat = ChatService(
            c,
            s.gateway,
            retriever=Retriever(
                self.db, self.embedders, hnsw_visit_cost=s.knowledge.hnsw_visit_cost
            ),
            cache=SemanticCache(
                self.db,
                CachePolicy(),
                ttl_s=c.cache_ttl_s,
                evidence_margin=c.cache_evidence_margin,
                offline_similarity=c.offline_similarity,
            ),
            llm=GatewayClient(self._gateway_http, service_key=key),
            sessions=SessionStore(self.db, history_turns=c.history_turns),
            events=self.events,
            flags=self.flags,
            metrics=self.metrics,
            tracer=LifecycleTracer(self._tracing) if self._tracing is not None else None,
        )

    async def _seed_demo_kb(self) -> None:
        """The demo knowledge base (``ragplane/demo/kb``) in each demo tenant's default
        namespace; unchanged documents write nothing, so a restart costs little."""
        from ragplane.knowledge.folder import collect_files, ingest_files
        from ragplane.knowledge.ingest import Ingestor
        from ragplane.knowledge.models import EmbedderRegistry, MemoisedEmbedder

        assert self.db is not None
        assert self.embedder is not None
        files, _ = collect_files(DEMO_KB)
        # every demo tenant gets the same documents: embed them once
        ingestor = Ingestor(self.db, EmbedderRegistry.of(MemoisedEmbedder(self.embedder)))
        for t in DEMO_TENANTS:
            async with self.db.control() as session:
                config = await get_namespace(session, t.id, "default")
            report = await ingest_files(ingestor, config, files)
            log.info(
                "demo_kb_loaded",
                tenant_id=t.id,
                files=report.files,
                errors=len(report.errors),
            )

    async def _start_knowledge(self) -> None:
        """The embedder, the ingestor and the ingest queue.

        The embedding model (all-MiniLM-L6-v2, ONNX) takes about 1.5 s to load cold (0.2 s
        warm) and the API does not embed on its request path yet, so the API loads it on
        first use (``knowledge.preload_embedder`` loads it here instead); the worker loads
        it before taking jobs. Importing onnxruntime and procrastinate (about 1 s the first
        time in a process) happens in a thread, off the event loop.
        """
        assert self.urls is not None
        assert self.db is not None
        s = self.settings
        app_url = self.urls.app

        def build() -> tuple[LocalEmbedder, IngestQueue]:
            from ragplane.data.queue import create_queue
            from ragplane.knowledge.embedder import LocalEmbedder
            from ragplane.knowledge.jobs import IngestQueue

            embedder = LocalEmbedder()
            if s.knowledge.preload_embedder:
                embedder.load()
            queue = IngestQueue(
                create_queue(
                    app_url,
                    pool_max_size=max(2, s.worker.concurrency + 1),
                    connect_timeout_s=s.database.connect_timeout_s,
                ),
                max_attempts=s.worker.max_attempts,
                retry_wait_s=s.worker.retry_wait_s,
            )
            return embedder, queue

        from ragplane.knowledge.ingest import Ingestor
        from ragplane.knowledge.models import EmbedderRegistry

        embedder, self.ingest_queue = await anyio.to_thread.run_sync(build)
        self.embedder = embedder
        # every local model (one session): each namespace embeds with the model it is pinned to
        self.embedders = EmbedderRegistry.local(embedder)
        self.ingestor = Ingestor(self.db, self.embedders, batch_documents=s.worker.batch_documents)

    async def run_worker(
        self,
        *,
        install_signal_handlers: bool = True,
        wait: bool = True,
        grace_s: float | None = None,
    ) -> None:
        """Run background jobs until SIGINT/SIGTERM (the platform must be started); with
        ``wait`` false, until the queue has no job left that it can take."""
        from ragplane.data.queue import run_worker
        from ragplane.knowledge.jobrunner import IngestRunner
        from ragplane.knowledge.jobs import RUNNER_KEY, SWITCHER_KEY
        from ragplane.knowledge.switchrunner import ModelSwitcher

        assert self.db is not None
        assert self.embedder is not None
        assert self.ingestor is not None
        assert self.ingest_queue is not None
        await anyio.to_thread.run_sync(self.embedder.load)  # pay the model load before jobs
        runner = IngestRunner(
            self.db,
            self.ingestor,
            max_upload_bytes=self.settings.knowledge.max_upload_bytes,
            max_attempts=self.settings.worker.max_attempts,
        )
        switcher = ModelSwitcher(
            self.db,
            self.ingestor.embedders,
            batch_documents=self.settings.worker.batch_documents,
            max_attempts=self.settings.worker.max_attempts,
        )
        worker_settings = self.settings.worker
        if grace_s is not None:
            worker_settings = worker_settings.model_copy(update={"shutdown_grace_s": grace_s})
        log.info("worker_starting", concurrency=worker_settings.concurrency)
        await run_worker(
            self.ingest_queue.app,
            worker_settings,
            context={RUNNER_KEY: runner, SWITCHER_KEY: switcher},
            install_signal_handlers=install_signal_handlers,
            wait=wait,
        )

    async def run_worker_in_process(self, *, grace_s: float = 5.0) -> None:
        """Background jobs beside the API (``ragplane up``): no signal handlers of its own
        (the server owns them), a short grace on shutdown, and a failure is logged rather
        than taking the API down. Cancel the task to stop it."""
        try:
            await self.run_worker(install_signal_handlers=False, grace_s=grace_s)
        except Exception as exc:  # the API keeps serving; the jobs wait in the queue
            log.exception("in_process_worker_failed", error=f"{type(exc).__name__}: {exc}")

    def _verifier(self) -> JwtVerifier:
        a = self.settings.auth
        sources: list[KeySource] = []
        if a.jwks_file is not None:
            try:
                sources.append(FileKeySource(a.jwks_file))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.jwks_file {a.jwks_file}: {exc}") from exc
        if a.jwks_url is not None:
            self._http = httpx.AsyncClient()
            sources.append(UrlKeySource(a.jwks_url, self._http, cache_s=a.jwks_cache_s))
        if self.dev_keys is not None:
            sources.append(StaticKeySource(self.dev_keys.public_jwks(), origin="dev keys"))
        return JwtVerifier(
            a,
            ChainedKeySource(*sources) if sources else None,
            hs256_secret=self.dev_keys.hs256_secret if self.dev_keys else None,
        )

    async def _seed_demo_tenants(self) -> None:
        assert self.urls is not None
        if self.urls.owner is None:
            log.warning("demo_tenants_skipped", reason="no owner database URL")
            return
        owner = Database(self.urls.owner, min_size=1, max_size=1, name="owner")
        async with owner, owner.control() as session:
            for t in DEMO_TENANTS:
                await add_tenant(session, t.id, name=t.name, home_region=t.region, exist_ok=True)

    async def stop(self) -> None:
        if self.events is not None:
            await self.events.stop()  # drains the request log: before the database closes
        if self._tracing is not None:
            await anyio.to_thread.run_sync(self._tracing.shutdown)  # flushes the spans
        if self._gateway_http is not None:
            await self._gateway_http.aclose()
        if self.gateway is not None:
            await self.gateway.stop()  # drains the ledger: before the database closes
        if self.changes is not None:
            await self.changes.stop()
        if self.owner_db is not None:
            await self.owner_db.close()
        if self.db is not None:
            await self.db.close()
        if self._http is not None:
            await self._http.aclose()
        if self.embedded is not None:
            await anyio.to_thread.run_sync(self.embedded.stop)

    def dev_token(self, tenant_id: str) -> str:
        if self.dev_keys is None:
            raise ConfigError("dev tokens exist only in dev mode")
        a = self.settings.auth
        return self.dev_keys.mint(
            tenant_id,
            issuer=a.issuer,
            audience=a.audience,
            ttl_s=a.dev_token_ttl_s,
            tenant_claim=a.tenant_claim,
        )


def create_app(settings: Settings, *, platform: Platform | None = None) -> FastAPI:
    """The ASGI app of one ragplane process.

    Without ``platform`` the app's lifespan starts and stops one (tests, ASGI
    servers); with an already started ``platform`` the caller owns its lifecycle
    (the CLI starts it first, so start-up errors are reported before serving).
    """
    owned = platform is None
    plat = platform if platform is not None else Platform(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owned:
            await plat.start()
        app.state.platform = plat
        app.state.db = plat.db
        app.state.edge = plat.edge
        try:
            yield
        finally:
            if owned:
                await plat.stop()

    app = FastAPI(
        title="ragplane",
        version=__version__,
        description="Edge, RAG service and LLM gateway over a tenant-isolated data plane.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, trusted_proxies=settings.edge.trusted_proxies)
    app.include_router(platform_router)
    app.include_router(documents_router)
    app.include_router(kbmodel_router)
    app.include_router(chat_router)
    app.include_router(admin_router)
    app.mount("/gateway", _GatewayMount(plat))
    return app


class _GatewayMount:
    """The in-process LLM gateway at ``/gateway`` (its app exists once the platform started)."""

    def __init__(self, platform: Platform) -> None:
        self._platform = platform

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self._platform.gateway
        if gateway is None:
            response = JSONResponse({"error": {"code": "starting", "message": "not started"}}, 503)
            await response(scope, receive, send)
            return
        await gateway.app(scope, receive, send)


class _GatewayServer(_GatewayMount):
    """The gateway alone at the root, with the platform's lifecycle on ASGI lifespan
    (no routing layer in between: this is the gateway's hot path)."""

    def __init__(self, platform: Platform, *, owned: bool) -> None:
        super().__init__(platform)
        self._owned = owned

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._owned:
                        await self._platform.start()
                except RagplaneError as exc:  # reported by the server, which then exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._owned:
                        await self._platform.stop()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def create_gateway_app(settings: Settings, *, platform: Platform | None = None) -> ASGIApp:
    """The gateway alone (``ragplane serve gateway``), with the platform's lifecycle."""
    owned = platform is None
    return _GatewayServer(platform if platform is not None else Platform(settings), owned=owned)
