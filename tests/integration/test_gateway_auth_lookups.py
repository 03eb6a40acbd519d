"""Gateway auth: concurrent calls for one tenant share one registry look-up (real
Postgres), so an expired cache entry under load is one query, not a burst."""

from __future__ import annotations

import asyncio

import pytest

from ragplane.control.tenants import Tenant, TenantRegistry
from ragplane.data import Database
from ragplane.errors import Forbidden
from ragplane.gateway.auth import GatewayAuth

SERVICE_KEY = "svc-auth-lookups-0123456789"


class CountingRegistry(TenantRegistry):
    """The real registry; counts the calls that reach it, and can hold them."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, ttl_s=60)
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def get(self, tenant_id: str) -> Tenant:
        self.calls += 1
        await self.gate.wait()
        return await super().get(tenant_id)


def _auth(registry: TenantRegistry, db: Database) -> GatewayAuth:
    return GatewayAuth(service_keys=(SERVICE_KEY,), db=db, registry=registry)


async def test_concurrent_calls_share_one_lookup(app_db: Database) -> None:
    registry = CountingRegistry(app_db)
    auth = _auth(registry, app_db)
    principals = await asyncio.gather(
        *(auth.authenticate(SERVICE_KEY, "tnt_alpha") for _ in range(20))
    )
    assert {p.tenant_id for p in principals} == {"tnt_alpha"}
    assert {p.region for p in principals} == {"eu"}
    assert registry.calls == 1
    await auth.authenticate(SERVICE_KEY, "tnt_alpha")  # later calls: the accepted-call cache
    assert registry.calls == 1


async def test_an_accepted_call_is_checked_again_after_the_cache_time(app_db: Database) -> None:
    registry = CountingRegistry(app_db)
    auth = GatewayAuth(service_keys=(SERVICE_KEY,), db=app_db, registry=registry, cache_s=0.05)
    await auth.authenticate(SERVICE_KEY, "tnt_alpha")
    await auth.authenticate(SERVICE_KEY, "tnt_alpha")
    assert registry.calls == 1
    await asyncio.sleep(0.06)
    await auth.authenticate(SERVICE_KEY, "tnt_alpha")
    assert registry.calls == 2
    with pytest.raises(Forbidden):  # another tenant header is another entry, checked anew
        await auth.authenticate(SERVICE_KEY, "tnt_nobody")


async def test_concurrent_calls_for_an_unknown_tenant_all_refused(app_db: Database) -> None:
    registry = CountingRegistry(app_db)
    auth = _auth(registry, app_db)
    results = await asyncio.gather(
        *(auth.authenticate(SERVICE_KEY, "tnt_nobody") for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Forbidden) for r in results)
    assert registry.calls == 1


async def test_a_cancelled_lookup_does_not_cancel_the_waiting_calls(app_db: Database) -> None:
    registry = CountingRegistry(app_db)
    registry.gate.clear()
    auth = _auth(registry, app_db)
    leader = asyncio.create_task(auth.authenticate(SERVICE_KEY, "tnt_beta"))
    await asyncio.sleep(0.01)
    followers = [asyncio.create_task(auth.authenticate(SERVICE_KEY, "tnt_beta")) for _ in range(3)]
    await asyncio.sleep(0.01)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    registry.gate.set()
    principals = await asyncio.gather(*followers)
    assert {p.tenant_id for p in principals} == {"tnt_beta"}
    assert registry.calls == 2  # the cancelled look-up, then one of the waiting calls'
