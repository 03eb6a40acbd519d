"""The ingest task's retry policy and the final status of a job."""

from __future__ import annotations

import asyncio
import datetime

import procrastinate
import pytest
from procrastinate.jobs import Job

from ragplane.errors import DatabaseUnavailable, EmbeddingError, IngestError, ModelMismatch
from ragplane.knowledge.jobrunner import final_status
from ragplane.knowledge.jobs import INGEST_TASK, IngestQueue
from ragplane.knowledge.models import ModelSwitched


def policy(max_attempts: int = 3, wait_s: int = 5) -> procrastinate.BaseRetryStrategy:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector())
    IngestQueue(app, max_attempts=max_attempts, retry_wait_s=wait_s)
    strategy = app.tasks[INGEST_TASK].retry_strategy
    assert strategy is not None
    return strategy


def job(attempts: int) -> Job:
    return Job(
        id=1,
        queue="ingest",
        lock=None,
        queueing_lock=None,
        task_name=INGEST_TASK,
        attempts=attempts,
    )


def retry_in_s(decision: procrastinate.RetryDecision | None) -> float | None:
    if decision is None:
        return None
    assert decision.retry_at is not None
    return round((decision.retry_at - datetime.datetime.now(datetime.UTC)).total_seconds())


@pytest.mark.parametrize(
    "error",
    [
        DatabaseUnavailable("down"),
        EmbeddingError("503"),
        ModelSwitched("switched mid-job", namespace="kb", active_model="m2"),
    ],
)
def test_transient_errors_are_retried_with_doubling_waits(error: Exception) -> None:
    p = policy()
    assert retry_in_s(p.get_retry_decision(exception=error, job=job(0))) == 5
    assert retry_in_s(p.get_retry_decision(exception=error, job=job(1))) == 10
    assert p.get_retry_decision(exception=error, job=job(2)) is None  # the third run was the last


@pytest.mark.parametrize(
    "error", [ModelMismatch("pinned"), IngestError("unreadable", "x"), RuntimeError("bug")]
)
def test_other_errors_are_not_retried(error: Exception) -> None:
    assert policy().get_retry_decision(exception=error, job=job(0)) is None


def test_a_run_interrupted_by_shutdown_is_retried_at_once() -> None:
    p = policy()
    assert retry_in_s(p.get_retry_decision(exception=asyncio.CancelledError(), job=job(0))) == 0
    assert p.get_retry_decision(exception=asyncio.CancelledError(), job=job(2)) is None


def test_final_status() -> None:
    assert final_status(documents_ok=3, errors=0) == "succeeded"
    assert final_status(documents_ok=3, errors=1) == "partial"
    assert final_status(documents_ok=0, errors=2) == "failed"
