"""The fault suite: every provider fault the mock can inject, through the gateway.

Failures before the first token must all recover by retry or failover when a healthy
route exists; a stream that breaks after its first token must end with an explicit
error event (never silently); breakers open, probe and close; shared breaker state in
Redis is seen by a second gateway; bulkhead overflow is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from pydantic import SecretStr

from ragplane.config import GatewaySettings
from ragplane.data.db import Database
from ragplane.gateway.mockprovider import FaultRule, MockProviderConfig, run_mock_provider
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import PROVIDER_KEY, SERVICE_KEY, running_gateway

TENANT = "tnt_alpha"
HEADERS = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": TENANT}
ANTHROPIC_HEADERS = {
    "x-api-key": SERVICE_KEY,
    "x-tenant-id": TENANT,
    "anthropic-version": "2023-06-01",
}

# faults a provider can show before the first token reaches the caller
BEFORE_FIRST_TOKEN = [
    "429:retry-after=0",
    "500",
    "502",
    "503",
    "529",
    "refuse",
    "hang",
    "malformed:0",
]


def _settings(bad_url: str, good_url: str, **alias_overrides: Any) -> GatewaySettings:
    policy: dict[str, Any] = {
        "retry": {"attempts": 2, "base_s": 0.0, "max_backoff_s": 0.0, "total_s": 10.0},
        "timeouts": {"connect_s": 1.0, "ttft_s": 0.5, "idle_s": 0.5, "total_s": 10.0},
        # these tests look at failover, not at the breaker: keep it closed
        "breaker": {"consecutive_failures": 1000, "min_calls": 1000},
    }
    policy.update(alias_overrides)
    return GatewaySettings.model_validate(
        {
            "providers": {
                "bad": {"type": "openai", "base_url": f"{bad_url}/v1", "api_key": PROVIDER_KEY},
                "good": {"type": "openai", "base_url": f"{good_url}/v1", "api_key": PROVIDER_KEY},
                "bad-anthropic": {
                    "type": "anthropic",
                    "base_url": bad_url,
                    "api_key": PROVIDER_KEY,
                },
            },
            "models": {
                "bad": {"provider": "bad", "upstream": "mock-gpt"},
                "good": {"provider": "good", "upstream": "mock-gpt"},
                "bad-claude": {"provider": "bad-anthropic", "upstream": "mock-claude"},
            },
            "aliases": {
                "failover": {"routes": [{"model": "bad"}, {"model": "good"}], **policy},
                "only-bad": {"routes": [{"model": "bad"}], **policy},
                "only-bad-claude": {"routes": [{"model": "bad-claude"}], **policy},
            },
            "service_keys": [SecretStr(SERVICE_KEY)],
        }
    )


@pytest.fixture
async def mocks() -> AsyncIterator[tuple[Any, Any]]:
    async with AsyncExitStack() as stack:
        bad = await stack.enter_async_context(
            run_mock_provider(MockProviderConfig(api_key=PROVIDER_KEY), shutdown_timeout_s=0.5)
        )
        good = await stack.enter_async_context(
            run_mock_provider(MockProviderConfig(api_key=PROVIDER_KEY))
        )
        yield bad, good


async def _chat(client: httpx.AsyncClient, url: str, alias: str, *, stream: bool) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "tell me"}], "stream": stream}
    return await client.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)


def _events(text: str) -> list[dict[str, Any] | str]:
    out: list[dict[str, Any] | str] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


@pytest.mark.parametrize("fault", BEFORE_FIRST_TOKEN)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_failures_before_the_first_token_fail_over(
    fault: str,
    stream: bool,
    mocks: tuple[Any, Any],
    clean_db: PgCluster,
    app_db: Database,
    tmp_path: Path,
) -> None:
    bad, good = mocks
    bad.set_faults(fault)
    settings = make_settings(clean_db, tmp_path, gateway=_settings(bad.url, good.url))
    n = 5
    async with running_gateway(settings, app_db) as (gw, url), httpx.AsyncClient(timeout=20) as c:
        responses = await asyncio.gather(
            *(_chat(c, url, "failover", stream=stream) for _ in range(n))
        )
        assert gw.ledger is not None
        await gw.ledger.stop()
    assert [r.status_code for r in responses] == [200] * n  # 100% recovered
    for r in responses:
        assert r.headers["x-ragplane-route"] == "failover/good"
        if stream:
            events = _events(r.text)
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
        else:
            assert r.json()["choices"][0]["message"]["content"]
    assert bad.stats.faults  # the fault really happened
    assert good.stats.total == n
    with psycopg.connect(clean_db.superuser_url) as conn:
        rows = conn.execute("SELECT status, attempts, route FROM llm_ledger").fetchall()
    assert len(rows) == n
    # two tries on the bad route (attempts=2), then the good one
    assert {(s, a, r) for s, a, r in rows} == {("ok", 3, "failover/good")}


async def test_the_retry_time_budget_counts_from_the_start_of_the_call(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    # the retry budget is made at the first failure; its clock still starts with the call
    bad, _ = mocks
    bad.set_faults("hang")
    gateway = _settings(
        bad.url,
        bad.url,
        retry={"attempts": 10, "base_s": 0.0, "max_backoff_s": 0.0, "total_s": 0.8},
        # a hung try ends connect_s + ttft_s after it began: 0.5 s
        timeouts={"connect_s": 0.2, "ttft_s": 0.3, "idle_s": 0.5, "total_s": 10.0},
    )
    settings = make_settings(clean_db, tmp_path, gateway=gateway)
    async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient(timeout=20) as c:
        response = await _chat(c, url, "only-bad", stream=False)
    assert response.status_code == 504, response.text
    # the second hung try ends 1.0 s after the call began, past its 0.8 s: no third
    assert bad.stats.total == 2


async def test_a_route_that_turns_degraded_goes_behind_the_healthy_one(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    """The router keeps each alias's plan until a route's health changes: a route whose
    p95 breaks its SLO is tried after the healthy one from the next call on."""
    _, good = mocks
    config = MockProviderConfig(api_key=PROVIDER_KEY, latency_ms=120)
    async with run_mock_provider(config) as slow:
        breaker = {"slo_p95_ms": 50, "min_calls": 2, "consecutive_failures": 1000}
        gs = _settings(slow.url, good.url, breaker=breaker)
        settings = make_settings(clean_db, tmp_path, gateway=gs)
        async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient() as c:
            routes = [
                (await _chat(c, url, "failover", stream=False)).headers["x-ragplane-route"]
                for _ in range(5)
            ]
    assert routes == ["failover/bad"] * 2 + ["failover/good"] * 3
    assert (slow.stats.total, good.stats.total) == (2, 3)


async def test_a_weighted_alias_spreads_calls_by_weight_and_never_leads_with_weight_zero(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    """Weighted aliases draw their order per call (never from the kept plan); a route
    of weight 0 is only a fallback."""
    one, three = mocks  # both healthy here
    gs = _settings(one.url, three.url)
    weighted = {
        "strategy": "weighted",
        "routes": [{"model": "bad", "weight": 1}, {"model": "good", "weight": 3}],
    }
    spare = {"strategy": "weighted", "routes": [{"model": "bad", "weight": 0}, {"model": "good"}]}
    aliases = {**gs.aliases, "weighted": weighted, "spare": spare}
    gs = GatewaySettings.model_validate({**gs.model_dump(), "aliases": aliases})
    settings = make_settings(clean_db, tmp_path, gateway=gs)
    n = 200
    async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient() as c:
        routes = [
            (await _chat(c, url, "weighted", stream=False)).headers["x-ragplane-route"]
            for _ in range(n)
        ]
        spares = {
            (await _chat(c, url, "spare", stream=False)).headers["x-ragplane-route"]
            for _ in range(20)
        }
    share = routes.count("weighted/good") / n
    assert 0.62 < share < 0.88  # 0.75 expected; outside this band p < 1e-4
    assert spares == {"spare/good"}


@pytest.mark.parametrize("fault", ["cut:5", "malformed:5", "stall:5"])
@pytest.mark.parametrize("alias", ["only-bad", "only-bad-claude"])
async def test_a_stream_broken_after_the_first_token_ends_with_an_error_event(
    fault: str,
    alias: str,
    clean_db: PgCluster,
    app_db: Database,
    tmp_path: Path,
) -> None:
    # paced, so the first tokens reach the caller before the fault (unpaced, the whole
    # stream can arrive in one read: still before the first byte, and rightly retried)
    paced = MockProviderConfig(api_key=PROVIDER_KEY, tokens_per_s=100)
    async with AsyncExitStack() as stack:
        bad = await stack.enter_async_context(run_mock_provider(paced, shutdown_timeout_s=0.5))
        bad.set_faults(fault)
        settings = make_settings(clean_db, tmp_path, gateway=_settings(bad.url, bad.url))
        gw, url = await stack.enter_async_context(running_gateway(settings, app_db))
        c = await stack.enter_async_context(httpx.AsyncClient(timeout=20))
        # both caller protocols: OpenAI chat completions and Anthropic messages
        openai_r = await _chat(c, url, alias, stream=True)
        anthropic_r = await c.post(
            f"{url}/v1/messages",
            json={
                "model": alias,
                "max_tokens": 64,
                "stream": True,
                "messages": [{"role": "user", "content": "tell me"}],
            },
            headers=ANTHROPIC_HEADERS,
        )
        assert gw.ledger is not None
        await gw.ledger.stop()
    assert openai_r.status_code == 200
    events = _events(openai_r.text)
    assert "[DONE]" not in events  # no fake success
    last = events[-1]
    assert isinstance(last, dict)
    assert last["error"]["code"] == "stream_interrupted"
    assert openai_r.headers["x-request-id"] in last["error"]["message"]
    assert any(isinstance(e, dict) and e.get("choices") for e in events)  # tokens did flow
    assert anthropic_r.status_code == 200
    assert "event: message_stop" not in anthropic_r.text
    blocks = [b for b in anthropic_r.text.split("\n\n") if b.strip()]
    assert blocks[-1].startswith("event: error")
    assert "content_block_delta" in anthropic_r.text
    with psycopg.connect(clean_db.superuser_url) as conn:
        statuses = [s for (s,) in conn.execute("SELECT status FROM llm_ledger")]
    assert statuses == ["stream_interrupted", "stream_interrupted"]


async def test_no_silent_truncation_under_random_faults(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    """Every stream ends with its proper end or an explicit error event, never neither."""
    bad, good = mocks
    bad.set_faults(*[FaultRule(s, rate=0.15) for s in ("cut:2", "malformed:4", "500", "refuse")])
    settings = make_settings(clean_db, tmp_path, gateway=_settings(bad.url, good.url))
    n = 60
    async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient(timeout=20) as c:
        responses = await asyncio.gather(
            *(_chat(c, url, "only-bad", stream=True) for _ in range(n))
        )
    endings = {"done": 0, "error_event": 0, "error_status": 0}
    for r in responses:
        if r.status_code != 200:
            endings["error_status"] += 1
            assert r.json()["error"]["message"]
            continue
        last = _events(r.text)[-1]
        if last == "[DONE]":
            endings["done"] += 1
        else:
            assert isinstance(last, dict)
            assert "error" in last
            endings["error_event"] += 1
    assert sum(endings.values()) == n
    assert endings["done"] > 0
    assert endings["error_event"] > 0  # the suite really cut streams


async def test_breaker_opens_rejects_fast_then_probes_and_closes(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    bad, good = mocks
    bad.set_faults("503")
    breaker = {"consecutive_failures": 3, "min_calls": 100, "cooldown_s": 0.5}
    gs = _settings(bad.url, good.url, breaker=breaker)
    settings = make_settings(clean_db, tmp_path, gateway=gs)
    async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient(timeout=20) as c:
        first = [await _chat(c, url, "only-bad", stream=False) for _ in range(2)]  # 2 tries each
        assert [r.status_code for r in first] == [502, 502]  # the provider failed
        seen = bad.stats.total
        assert seen == 3  # opened after the 3rd consecutive failure
        rejected = await _chat(c, url, "only-bad", stream=False)
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "no_healthy_route"
        assert bad.stats.total == seen  # an open circuit sends nothing upstream
        health = (await c.get(f"{url}/v1/health/routes", headers=HEADERS)).json()
        assert health["aliases"]["only-bad"]["status"] == "offline_cache"
        assert health["aliases"]["only-bad"]["routes"][0]["state"] == "open"
        bad.set_faults()
        await asyncio.sleep(0.6)  # the cooldown
        probe = await _chat(c, url, "only-bad", stream=False)
        assert probe.status_code == 200
        health = (await c.get(f"{url}/v1/health/routes", headers=HEADERS)).json()
        assert health["aliases"]["only-bad"]["routes"][0]["state"] == "closed"
        assert health["aliases"]["only-bad"]["status"] == "ok"


async def test_two_gateways_sharing_redis_agree_on_an_open_breaker(
    mocks: tuple[Any, Any], clean_db: PgCluster, app_db: Database, tmp_path: Path, clean_redis: str
) -> None:
    bad, good = mocks
    bad.set_faults("500")
    breaker = {"consecutive_failures": 3, "min_calls": 100, "cooldown_s": 30}
    gs = _settings(bad.url, good.url, breaker=breaker).model_copy(
        update={"redis_url": SecretStr(clean_redis)}
    )
    settings = make_settings(clean_db, tmp_path, gateway=gs)
    async with (
        running_gateway(settings, app_db) as (_, url_a),
        running_gateway(settings, app_db) as (_, url_b),
        httpx.AsyncClient(timeout=20) as c,
    ):
        for _ in range(2):
            await _chat(c, url_a, "only-bad", stream=False)
        opened = time.monotonic()
        seen_by_b = None
        while time.monotonic() - opened < 1.0:
            health = (await c.get(f"{url_b}/v1/health/routes", headers=HEADERS)).json()
            if health["aliases"]["only-bad"]["routes"][0]["state"] == "open":
                seen_by_b = time.monotonic() - opened
                break
            await asyncio.sleep(0.02)
        assert seen_by_b is not None, "gateway B did not see the breaker gateway A opened"
        before = bad.stats.total
        r = await _chat(c, url_b, "only-bad", stream=False)
        assert r.status_code == 503
        assert bad.stats.total == before


async def test_bulkhead_overflow_is_429_with_retry_after(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    config = MockProviderConfig(api_key=PROVIDER_KEY, latency_ms=300)
    async with run_mock_provider(config) as slow:
        gs = _settings(slow.url, slow.url)
        gs = gs.model_copy(
            update={"bulkheads": gs.bulkheads.model_copy(update={"per_tenant_interactive": 2})}
        )
        settings = make_settings(clean_db, tmp_path, gateway=gs)
        async with (
            running_gateway(settings, app_db) as (_, url),
            httpx.AsyncClient(timeout=20) as c,
        ):
            responses = await asyncio.gather(
                *(_chat(c, url, "only-bad", stream=False) for _ in range(6))
            )
        assert slow.stats.max_in_flight <= 2
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2, codes
    assert codes.count(429) >= 1, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


async def test_a_stream_holds_its_bulkhead_slot_until_it_ends_or_the_caller_leaves(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    paced = MockProviderConfig(api_key=PROVIDER_KEY, tokens_per_s=20, output_tokens=30)
    async with run_mock_provider(paced, shutdown_timeout_s=0.5) as mock:
        gs = _settings(mock.url, mock.url)
        gs = gs.model_copy(
            update={"bulkheads": gs.bulkheads.model_copy(update={"per_tenant_interactive": 1})}
        )
        settings = make_settings(clean_db, tmp_path, gateway=gs)
        body = {"model": "only-bad", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        async with (
            running_gateway(settings, app_db) as (gw, url),
            httpx.AsyncClient(timeout=20) as c,
        ):
            async with c.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=HEADERS
            ) as r:
                assert r.status_code == 200
                # keep the iterator: one dropped here is finalised at once, and closing it
                # closes the stream's connection (the caller would have left already)
                chunks = r.aiter_bytes()
                await anext(chunks)  # the first token reached us; the stream goes on
                second = await _chat(c, url, "only-bad", stream=False)
                assert second.status_code == 429  # the running stream holds the only slot
                # the caller leaves mid-stream
            third = None
            for _ in range(100):  # the gateway notices the disconnect shortly
                third = await _chat(c, url, "only-bad", stream=False)
                if third.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert third is not None
            assert third.status_code == 200
            assert gw.ledger is not None
            await gw.ledger.stop()
    with psycopg.connect(clean_db.superuser_url) as conn:
        statuses = sorted(s for (s,) in conn.execute("SELECT status FROM llm_ledger"))
    assert "client_closed" in statuses
    assert "concurrency_limit" in statuses
    assert "ok" in statuses
