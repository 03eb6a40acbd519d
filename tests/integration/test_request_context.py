"""Request id and W3C trace context at the edge, over HTTP (ASGI) and the real database.

Every response carries ``x-request-id`` and ``traceparent``. Incoming values are
honoured only from a peer inside ``edge.trusted_proxies``; from anyone else they
are ignored and fresh values are minted.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from ragplane.config import EdgeSettings
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import tenant_context
from ragplane.platform import create_app
from tests.conftest import PgCluster, make_settings

# Marked at collection time so anyio's plugin keeps the parametrize callspecs of async tests.

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
REQUEST_ID = re.compile(r"^req_[0-9a-f]{24}$")
PROXY = "203.0.113.9"  # inside the trusted range below
STRANGER = "198.51.100.7"  # outside it
TRUSTED = ("203.0.113.0/24",)
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
ANON = {"X-Tenant-Id": "tnt_alpha"}  # dev mode: an anonymous request naming its tenant


class Body(BaseModel):
    count: int


async def _needs_body(body: Body, ctx: Annotated[TenantContext, Depends(tenant_context)]) -> Any:
    return {"count": body.count}


async def _boom() -> None:
    raise RuntimeError("unexpected failure in a handler")


def _app(pg: PgCluster, tmp_path: Path, trusted: tuple[str, ...]) -> FastAPI:
    settings = make_settings(
        pg,
        tmp_path,
        dev_mode=True,
        edge=EdgeSettings(trusted_proxies=trusted, tenant_cache_s=0),
    )
    app = create_app(settings)
    app.add_api_route("/test/body", _needs_body, methods=["POST"])
    app.add_api_route("/test/boom", _boom, methods=["GET"])
    return app


@asynccontextmanager
async def serve(app: FastAPI, peer: str) -> AsyncIterator[httpx.AsyncClient]:
    """Like conftest's ``running``, with a chosen peer address, and 500s returned, not raised."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(peer, 40000), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ragplane.test") as c:
            yield c


