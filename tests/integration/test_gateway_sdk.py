"""The official OpenAI and Anthropic SDKs, unchanged, against the gateway over HTTP,
with the mock provider (speaking both vendors' wire protocols) upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psycopg
import pytest

from ragplane.control.apikeys import create_api_key, revoke_api_key
from ragplane.data.db import Database
from ragplane.gateway.mockprovider import MockProviderConfig, run_mock_provider
from ragplane.gateway.runtime import Gateway
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import (
    PROVIDER_KEY,
    SERVICE_KEY,
    gateway_settings,
    running_gateway,
)

TENANT = "tnt_alpha"
HEADERS_OPENAI = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": TENANT}


@pytest.fixture
async def mock() -> AsyncIterator[Any]:
    async with run_mock_provider(MockProviderConfig(api_key=PROVIDER_KEY)) as server:
        yield server


@pytest.fixture
async def gateway(
    clean_db: PgCluster, app_db: Database, tmp_path: Path, mock: Any
) -> AsyncIterator[tuple[Gateway, str]]:
    settings = make_settings(clean_db, tmp_path, gateway=gateway_settings(mock.url))
    async with running_gateway(settings, app_db) as running:
        yield running


def _openai(url: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=SERVICE_KEY,
        default_headers={"X-Tenant-Id": TENANT, "X-Feature-Id": "sdk-test"},
        max_retries=0,
        **kw,
    )


def _anthropic(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=url, api_key=SERVICE_KEY, default_headers={"X-Tenant-Id": TENANT}, max_retries=0
    )


def _ledger(pg: PgCluster) -> list[dict[str, Any]]:
    with psycopg.connect(pg.superuser_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM llm_ledger ORDER BY created_at").fetchall()


async def test_openai_chat_non_stream(gateway: tuple[Gateway, str], clean_db: PgCluster) -> None:
    gw, url = gateway
    async with _openai(url) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="fast", messages=[{"role": "user", "content": "say hello to the gateway"}]
        )
        completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-ragplane-overhead-ms"]) >= 0
    assert gw.ledger is not None
    await gw.ledger.stop()
    rows = _ledger(clean_db)
    assert len(rows) == 1
    row = rows[0]
    assert row["tenant_id"] == TENANT
    assert row["feature_id"] == "sdk-test"
    assert row["alias"] == "fast"
    assert row["route"] == "fast/gpt"
    assert row["request_id"] == raw.headers["x-request-id"]
    assert row["input_tokens"] == completion.usage.prompt_tokens
    assert row["output_tokens"] == completion.usage.completion_tokens
    expected = (row["input_tokens"] * 0.15 + row["output_tokens"] * 0.60) / 1e6
    assert float(row["cost_usd"]) == pytest.approx(expected, abs=1e-9)


async def test_openai_stream_with_usage(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _openai(url) as client:
        stream = await client.chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "stream a few words please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
    assert text
    assert usage is not None
    assert usage.completion_tokens > 0


async def test_openai_stream_without_usage_hides_the_usage_chunk(
    gateway: tuple[Gateway, str],
) -> None:
    _, url = gateway
    async with _openai(url) as client:
        stream = await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
    assert chunks
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


async def test_openai_tools(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    async with _openai(url) as client:
        completion = await client.chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "use get_weather for Paris"}],
            tools=[tool],  # type: ignore[list-item]
            extra_headers={"x-mock-tool-call": "get_weather"},
        )
    calls = completion.choices[0].message.tool_calls
    assert calls
    assert calls[0].function.name == "get_weather"


async def test_openai_embeddings(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _openai(url) as client:
        result = await client.embeddings.create(model="emb", input=["one", "two"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 384


async def test_models_lists_aliases_for_both_sdks(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _openai(url) as client:
        names = [m.id async for m in client.models.list()]
    assert names == ["claude", "claude-cached", "emb", "failover", "fast", "us-first", "us-only"]
    async with _anthropic(url) as client:
        page = await client.models.list()
    assert [m.id for m in page.data] == names


async def test_anthropic_messages_and_stream(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _anthropic(url) as client:
        message = await client.messages.create(
            model="claude",
            max_tokens=64,
            messages=[{"role": "user", "content": "hello claude"}],
        )
        assert message.content
        assert message.content[0].type == "text"
        assert message.usage.output_tokens > 0
        async with client.messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "stream it"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text
    assert final.usage.output_tokens > 0


async def test_anthropic_sdk_through_an_openai_upstream(gateway: tuple[Gateway, str]) -> None:
    """Cross-protocol: an Anthropic caller served by an OpenAI-compatible route."""
    _, url = gateway
    async with _anthropic(url) as client:
        message = await client.messages.create(
            model="fast", max_tokens=32, messages=[{"role": "user", "content": "translate me"}]
        )
    assert message.content[0].type == "text"
    assert message.content[0].text


async def test_openai_sdk_through_an_anthropic_upstream(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _openai(url) as client:
        completion = await client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "translate me too"}]
        )
    assert completion.choices[0].message.content


async def test_anthropic_cache_control_passes_through_and_is_priced(
    gateway: tuple[Gateway, str], clean_db: PgCluster
) -> None:
    gw, url = gateway
    system = [{"type": "text", "text": "policy " * 400, "cache_control": {"type": "ephemeral"}}]
    async with _anthropic(url) as client:
        first = await client.messages.create(
            model="claude",
            max_tokens=16,
            system=system,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "q1"}],
        )
        second = await client.messages.create(
            model="claude",
            max_tokens=16,
            system=system,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "q2"}],
        )
    assert (first.usage.cache_creation_input_tokens or 0) > 0
    assert (second.usage.cache_read_input_tokens or 0) > 0
    assert gw.ledger is not None
    await gw.ledger.stop()
    rows = _ledger(clean_db)
    assert [r["cache_write_tokens"] > 0 for r in rows] == [True, False]
    assert [r["cache_read_tokens"] > 0 for r in rows] == [False, True]
    for row in rows:
        expected = (
            row["input_tokens"] * 3.0
            + row["output_tokens"] * 15.0
            + row["cache_read_tokens"] * 0.30
            + row["cache_write_tokens"] * 3.75
        ) / 1e6
        assert float(row["cost_usd"]) == pytest.approx(expected, abs=1e-9)


async def test_automatic_cache_breakpoint_after_a_long_system_prompt(
    gateway: tuple[Gateway, str],
) -> None:
    """The alias enables prompt caching; the caller sends no cache_control at all."""
    _, url = gateway
    system = "You answer questions about the refund policy. " * 60  # > 1000 chars
    async with _anthropic(url) as client:
        usages = [
            (
                await client.messages.create(
                    model=alias,
                    max_tokens=8,
                    system=system,
                    messages=[{"role": "user", "content": f"question {i}"}],
                )
            ).usage
            for i, alias in enumerate(["claude-cached", "claude-cached", "claude"])
        ]
    assert (usages[0].cache_creation_input_tokens or 0) > 0  # the breakpoint was added
    assert (usages[1].cache_read_input_tokens or 0) > 0
    # the plain alias adds nothing: no cache activity at all
    assert not usages[2].cache_creation_input_tokens
    assert not usages[2].cache_read_input_tokens


async def test_routes_pinned_to_another_region_never_serve_the_tenant(
    gateway: tuple[Gateway, str],
) -> None:
    """tnt_alpha lives in eu; tnt_gamma in us. A provider pinned to us serves only the latter."""
    _, url = gateway
    messages: Any = [{"role": "user", "content": "where am I served?"}]
    async with _openai(url) as eu:
        with pytest.raises(openai.PermissionDeniedError) as oe:
            await eu.chat.completions.create(model="us-only", messages=messages)
        assert "region" in oe.value.message
        raw = await eu.chat.completions.with_raw_response.create(
            model="us-first", messages=messages
        )
        assert raw.headers["x-ragplane-route"] == "us-first/gpt"  # the us route was skipped
    us = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=SERVICE_KEY,
        default_headers={"X-Tenant-Id": "tnt_gamma"},
        max_retries=0,
    )
    async with us:
        raw = await us.chat.completions.with_raw_response.create(
            model="us-first", messages=messages
        )
    assert raw.headers["x-ragplane-route"] == "us-first/gpt-us"


# -- errors: each protocol's shape, so each SDK raises its usual exception ---------------


async def test_unknown_alias_is_not_found(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with _openai(url) as client:
        with pytest.raises(openai.NotFoundError) as oe:
            await client.chat.completions.create(model="nope", messages=[])
    assert "nope" in oe.value.message
    async with _anthropic(url) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="nope", max_tokens=1, messages=[])


async def test_bad_key_is_authentication_error(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    async with client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="fast", messages=[])
    aclient = anthropic.AsyncAnthropic(base_url=url, api_key="wrong", max_retries=0)
    async with aclient:
        with pytest.raises(anthropic.AuthenticationError):
            await aclient.messages.create(model="claude", max_tokens=1, messages=[])


async def test_service_key_without_tenant_is_forbidden(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=SERVICE_KEY, max_retries=0)
    async with client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="fast", messages=[])


async def test_upstream_rate_limit_reaches_the_caller_as_rate_limit(
    gateway: tuple[Gateway, str], mock: Any
) -> None:
    _, url = gateway
    mock.set_faults("429:retry-after=30")  # longer than max_retry_after_s
    async with _openai(url) as client:
        with pytest.raises(openai.RateLimitError) as oe:
            await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "x"}]
            )
    assert oe.value.response.headers.get("retry-after")
    async with _anthropic(url) as client:
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )


async def test_overloaded_upstream_is_an_sdk_server_error(
    gateway: tuple[Gateway, str], mock: Any
) -> None:
    _, url = gateway
    mock.set_faults("529")
    async with _anthropic(url) as client:
        with pytest.raises(anthropic.InternalServerError) as ae:
            await client.messages.create(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert ae.value.status_code == 529
    async with _openai(url) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "x"}]
            )


async def test_invalid_json_is_bad_request_in_openai_shape(gateway: tuple[Gateway, str]) -> None:
    _, url = gateway
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{url}/v1/chat/completions",
            content=b"{not json",
            headers={"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": TENANT},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"] in error["message"]


# -- virtual keys: tenant-bound API keys with the gateway scope --------------------------


async def _virtual_key(pg: PgCluster, tenant: str, scopes: tuple[str, ...]) -> tuple[str, str]:
    async with Database(pg.owner, max_size=1) as owner, owner.control() as session:
        key, plaintext = await create_api_key(session, tenant, name="sdk", scopes=scopes)
    return key.id, plaintext


async def test_virtual_key_takes_its_tenant_from_the_key(
    gateway: tuple[Gateway, str], clean_db: PgCluster
) -> None:
    gw, url = gateway
    _, key = await _virtual_key(clean_db, "tnt_beta", ("gateway",))
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    async with client:
        await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "mine"}]
        )
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(
                model="fast",
                messages=[{"role": "user", "content": "theirs"}],
                extra_headers={"X-Tenant-Id": "tnt_alpha"},
            )
    assert gw.ledger is not None
    await gw.ledger.stop()
    assert [r["tenant_id"] for r in _ledger(clean_db)] == ["tnt_beta"]


async def test_virtual_key_needs_the_gateway_scope_and_stops_when_revoked(
    gateway: tuple[Gateway, str], clean_db: PgCluster
) -> None:
    _, url = gateway
    _, unscoped = await _virtual_key(clean_db, "tnt_beta", ("documents",))
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=unscoped, max_retries=0) as c:
        with pytest.raises(openai.PermissionDeniedError):
            await c.chat.completions.create(model="fast", messages=[])
    key_id, key = await _virtual_key(clean_db, "tnt_beta", ("gateway",))
    async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as a:
        await a.messages.create(
            model="claude", max_tokens=8, messages=[{"role": "user", "content": "ok"}]
        )
        async with Database(clean_db.owner, max_size=1) as owner, owner.control() as session:
            assert await revoke_api_key(session, key_id)
        # make_settings sets edge.tenant_cache_s=0: the next request sees the revocation
        with pytest.raises(anthropic.AuthenticationError):
            await a.messages.create(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "no"}]
            )


async def test_unknown_paths_and_methods_answer_in_the_callers_shape(
    gateway: tuple[Gateway, str],
) -> None:
    _, url = gateway
    async with httpx.AsyncClient() as client:
        missing = await client.post(f"{url}/v1/completions", json={}, headers=HEADERS_OPENAI)
        wrong_method = await client.get(f"{url}/v1/chat/completions", headers=HEADERS_OPENAI)
        health = await client.get(f"{url}/health")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405
    assert missing.headers["x-request-id"] in missing.json()["error"]["message"]
    assert health.json() == {"status": "ok"}
