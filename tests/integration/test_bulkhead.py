"""Bulkheads, in-process and in Redis (the same tests for both): per-tenant and per-route
limits, separate pools, overflow as BulkheadFull with Retry-After, slots given back on
exceptions and cancellation; for Redis also replicas sharing counts and lease expiry."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import anyio
import anyio.abc
import pytest
import structlog

from ragplane.config import BulkheadSettings
from ragplane.errors import BulkheadFull
from ragplane.gateway.breaker import redis_client
from ragplane.gateway.bulkhead import Bulkhead, MemoryBulkhead, RedisBulkhead

SETTINGS = BulkheadSettings(
    per_tenant_interactive=2,
    per_tenant_batch=1,
    per_route_interactive=3,
    per_route_batch=2,
    retry_after_s=3,
)


@pytest.fixture(params=["memory", "redis"])
async def bulkhead(request: pytest.FixtureRequest) -> AsyncIterator[Bulkhead]:
    if request.param == "memory":
        yield MemoryBulkhead(SETTINGS)
        return
    url = request.getfixturevalue("clean_redis")
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    b = RedisBulkhead(redis_client(url), SETTINGS, prefix=prefix, owns_client=True)
    try:
        yield b
    finally:
        await b.aclose()


async def test_tenant_limit_is_per_tenant(bulkhead: Bulkhead) -> None:
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(bulkhead.slot("tnt_a", "chat/r1", "interactive"))
        await stack.enter_async_context(bulkhead.slot("tnt_a", "chat/r2", "interactive"))
        with pytest.raises(BulkheadFull) as caught:
            await stack.enter_async_context(bulkhead.slot("tnt_a", "chat/r3", "interactive"))
        assert (caught.value.scope, caught.value.retry_after_s) == ("tenant", 3)
        assert (caught.value.status_code, caught.value.code) == (429, "concurrency_limit")
        assert "tnt_a" in caught.value.message
        # another tenant is not affected
        await stack.enter_async_context(bulkhead.slot("tnt_b", "chat/r3", "interactive"))
        assert await bulkhead.in_flight("tnt_a", "chat/r3", "interactive") == (2, 1)
    assert await bulkhead.in_flight("tnt_a", "chat/r1", "interactive") == (0, 0)


async def test_route_limit_across_tenants(bulkhead: Bulkhead) -> None:
    async with AsyncExitStack() as stack:
        for tenant in ("tnt_a", "tnt_b", "tnt_c"):
            await stack.enter_async_context(bulkhead.slot(tenant, "chat/r1", "interactive"))
        with pytest.raises(BulkheadFull) as caught:
            await stack.enter_async_context(bulkhead.slot("tnt_d", "chat/r1", "interactive"))
        assert (caught.value.scope, caught.value.route) == ("route", "chat/r1")
        # the refused attempt holds nothing, and other routes are open to tnt_d
        assert await bulkhead.in_flight("tnt_d", "chat/r1", "interactive") == (0, 3)
        await stack.enter_async_context(bulkhead.slot("tnt_d", "chat/r2", "interactive"))


async def test_pools_are_separate(bulkhead: Bulkhead) -> None:
    async with AsyncExitStack() as stack:
        for route in ("chat/r1", "chat/r2"):
            await stack.enter_async_context(bulkhead.slot("tnt_a", route, "interactive"))
        # interactive is full for tnt_a; its batch pool has its own (smaller) limit
        await stack.enter_async_context(bulkhead.slot("tnt_a", "chat/r1", "batch"))
        with pytest.raises(BulkheadFull) as caught:
            await stack.enter_async_context(bulkhead.slot("tnt_a", "chat/r1", "batch"))
        assert caught.value.scope == "tenant"
        assert "batch" in caught.value.message
        assert await bulkhead.in_flight("tnt_a", "chat/r1", "batch") == (1, 1)
        assert await bulkhead.in_flight("tnt_a", "chat/r1", "interactive") == (2, 1)


async def test_a_slot_is_given_back_on_exception(bulkhead: Bulkhead) -> None:
    for _ in range(5):  # more rounds than the limit: nothing leaks
        with pytest.raises(ValueError, match="upstream broke"):
            async with bulkhead.slot("tnt_a", "chat/r1", "interactive"):
                raise ValueError("upstream broke")
    assert await bulkhead.in_flight("tnt_a", "chat/r1", "interactive") == (0, 0)


async def test_a_slot_is_given_back_on_cancellation(bulkhead: Bulkhead) -> None:
    async def call(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with bulkhead.slot("tnt_a", "chat/r1", "interactive"):
            task_status.started()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        await tg.start(call)
        await tg.start(call)
        assert await bulkhead.in_flight("tnt_a", "chat/r1", "interactive") == (2, 2)
        with pytest.raises(BulkheadFull):
            async with bulkhead.slot("tnt_a", "chat/r1", "interactive"):
                pass
        tg.cancel_scope.cancel()
    assert await bulkhead.in_flight("tnt_a", "chat/r1", "interactive") == (0, 0)
    async with bulkhead.slot("tnt_a", "chat/r1", "interactive"):
        pass


# --- Redis only ------------------------------------------------------------------------


async def test_replicas_share_the_counts(clean_redis: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    one = RedisBulkhead(redis_client(clean_redis), SETTINGS, prefix=prefix, owns_client=True)
    two = RedisBulkhead(redis_client(clean_redis), SETTINGS, prefix=prefix, owns_client=True)
    try:
        async with (
            one.slot("tnt_a", "chat/r1", "interactive"),
            two.slot("tnt_a", "chat/r2", "interactive"),
        ):
            with pytest.raises(BulkheadFull):
                async with one.slot("tnt_a", "chat/r3", "interactive"):
                    pass
        assert await two.in_flight("tnt_a", "chat/r1", "interactive") == (0, 0)
    finally:
        await one.aclose()
        await two.aclose()


async def test_slots_of_a_crashed_replica_expire(clean_redis: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    crashed = RedisBulkhead(
        redis_client(clean_redis), SETTINGS, prefix=prefix, lease_s=0.3, owns_client=True
    )
    alive = RedisBulkhead(redis_client(clean_redis), SETTINGS, prefix=prefix, owns_client=True)
    try:
        for route in ("chat/r1", "chat/r2"):  # entered, never exited: the replica died
            await crashed.slot("tnt_a", route, "interactive").__aenter__()
        with pytest.raises(BulkheadFull):
            async with alive.slot("tnt_a", "chat/r3", "interactive"):
                pass
        await anyio.sleep(0.4)
        assert await alive.in_flight("tnt_a", "chat/r1", "interactive") == (0, 0)
        async with alive.slot("tnt_a", "chat/r3", "interactive"):
            pass
    finally:
        await crashed.aclose()
        await alive.aclose()


async def test_redis_unreachable_fails_open() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    b = RedisBulkhead(redis_client(f"redis://127.0.0.1:{port}/0"), SETTINGS, owns_client=True)
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):  # beyond the tenant limit: nothing is counted
                async with b.slot("tnt_a", "chat/r1", "interactive"):
                    pass
        assert [entry["event"] for entry in logs] == ["bulkhead_store_unavailable"]
    finally:
        await b.aclose()