@pytest.fixture
async def untrusted(pg: PgCluster, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """No trusted proxies configured at all."""
    async with serve(_app(pg, tmp_path, ()), PROXY) as c:
        yield c


@pytest.fixture
async def via_proxy(pg: PgCluster, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The peer is inside edge.trusted_proxies."""
    async with serve(_app(pg, tmp_path, TRUSTED), PROXY) as c:
        yield c


def ids(r: httpx.Response) -> tuple[str, str, str]:
    """(request id, trace id, span id) of a response, checking their format."""
    rid = r.headers["x-request-id"]
    m = TRACEPARENT.fullmatch(r.headers["traceparent"])
    assert m is not None, r.headers["traceparent"]
    return rid, m.group(1), m.group(2)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        pytest.param("GET", "/health", {}, 200, None, id="health"),
        pytest.param("GET", "/ready", {}, 200, None, id="ready"),
        pytest.param("GET", "/v1/whoami", {"headers": ANON}, 200, None, id="whoami"),
        pytest.param("GET", "/v1/whoami", {}, 401, "missing_credentials", id="401"),
        pytest.param(
            "GET",
            "/v1/whoami",
            {"headers": {"X-Tenant-Id": "tnt_nobody"}},
            403,
            "unknown_tenant",
            id="403",
        ),
        pytest.param("GET", "/nope", {}, 404, "not_found", id="404"),
        pytest.param("DELETE", "/health", {}, 405, "method_not_allowed", id="405"),
        pytest.param(
            "POST",
            "/test/body",
            {"headers": ANON, "json": {"count": "many"}},
            422,
            "invalid_request",
            id="422",
        ),
        pytest.param("GET", "/test/boom", {}, 500, "internal_error", id="500"),
    ],
)
async def test_every_response_carries_request_id_and_traceparent(
    untrusted: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str | None,
) -> None:
    r = await untrusted.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    rid, trace_id, _ = ids(r)
    assert REQUEST_ID.fullmatch(rid), rid
    if code is not None:
        err = r.json()["error"]
        assert err["code"] == code
        assert err["request_id"] == rid
        assert "RuntimeError" not in r.text  # nothing internal leaks into a 500
    elif path == "/v1/whoami":
        assert r.json()["request_id"] == rid
        assert r.json()["trace_id"] == trace_id


@pytest.fixture(
    params=[
        pytest.param(((), PROXY), id="no-trusted-proxies"),
        pytest.param((TRUSTED, STRANGER), id="peer-outside-trusted-range"),
    ]
)
async def untrusted_peer(
    request: pytest.FixtureRequest, pg: PgCluster, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    trusted, peer = request.param
    async with serve(_app(pg, tmp_path, trusted), peer) as c:
        yield c


async def test_incoming_ids_are_ignored_from_untrusted_peer(
    untrusted_peer: httpx.AsyncClient,
) -> None:
    client = untrusted_peer
    headers = {
        **ANON,
        "X-Request-Id": "req_chosen_by_the_client",
        "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01",
    }
    r = await client.get("/v1/whoami", headers=headers)
    assert r.status_code == 200, r.text
    rid, trace_id, span_id = ids(r)
    assert REQUEST_ID.fullmatch(rid)
    assert rid != "req_chosen_by_the_client"
    assert trace_id != INCOMING_TRACE
    assert span_id != INCOMING_SPAN
    assert (r.json()["request_id"], r.json()["trace_id"]) == (rid, trace_id)
    # an error response too
    r = await client.get(
        "/v1/whoami",
        headers={k: v for k, v in headers.items() if k in ("X-Request-Id", "traceparent")},
    )
    assert r.status_code == 401
    rid, trace_id, _ = ids(r)
    assert rid != "req_chosen_by_the_client"
    assert r.json()["error"]["request_id"] == rid
    assert trace_id != INCOMING_TRACE


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_incoming_ids_are_honoured_from_trusted_proxy(
    via_proxy: httpx.AsyncClient, flags: str
) -> None:
    headers = {
        **ANON,
        "X-Request-Id": "lb-7f3a:42",
        "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-{flags}",
    }
    r = await via_proxy.get("/v1/whoami", headers=headers)
    assert r.status_code == 200, r.text
    rid, trace_id, span_id = ids(r)
    assert rid == "lb-7f3a:42"
    assert trace_id == INCOMING_TRACE  # the trace continues
    assert span_id != INCOMING_SPAN  # in a new span of ours
    assert r.headers["traceparent"].endswith(f"-{flags}")  # the sampling decision is kept
    assert (r.json()["request_id"], r.json()["trace_id"]) == ("lb-7f3a:42", INCOMING_TRACE)


async def test_trusted_request_id_is_in_error_bodies(via_proxy: httpx.AsyncClient) -> None:
    r = await via_proxy.get(
        "/v1/whoami",
        headers={
            "X-Request-Id": "edge-123",
            "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01",
        },
    )
    assert r.status_code == 401
    assert r.headers["x-request-id"] == "edge-123"
    assert r.json()["error"]["request_id"] == "edge-123"
    assert ids(r)[1] == INCOMING_TRACE


@pytest.mark.parametrize(
    "traceparent",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param(f"01-{INCOMING_TRACE}-{INCOMING_SPAN}-01", id="version-01"),
        pytest.param(f"ff-{INCOMING_TRACE}-{INCOMING_SPAN}-01", id="version-ff"),
        pytest.param(f"00-{'0' * 32}-{INCOMING_SPAN}-01", id="zero-trace-id"),
        pytest.param(f"00-{INCOMING_TRACE}-{'0' * 16}-01", id="zero-span-id"),
        pytest.param(f"00-{INCOMING_TRACE[:-1]}-{INCOMING_SPAN}-01", id="short-trace-id"),
        pytest.param(f"00-{INCOMING_TRACE}-{INCOMING_SPAN}0-01", id="long-span-id"),
        pytest.param(f"00-{INCOMING_TRACE[:-1]}g-{INCOMING_SPAN}-01", id="non-hex"),
        pytest.param(f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-1", id="short-flags"),
        pytest.param(f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01-extra", id="extra-field"),
        pytest.param(f"00_{INCOMING_TRACE}_{INCOMING_SPAN}_01", id="wrong-separator"),
    ],
)
async def test_malformed_traceparent_from_trusted_proxy_starts_a_fresh_trace(
    via_proxy: httpx.AsyncClient, traceparent: str
) -> None:
    r = await via_proxy.get("/v1/whoami", headers={**ANON, "traceparent": traceparent})
    assert r.status_code == 200, r.text
    _, trace_id, span_id = ids(r)
    assert trace_id not in traceparent
    assert span_id not in traceparent
    assert r.json()["trace_id"] == trace_id


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("has spaces", id="spaces"),
        pytest.param("x" * 129, id="too-long"),
        pytest.param("req/../../etc", id="slashes"),
        pytest.param('req"quoted', id="quote"),
        pytest.param("req\tid", id="tab"),
    ],
)
async def test_malformed_request_id_from_trusted_proxy_is_replaced(
    via_proxy: httpx.AsyncClient, request_id: str
) -> None:
    r = await via_proxy.get("/v1/whoami", headers={**ANON, "X-Request-Id": request_id})
    assert r.status_code == 200, r.text
    rid, _, _ = ids(r)
    assert REQUEST_ID.fullmatch(rid), rid
    assert r.json()["request_id"] == rid


async def test_request_and_trace_ids_differ_per_request(untrusted: httpx.AsyncClient) -> None:
    seen = [ids(await untrusted.get("/health")) for _ in range(20)]
    assert len({rid for rid, _, _ in seen}) == 20
    assert len({trace for _, trace, _ in seen}) == 20
    assert len({span for _, _, span in seen}) == 20


async def test_continued_traces_get_a_new_span_per_request(via_proxy: httpx.AsyncClient) -> None:
    headers = {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"}
    seen = [ids(await via_proxy.get("/health", headers=headers)) for _ in range(10)]
    assert {trace for _, trace, _ in seen} == {INCOMING_TRACE}
    assert len({span for _, _, span in seen}) == 10
    # without an incoming request id, a trusted proxy's request still gets a fresh one each time
    assert len({rid for rid, _, _ in seen}) == 10


async def test_500_carries_the_ids_the_edge_established(via_proxy: httpx.AsyncClient) -> None:
    headers = {"X-Request-Id": "lb-500", "traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"}
    r = await via_proxy.get("/test/boom", headers=headers)
    assert r.status_code == 500
    rid, trace_id, span_id = ids(r)
    assert (rid, trace_id) == ("lb-500", INCOMING_TRACE)
    assert span_id != INCOMING_SPAN
    assert r.json()["error"] == {
        "code": "internal_error",
        "message": "internal error",
        "request_id": "lb-500",
    }
