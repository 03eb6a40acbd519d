"""The gateway's long-lived parts, started and stopped together.

:class:`Gateway` builds the transports (one shared aiohttp session for HTTP
providers, the local providers), the breaker and bulkheads (in-process, or in Redis
when ``gateway.redis_url`` is set), the ledger sink, the router and the ASGI app.
``ragplane up`` mounts the app at ``/gateway`` of the platform; ``ragplane serve
gateway`` serves it alone.
"""

from __future__ import annotations

from ragplane.config import Settings
from ragplane.control.changes import ControlChanges
from ragplane.control.tenants import TenantRegistry
from ragplane.data.db import Database
from ragplane.gateway.app import GatewayApp
from ragplane.gateway.auth import GatewayAuth
from ragplane.gateway.breaker import build_resilience
from ragplane.gateway.ledger import LedgerSink
from ragplane.gateway.router import Router
from ragplane.gateway.transport import build_transports, close_transports
from ragplane.gateway.types import Transport

__all__ = ["Gateway"]


class Gateway:
    def __init__(
        self,
        settings: Settings,
        db: Database | None,
        *,
        registry: TenantRegistry | None = None,
        changes: ControlChanges | None = None,
        transports: dict[str, Transport] | None = None,
        service_keys: tuple[str, ...] = (),
    ) -> None:
        """``changes``: the process's listener for control-plane changes, if it has one
        (the platform's); without one, the gateway listens itself when it has ``db``.
        ``service_keys``: accepted beside ``gateway.service_keys`` (the key the AI service
        in the same process calls with)."""
        gs = settings.gateway
        edge = settings.edge
        self.settings = settings
        self._own_changes = changes is None and db is not None
        if changes is None and db is not None:
            changes = ControlChanges(db)
        self.changes = changes
        self.transports = transports if transports is not None else build_transports(gs)
        self.breaker, self.bulkhead, self._close_state = build_resilience(gs)
        self.ledger = LedgerSink.from_settings(db, settings) if db is not None else None
        self.router = Router(
            gs,
            transports=self.transports,
            breaker=self.breaker,
            bulkhead=self.bulkhead,
            ledger=self.ledger,
        )
        self.auth = GatewayAuth(
            service_keys=tuple(k.get_secret_value() for k in gs.service_keys) + service_keys,
            db=db,
            registry=registry
            if registry is not None
            else (
                TenantRegistry(
                    db,
                    ttl_s=edge.tenant_cache_s,
                    changes=changes,
                    listening_ttl_s=edge.tenant_cache_listening_s,
                )
                if db
                else None
            ),
            cache_s=edge.tenant_cache_s,
            changes=changes,
            listening_cache_s=edge.tenant_cache_listening_s,
        )
        self.app = GatewayApp(self.router, self.auth, self.breaker)

    async def start(self) -> None:
        if self._own_changes and self.changes is not None:
            await self.changes.start()
        if self.ledger is not None:
            await self.ledger.start()

    async def stop(self) -> None:
        """Drain the ledger, then close the upstream connections and shared state."""
        try:
            if self.ledger is not None:
                await self.ledger.stop()
        finally:
            if self._own_changes and self.changes is not None:
                await self.changes.stop()
            await close_transports(self.transports.values())
            await self._close_state()
