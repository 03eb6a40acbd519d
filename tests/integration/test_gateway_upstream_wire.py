"""What the gateway sends a provider and hands back, over real HTTP on loopback.

The caller's W3C trace reaches the provider and the ledger: a service that sends a
``traceparent`` has its trace continued (a new span of the same trace); any other call
starts a trace of its own. A pass-through route answers with the provider's own bytes;
a translating one (OpenAI caller, Anthropic provider) with its translation."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ragplane.data.db import Database
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import (
    SERVICE_KEY,
    gateway_settings,
    running_gateway,
    serve_asgi,
)

TENANT = "tnt_alpha"
HEADERS = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": TENANT}
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


# spaced and ordered as no JSON serialiser here would write it
ANSWER = (
    b'{ "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},\n'
    b'  "id": "c1", "object": "chat.completion", "created": 0, "model": "mock-gpt",\n'
    b'  "choices": [{"index": 0, "finish_reason": "stop",\n'
    b'               "message": {"role": "assistant", "content": "hi \\u00e9"}}] }'
)


def _capturing_provider(seen: list[str | None]) -> Starlette:
    """An OpenAI-compatible upstream that keeps each request's traceparent."""

    async def chat(request: Request) -> Response:
        seen.append(request.headers.get("traceparent"))
        return Response(ANSWER, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def test_the_trace_continues_at_the_provider_and_in_the_ledger(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    seen: list[str | None] = []
    body = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}
    async with serve_asgi(_capturing_provider(seen)) as upstream:
        settings = make_settings(clean_db, tmp_path, gateway=gateway_settings(upstream))
        async with running_gateway(settings, app_db) as (gw, url), httpx.AsyncClient() as c:
            continued = await c.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers=HEADERS | {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            )
            minted = await c.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)
            assert gw.ledger is not None
            await gw.ledger.stop()
    assert (continued.status_code, minted.status_code) == (200, 200)
    first, second = (TRACEPARENT.fullmatch(h or "") for h in seen)
    assert first is not None, seen
    assert second is not None, seen
    # the caller's trace, in a span of the gateway's own
    assert first.group(1) == CALLER_TRACE
    assert first.group(2) != CALLER_SPAN
    # no incoming trace: a new one, forwarded all the same
    assert second.group(1) != CALLER_TRACE
    with psycopg.connect(clean_db.superuser_url) as conn:
        rows = conn.execute(
            "SELECT request_id, trace_id FROM llm_ledger ORDER BY created_at"
        ).fetchall()
    by_request = dict(rows)
    assert by_request[continued.headers["x-request-id"]] == CALLER_TRACE
    assert by_request[minted.headers["x-request-id"]] == second.group(1)


async def test_a_pass_through_route_answers_with_the_providers_own_bytes(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    body = {"model": "fast", "messages": [{"role": "user", "content": "hello"}]}
    async with serve_asgi(_capturing_provider([])) as upstream:
        settings = make_settings(clean_db, tmp_path, gateway=gateway_settings(upstream))
        async with running_gateway(settings, app_db) as (_, url), httpx.AsyncClient() as c:
            response = await c.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)
    assert response.status_code == 200
    assert response.content == ANSWER
    assert response.json()["choices"][0]["message"]["content"] == "hi \u00e9"
