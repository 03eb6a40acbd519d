"""GET/POST /v1/kb/{kb}/model and the switch job on GET /v1/jobs/{id}, over the real app."""

from __future__ import annotations

from ragplane.knowledge.embedder import LOCAL_MODEL_IDS
from tests.integration.test_documents_api import OTHER, Api, api, assert_error
from tests.integration.test_ingest_jobs import KB, REFUND, SHIPPING

__all__ = ["api"]  # the fixture, imported for this module's tests

MEAN = LOCAL_MODEL_IDS["mean"]
CLS = LOCAL_MODEL_IDS["cls"]


async def test_a_switch_over_http_is_queued_visible_as_a_job_and_swaps_the_model(
    api: Api,
) -> None:
    r = await api.client.post(
        "/v1/documents",
        headers=api.auth(),
        json={
            "kb": KB,
            "documents": [
                {"source_uri": "refund.md", "content": REFUND.decode()},
                {"source_uri": "shipping.md", "content": SHIPPING.decode()},
            ],
        },
    )
    assert r.status_code == 202, r.text
    await api.drain()

    r = await api.client.get(f"/v1/kb/{KB}/model", headers=api.auth())
    assert r.status_code == 200, r.text
    before = r.json()
    assert before["pinned_model"] == before["active_model"] == MEAN
    assert before["switching_to"] is None
    assert sorted(before["available_models"]) == sorted([MEAN, CLS])

    r = await api.client.post(f"/v1/kb/{KB}/model", headers=api.auth(), json={"model": CLS})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert r.headers["location"] == accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = await api.job(accepted["status_url"])
    assert (job["kind"], job["status"], job["phase"]) == ("switch_model", "queued", "embedding")
    assert (job["source_model"], job["target_model"], job["documents_total"]) == (MEAN, CLS, 2)
    r = await api.client.get(f"/v1/kb/{KB}/model", headers=api.auth())
    assert (r.json()["switching_to"], r.json()["switch_job_id"]) == (CLS, accepted["job_id"])

    r = await api.client.post(f"/v1/kb/{KB}/model", headers=api.auth(), json={"model": CLS})
    assert_error(r, 409, "switch_in_progress")
    assert accepted["job_id"] in r.json()["error"]["message"]
    # the other tenant sees neither the job nor a knowledge base of that name
    r = await api.client.get(accepted["status_url"], headers=api.auth(OTHER))
    assert_error(r, 404, "job_not_found")
    r = await api.client.post(f"/v1/kb/{KB}/model", headers=api.auth(OTHER), json={"model": CLS})
    assert_error(r, 404, "namespace_not_found")

    await api.drain()
    job = await api.job(accepted["status_url"])
    assert (job["status"], job["phase"], job["documents_done"]) == ("succeeded", "done", 2)
    assert job["chunks_written"] >= 2
    r = await api.client.get(f"/v1/kb/{KB}/model", headers=api.auth())
    after = r.json()
    assert (after["pinned_model"], after["active_model"], after["switching_to"]) == (
        CLS,
        CLS,
        None,
    )
    assert after["kb_version"] == before["kb_version"] + 1
    r = await api.client.post(f"/v1/kb/{KB}/model", headers=api.auth(), json={"model": CLS})
    assert_error(r, 409, "model_already_active")


async def test_switch_requests_that_are_refused(api: Api) -> None:
    r = await api.client.post(
        f"/v1/kb/{KB}/model", headers=api.auth(), json={"model": "text-embedding-3-small"}
    )
    assert_error(r, 400, "unknown_embedding_model")
    assert CLS in r.json()["error"]["message"]  # names what is available
    r = await api.client.post("/v1/kb/nope/model", headers=api.auth(), json={"model": CLS})
    assert_error(r, 404, "namespace_not_found")
    r = await api.client.get("/v1/kb/nope/model", headers=api.auth())
    assert_error(r, 404, "namespace_not_found")
    r = await api.client.post(
        f"/v1/kb/{KB}/model", headers=api.auth(), json={"model": CLS, "tenant_id": OTHER}
    )
    assert_error(r, 403, "tenant_mismatch")
    r = await api.client.post(f"/v1/kb/{KB}/model", headers=api.auth(), json={"models": CLS})
    assert r.status_code == 422, r.text
    r = await api.client.post(f"/v1/kb/{KB}/model", json={"model": CLS})
    assert r.status_code == 401, r.text
