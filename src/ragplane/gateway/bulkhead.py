"""Bulkheads: how many calls may be in flight at once, per tenant and per route, in two
pools (``interactive`` and ``batch``) with their own limits (``BulkheadSettings``).

A slot is taken for one upstream attempt and given back when it ends — normally, by an
exception or by cancellation::

    async with bulkhead.slot(tenant_id, route.name, pool):
        ...  # the upstream call

Taking a slot never waits: when either limit is reached it raises
:class:`~ragplane.errors.BulkheadFull` (a 429 with ``Retry-After``; ``scope`` says
whether the tenant's or the route's limit was hit) — a queue would only add latency to
calls that are already too many.

:class:`MemoryBulkhead` counts in-process (one replica). :class:`RedisBulkhead` shares
the counts between replicas: each slot is a lease in a sorted set per tenant and per
route, scored by its expiry, taken and checked by one Lua script. A replica that
crashes leaks its slots only until their leases expire (``lease_s``, longer than any
call's total timeout). While Redis is unreachable, slots are admitted without being
counted (fail open, logged at most every 10 s), as the breaker does.
"""

from __future__ import annotations

import math
import os
import time
from types import TracebackType
from typing import Protocol

import anyio
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ragplane.config import BulkheadSettings
from ragplane.errors import BulkheadFull, StateStoreUnavailable
from ragplane.gateway.types import Pool
from ragplane.observe.logging import get_logger

__all__ = ["Bulkhead", "MemoryBulkhead", "RedisBulkhead", "SlotContext"]

log = get_logger(__name__)


class SlotContext(Protocol):
    """One slot: ``take`` it (raises ``BulkheadFull``), ``give`` it back (once; again is
    a no-op); ``async with`` does both."""

    async def take(self) -> None: ...

    async def give(self) -> None: ...

    async def __aenter__(self) -> None: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Bulkhead(Protocol):
    """Concurrency limits per tenant and per route; ``slot`` raises ``BulkheadFull``."""

    def slot(self, tenant_id: str, route: str, pool: Pool) -> SlotContext: ...

    async def in_flight(self, tenant_id: str, route: str, pool: Pool) -> tuple[int, int]:
        """Slots held now: (by the tenant, on the route) in ``pool``."""
        ...

    async def aclose(self) -> None: ...


def _limits(settings: BulkheadSettings, pool: Pool) -> tuple[int, int]:
    if pool == "batch":
        return settings.per_tenant_batch, settings.per_route_batch
    return settings.per_tenant_interactive, settings.per_route_interactive


def _full(settings: BulkheadSettings, scope: str, tenant_id: str, route: str, pool: Pool) -> None:
    limit = _limits(settings, pool)[0 if scope == "tenant" else 1]
    who = f"tenant {tenant_id!r}" if scope == "tenant" else f"route {route!r}"
    raise BulkheadFull(
        f"{who} already has {limit} {pool} calls in flight",
        retry_after_s=settings.retry_after_s,
        scope=scope,
        route=route,
    )


class _Slot:
    """``async with`` over ``take``/``give``."""

    __slots__ = ()

    async def take(self) -> None:
        raise NotImplementedError

    async def give(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.give()


class _MemorySlot(_Slot):
    __slots__ = ("_bulkhead", "_held", "_pool", "_route", "_tenant")

    def __init__(self, bulkhead: MemoryBulkhead, tenant_id: str, route: str, pool: Pool) -> None:
        self._bulkhead, self._tenant, self._route, self._pool = bulkhead, tenant_id, route, pool
        self._held = False

    async def take(self) -> None:
        bulkhead, pool = self._bulkhead, self._pool
        settings = bulkhead._settings
        tenant_limit, route_limit = _limits(settings, pool)
        tkey, rkey = (self._tenant, pool), (self._route, pool)
        held_t = bulkhead._tenants.get(tkey, 0)
        if held_t >= tenant_limit:
            _full(settings, "tenant", self._tenant, self._route, pool)
        held_r = bulkhead._routes.get(rkey, 0)
        if held_r >= route_limit:
            _full(settings, "route", self._tenant, self._route, pool)
        bulkhead._tenants[tkey] = held_t + 1
        bulkhead._routes[rkey] = held_r + 1
        self._held = True

    async def give(self) -> None:
        if not self._held:
            return
        self._held = False
        bulkhead, pool = self._bulkhead, self._pool
        for counts, key in (
            (bulkhead._tenants, (self._tenant, pool)),
            (bulkhead._routes, (self._route, pool)),
        ):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)


