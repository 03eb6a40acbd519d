"""Who may call the gateway, and for which tenant.

Two kinds of gateway keys, sent as ``Authorization: Bearer <key>`` (OpenAI SDK) or
``x-api-key: <key>`` (Anthropic SDK):

- a **service key** (``gateway.service_keys``): a platform service such as the AI
  service; it acts for the tenant named in ``X-Tenant-Id``, which must be registered;
- a **virtual key**: a tenant-bound API key from the control plane (``ragplane keys
  create --scope gateway``); the tenant comes from the key, and an ``X-Tenant-Id``
  naming another tenant is refused.

Verified keys are cached: for ``edge.tenant_cache_listening_s`` while control-plane
changes are pushed (:class:`~ragplane.control.changes.ControlChanges`: a change to a
tenant or its keys forgets its entries at once), else for ``edge.tenant_cache_s``; the
hot path makes no database round trip. An accepted (key, ``X-Tenant-Id``) pair is
remembered as a whole, so a repeat call costs one dictionary look-up: no hashing (OpenSSL's
SHA-256 showed in the gateway's profile), no registry look-up. The look-up is keyed
by the key itself; Python's string hashing is keyed per process, so its timing tells
an attacker nothing about how much of a guess was right.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass

from ragplane.config import Region
from ragplane.control.apikeys import KEY_PREFIX, find_api_key
from ragplane.control.changes import ControlChanges, cache_ttl
from ragplane.control.tenants import Tenant, TenantRegistry
from ragplane.data.db import Database
from ragplane.errors import Forbidden, TenantNotFound, Unauthorized

__all__ = ["GATEWAY_SCOPE", "GatewayAuth", "GatewayPrincipal"]

GATEWAY_SCOPE = "gateway"


@dataclass(frozen=True, slots=True)
class GatewayPrincipal:
    tenant_id: str
    service: bool  # a service key: request ids from the caller are honoured
    key_id: str
    region: Region | None = None  # the tenant's home region (routes are pinned to it)


class GatewayAuth:
    def __init__(
        self,
        *,
        service_keys: tuple[str, ...],
        db: Database | None,
        registry: TenantRegistry | None,
        cache_s: float = 5.0,
        changes: ControlChanges | None = None,
        listening_cache_s: float = 300.0,
    ) -> None:
        self._service = tuple(hashlib.sha256(k.encode()).digest() for k in service_keys)
        self._db = db
        self._registry = registry
        self._cache_s = cache_s
        self._changes = changes
        self._listening_cache_s = listening_cache_s
        self._lookups: dict[str, asyncio.Future[Tenant]] = {}  # tenant → registry look-up
        # (key, X-Tenant-Id, need_tenant) → (when, principal) of accepted calls
        self._accepted: dict[tuple[str, str | None, bool], tuple[float, GatewayPrincipal]] = {}
        self._generation = 0  # moves on every forget
        if changes is not None:
            changes.subscribe(self.forget)

    def forget(self, tenant_id: str | None) -> None:
        """Drop the accepted calls of ``tenant_id`` (``None``: all of them): its registry
        row or its keys changed."""
        self._generation += 1
        if tenant_id is None:
            self._accepted.clear()
            return
        for cache_key in [k for k, (_, p) in self._accepted.items() if p.tenant_id == tenant_id]:
            del self._accepted[cache_key]

    async def authenticate(
        self, key: str | None, tenant_header: str | None, *, need_tenant: bool = True
    ) -> GatewayPrincipal:
        """The caller; ``need_tenant=False`` (listings, health) lets a service key name none."""
        if not key:
            raise Unauthorized("a gateway key is required (Authorization: Bearer, or x-api-key)")
        cache_key = (key, tenant_header, need_tenant)
        hit = self._accepted.get(cache_key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < cache_ttl(
            self._changes, self._cache_s, self._listening_cache_s
        ):
            return hit[1]
        generation = self._generation
        principal = await self._verify(key, tenant_header, need_tenant=need_tenant)
        if len(self._accepted) > 10_000:
            self._accepted.clear()
        if generation == self._generation:  # not forgotten while it was verified
            self._accepted[cache_key] = (now, principal)
        return principal

    async def _verify(
        self, key: str, tenant_header: str | None, *, need_tenant: bool
    ) -> GatewayPrincipal:
        digest = hashlib.sha256(key.encode()).digest()
        for i, known in enumerate(self._service):
            if hmac.compare_digest(digest, known):
                if not tenant_header:
                    if not need_tenant:
                        return GatewayPrincipal(tenant_id="", service=True, key_id=f"service:{i}")
                    raise Forbidden("a service key must name the tenant in X-Tenant-Id")
                region = await self._home_region(tenant_header)
                return GatewayPrincipal(
                    tenant_id=tenant_header, service=True, key_id=f"service:{i}", region=region
                )
        tenant_id, key_id = await self._virtual_key(key)
        if tenant_header and tenant_header != tenant_id:
            raise Forbidden("X-Tenant-Id names another tenant than the key's")
        region = await self._home_region(tenant_id)
        return GatewayPrincipal(tenant_id=tenant_id, service=False, key_id=key_id, region=region)

    async def _virtual_key(self, key: str) -> tuple[str, str]:
        if self._db is None or not key.startswith(KEY_PREFIX):
            raise Unauthorized("gateway key is not valid", code="invalid_api_key")
        async with self._db.control() as session:
            found = await find_api_key(session, key)
        if found is None or found.revoked:
            raise Unauthorized(
                "gateway key is not valid (unknown or revoked)", code="invalid_api_key"
            )
        if GATEWAY_SCOPE not in found.scopes:
            raise Forbidden(f"this API key lacks the {GATEWAY_SCOPE!r} scope")
        return found.tenant_id, found.id

    async def _home_region(self, tenant_id: str) -> Region | None:
        """The registered, active tenant's home region (cached by the registry)."""
        if self._registry is None:
            return None
        try:
            tenant = await self._tenant(self._registry, tenant_id)
        except TenantNotFound as exc:
            raise Forbidden(f"tenant {tenant_id!r} is not registered") from exc
        if not tenant.active:
            raise Forbidden(f"tenant {tenant_id!r} is {tenant.status}")
        return tenant.home_region

    async def _tenant(self, registry: TenantRegistry, tenant_id: str) -> Tenant:
        """The registry's tenant, one look-up at a time per tenant: when the registry's
        cached entry expires under load, one call reads the database and the calls that
        arrive meanwhile wait for its answer, instead of each queueing for a pooled
        connection (a burst of concurrency-many queries every ``tenant_cache_s``, which
        showed in the p99)."""
        while (pending := self._lookups.get(tenant_id)) is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this call was cancelled
                # the call doing the look-up was cancelled: join the next one, or do it
        pending = asyncio.get_running_loop().create_future()
        self._lookups[tenant_id] = pending
        try:
            tenant = await registry.get(tenant_id)
        except asyncio.CancelledError:
            pending.cancel()
            raise
        except Exception as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved, whether or not another call waits for it
            raise
        finally:
            if self._lookups.get(tenant_id) is pending:
                del self._lookups[tenant_id]
        pending.set_result(tenant)
        return tenant
