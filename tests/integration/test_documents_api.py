"""POST /v1/documents, GET /v1/jobs/{id}, DELETE /v1/documents/{id} over the real app."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ragplane.config import KnowledgeSettings, WorkerSettings
from ragplane.platform import Platform, create_app
from tests.conftest import PgCluster, make_settings, running
from tests.integration.test_ingest_jobs import KB, REFUND, SHIPPING, TENANT, make_namespace

OTHER = "tnt_beta"


@dataclass
class Api:
    client: httpx.AsyncClient
    platform: Platform

    def auth(self, tenant: str = TENANT) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.platform.dev_token(tenant)}"}

    async def drain(self) -> None:
        with anyio.fail_after(60):
            await self.platform.run_worker(install_signal_handlers=False, wait=False)

    async def job(self, url: str, tenant: str = TENANT) -> dict[str, Any]:
        r = await self.client.get(url, headers=self.auth(tenant))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def document_id(self, source_uri: str) -> str:
        assert self.platform.db is not None
        async with self.platform.db.tenant(TENANT) as s:
            row = await s.fetch_one(
                "SELECT id::text AS id FROM documents WHERE source_uri = %s", (source_uri,)
            )
        assert row is not None, source_uri
        return str(row["id"])


@pytest.fixture
async def api(clean_db: PgCluster, tmp_path: Path) -> AsyncIterator[Api]:
    await make_namespace(clean_db)
    settings = make_settings(
        clean_db,
        tmp_path,
        dev_mode=True,
        knowledge=KnowledgeSettings(max_request_bytes=64 * 1024, max_upload_bytes=4096),
        worker=WorkerSettings(poll_s=0.2),
    )
    app = create_app(settings)
    async with running(app) as client:
        yield Api(client, app.state.platform)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] == r.headers["x-request-id"]


async def test_a_multipart_upload_is_queued_ingested_and_its_documents_deletable(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": KB},
        files=[
            ("file", ("refund.md", REFUND, "text/markdown")),
            ("file", ("shipping.md", SHIPPING, "application/octet-stream")),
        ],
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued"
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    assert r.headers["location"] == accepted["status_url"]
    queued = await api.job(accepted["status_url"])
    assert (queued["status"], queued["kb"], queued["documents_total"]) == ("queued", KB, 2)

    await api.drain()

    done = await api.job(accepted["status_url"])
    assert done["status"] == "succeeded", done
    assert (done["documents_done"], done["errors"]) == (2, [])
    assert done["chunks_written"] >= 2
    assert done["finished_at"] is not None
    doc = await api.document_id("refund.md")
    r = await api.client.delete(f"/v1/documents/{doc}", params={"kb": KB}, headers=api.auth())
    assert r.status_code == 204, r.text
    r = await api.client.delete(f"/v1/documents/{doc}", params={"kb": KB}, headers=api.auth())
    assert_error(r, 404, "document_not_found")


async def test_a_json_upload_takes_text_and_base64(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        json={
            "kb": KB,
            "documents": [
                {"source_uri": "docs/refund.md", "content": REFUND.decode()},
                {
                    "source_uri": "docs/shipping",
                    "content_base64": base64.b64encode(SHIPPING).decode(),
                    "media_type": "text/markdown",
                },
            ],
        },
    )
    assert r.status_code == 202, r.text
    await api.drain()
    done = await api.job(r.json()["status_url"])
    assert (done["status"], done["documents_done"]) == ("succeeded", 2), done


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"source_uri": "a.md"}, "exactly one of content and content_base64"),
        ({"source_uri": "a.md", "content": "x", "content_base64": "eA=="}, "exactly one"),
        ({"source_uri": "", "content": "x"}, "source_uri"),
    ],
)
async def test_a_malformed_json_upload_is_refused(
    api: Api, document: dict[str, str], problem: str
) -> None:
    r = await api.client.post(
        "/v1/documents", headers=api.auth(), json={"kb": KB, "documents": [document]}
    )
    assert_error(r, 422, "invalid_request")
    assert problem in r.json()["error"]["message"]


async def test_invalid_base64_is_a_bad_request(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        json={"kb": KB, "documents": [{"source_uri": "a.md", "content_base64": "%%%"}]},
    )
    assert_error(r, 400, "invalid_request")
    assert "documents[0].content_base64" in r.json()["error"]["message"]


async def test_an_unknown_knowledge_base_is_404(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": "nope"},
        files={"file": ("a.md", REFUND, "text/markdown")},
    )
    assert_error(r, 404, "namespace_not_found")
    r = await api.client.delete(
        "/v1/documents/00000000-0000-0000-0000-000000000000",
        params={"kb": "nope"},
        headers=api.auth(),
    )
    assert_error(r, 404, "namespace_not_found")
    assert api.platform.db is not None
    async with api.platform.db.tenant(TENANT) as s:
        assert await s.fetch_all("SELECT id FROM ingest_jobs") == []


async def test_a_request_over_the_limit_is_413_and_queues_nothing(api: Api) -> None:
    big = b"x" * (65 * 1024)
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": KB},
        files={"file": ("big.txt", big, "text/plain")},
    )
    assert_error(r, 413, "payload_too_large")
    assert "knowledge.max_request_bytes" in r.json()["error"]["message"]
    assert api.platform.db is not None
    async with api.platform.db.tenant(TENANT) as s:
        assert await s.fetch_all("SELECT id FROM ingest_jobs") == []


async def test_a_file_over_the_file_limit_is_that_documents_error(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": KB},
        files=[
            ("file", ("refund.md", REFUND, "text/markdown")),
            ("file", ("big.txt", b"word " * 1000, "text/plain")),  # 5000 > 4096 bytes
        ],
    )
    assert r.status_code == 202, r.text
    await api.drain()
    done = await api.job(r.json()["status_url"])
    assert done["status"] == "partial"
    assert [(e["source_uri"], e["code"]) for e in done["errors"]] == [("big.txt", "too_large")]


async def test_uploads_without_length_or_of_another_type_are_refused(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"kb": "handbook", '
        yield b'"documents": []}'

    r = await api.client.post(
        "/v1/documents",
        headers={**api.auth(), "content-type": "application/json"},
        content=chunks(),
    )
    assert_error(r, 411, "length_required")
    r = await api.client.post(
        "/v1/documents",
        headers={**api.auth(), "content-type": "text/plain"},
        content=b"hello",
    )
    assert_error(r, 415, "unsupported_media_type")
    r = await api.client.post(
        "/v1/documents", headers=api.auth(), data={"kb": KB}, files={"kb2": ("", b"", "")}
    )
    assert_error(r, 400, "invalid_request")


async def test_another_tenants_job_and_documents_do_not_exist(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": KB},
        files={"file": ("refund.md", REFUND, "text/markdown")},
    )
    assert r.status_code == 202, r.text
    url = r.json()["status_url"]
    await api.drain()
    r = await api.client.get(url, headers=api.auth(OTHER))
    assert_error(r, 404, "job_not_found")
    r = await api.client.get("/v1/jobs/not-a-uuid", headers=api.auth())
    assert_error(r, 404, "job_not_found")
    await make_namespace_for(api, OTHER)
    doc = await api.document_id("refund.md")
    r = await api.client.delete(f"/v1/documents/{doc}", params={"kb": KB}, headers=api.auth(OTHER))
    assert_error(r, 404, "document_not_found")
    assert (await api.job(url))["status"] == "succeeded"


async def make_namespace_for(api: Api, tenant: str) -> None:
    settings = api.platform.settings
    assert settings.database.owner_url is not None
    from ragplane.control.namespaces import upsert_namespace
    from ragplane.data import Database

    owner = Database(settings.database.owner_url.get_secret_value(), max_size=1, name="owner")
    async with owner, owner.control() as s:
        await upsert_namespace(s, tenant, KB, embedding_model="all-minilm-l6-v2")


async def test_a_body_naming_another_tenant_is_refused(api: Api) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        json={"kb": KB, "tenant_id": OTHER, "documents": [{"source_uri": "a.md", "content": "x"}]},
    )
    assert_error(r, 403, "tenant_mismatch")
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        data={"kb": KB, "tenant_id": OTHER},
        files={"file": ("a.md", REFUND, "text/markdown")},
    )
    assert_error(r, 403, "tenant_mismatch")
