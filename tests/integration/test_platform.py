"""The platform endpoints over a real database: liveness, readiness, whoami, errors."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import psycopg

from ragplane.platform import create_app
from tests.conftest import PgCluster, make_settings, running

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$")


async def test_health_and_ready(dev_client: httpx.AsyncClient) -> None:
    r = await dev_client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    r = await dev_client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert r.json()["schema_version"] >= 3
    assert r.headers["x-request-id"].startswith("req_")
    assert TRACEPARENT.match(r.headers["traceparent"])


async def test_ready_is_503_when_a_migration_is_pending(pg: PgCluster, tmp_path: Path) -> None:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        row = conn.execute(
            "DELETE FROM ragplane_meta.schema_migrations WHERE version = "
            "(SELECT max(version) FROM ragplane_meta.schema_migrations) RETURNING *"
        ).fetchone()
        assert row is not None
        try:
            async with running(create_app(make_settings(pg, tmp_path))) as client:
                r = await client.get("/ready")
        finally:
            conn.execute("INSERT INTO ragplane_meta.schema_migrations VALUES (%s, %s, %s, %s)", row)
    assert r.status_code == 503
    body = r.json()["error"]
    assert body["code"] == "not_ready"
    assert "pending" in body["message"]
    assert body["request_id"] == r.headers["x-request-id"]


async def test_openapi_docs_are_served(dev_client: httpx.AsyncClient) -> None:
    r = await dev_client.get("/openapi.json")
    assert r.status_code == 200
    assert "/v1/whoami" in r.json()["paths"]
    assert (await dev_client.get("/docs")).status_code == 200


async def test_unknown_route_is_a_json_error(dev_client: httpx.AsyncClient) -> None:
    r = await dev_client.get("/nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_found"
    assert err["request_id"] == r.headers["x-request-id"]


async def test_dev_mode_anonymous_request_may_name_its_tenant(
    dev_client: httpx.AsyncClient,
) -> None:
    r = await dev_client.get("/v1/whoami", headers={"X-Tenant-Id": "tnt_globex_us"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == "tnt_globex_us"
    assert body["region"] == "us"
    assert body["auth_method"] == "dev"
    assert body["request_id"] == r.headers["x-request-id"]