class MemoryBulkhead:
    """In-process counts: taking and giving back a slot are plain dict updates."""

    def __init__(self, settings: BulkheadSettings) -> None:
        self._settings = settings
        self._tenants: dict[tuple[str, Pool], int] = {}
        self._routes: dict[tuple[str, Pool], int] = {}

    def slot(self, tenant_id: str, route: str, pool: Pool) -> SlotContext:
        return _MemorySlot(self, tenant_id, route, pool)

    async def in_flight(self, tenant_id: str, route: str, pool: Pool) -> tuple[int, int]:
        return self._tenants.get((tenant_id, pool), 0), self._routes.get((route, pool), 0)

    async def aclose(self) -> None:
        self._tenants.clear()
        self._routes.clear()


# KEYS: tenant set, route set. ARGV: lease id, lease_ms, tenant limit, route limit.
# → 0 taken, 1 tenant full, 2 route full
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 2 end
redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[1])
redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease_ms)
redis.call('PEXPIRE', KEYS[2], lease_ms)
return 0
"""

# KEYS: tenant set, route set. → {live leases of the tenant, of the route}
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('ZCOUNT', KEYS[1], now + 1, '+inf'),
        redis.call('ZCOUNT', KEYS[2], now + 1, '+inf')}
"""


class _RedisSlot(_Slot):
    __slots__ = ("_bulkhead", "_held", "_keys", "_lease", "_pool", "_route", "_tenant")

    def __init__(self, bulkhead: RedisBulkhead, tenant_id: str, route: str, pool: Pool) -> None:
        self._bulkhead, self._tenant, self._route, self._pool = bulkhead, tenant_id, route, pool
        self._keys = bulkhead._keys_of(tenant_id, route, pool)
        self._lease = os.urandom(9).hex()
        self._held = False

    async def take(self) -> None:
        self._held = await self._bulkhead._take(
            self._keys, self._lease, self._tenant, self._route, self._pool
        )

    async def give(self) -> None:
        if self._held:
            self._held = False
            await self._bulkhead._give(self._keys, self._lease)


class RedisBulkhead:
    """Counts shared by replicas through Redis (leases in sorted sets, Lua to take one)."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: BulkheadSettings,
        *,
        prefix: str = "ragplane:",
        lease_s: float = 600.0,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._settings = settings
        self._prefix = prefix
        self._lease_ms = math.ceil(lease_s * 1000)
        self._owns_client = owns_client
        self._take_script = client.register_script(_TAKE)
        self._count_script = client.register_script(_COUNT)
        self._unavailable_logged_at = -10.0

    def slot(self, tenant_id: str, route: str, pool: Pool) -> SlotContext:
        return _RedisSlot(self, tenant_id, route, pool)

    def _keys_of(self, tenant_id: str, route: str, pool: Pool) -> list[str]:
        return [
            f"{self._prefix}bulkhead:tenant:{pool}:{tenant_id}",
            f"{self._prefix}bulkhead:route:{pool}:{route}",
        ]

    async def _take(
        self, keys: list[str], lease: str, tenant_id: str, route: str, pool: Pool
    ) -> bool:
        """Take a slot (True), or admit without one while Redis is unreachable (False)."""
        tenant_limit, route_limit = _limits(self._settings, pool)
        try:
            full = await self._take_script(
                keys=keys, args=[lease, self._lease_ms, tenant_limit, route_limit]
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            now = time.monotonic()
            if now - self._unavailable_logged_at >= 10.0:
                self._unavailable_logged_at = now
                log.warning("bulkhead_store_unavailable", route=route, error=str(exc))
            return False
        if full:
            _full(self._settings, "tenant" if full == 1 else "route", tenant_id, route, pool)
        return True

    async def _give(self, keys: list[str], lease: str) -> None:
        # shielded: a cancelled call must still give its slot back (bounded, so a dead
        # Redis cannot hold the cancellation up; the lease expires in that case)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.zrem(keys[0], lease)
                    pipe.zrem(keys[1], lease)
                    await pipe.execute()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("bulkhead_release_failed", key=keys[1], error=str(exc))

    async def in_flight(self, tenant_id: str, route: str, pool: Pool) -> tuple[int, int]:
        keys = self._keys_of(tenant_id, route, pool)
        try:
            held_t, held_r = await self._count_script(keys=keys, args=[])
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateStoreUnavailable(f"bulkhead state store: {exc}") from exc
        return int(held_t), int(held_r)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
