"""The job queue: procrastinate on the platform's own Postgres.

Why procrastinate (and not arq or saq on Redis): the queue lives in the database that
already holds the data, so enqueueing a job is one more row in the *same transaction*
as the job's own rows and uploads -- either the upload is stored and queued, or
neither is; there is no extra server to run, back up or fail over, and the embedded
deployment stays one process plus Postgres. LISTEN/NOTIFY wakes workers at once;
``SELECT ... FOR UPDATE SKIP LOCKED`` hands each job to one worker.

procrastinate's tables and functions live in the ``procrastinate`` schema (migration
0004, a verbatim copy of its ``schema.sql``). Its SQL names them unqualified, so:

* the worker's connections (:func:`create_queue`) run with
  ``search_path=procrastinate``;
* a tenant unit of work that enqueues passes ``settings=ENQUEUE_SETTINGS`` to
  ``Database.tenant``, which puts the schema on the transaction-local search path
  (after ``public``, so nothing of ours is shadowed).

Workers send a heartbeat every ``worker.heartbeat_s``; :func:`run_worker` also checks
every ``worker.stalled_check_s`` for jobs still marked as running on a worker whose
heartbeat is older than ``worker.stalled_after_s`` (a worker killed with SIGKILL, a lost
machine) and hands them back to the queue with procrastinate's ``retry_job``. Tasks are
rerun from the start, so they must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Mapping
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc

from ragplane.config import WorkerSettings
from ragplane.observe.logging import get_logger

__all__ = [
    "ENQUEUE_SETTINGS",
    "QUEUE_SCHEMA",
    "create_queue",
    "recover_stalled_jobs",
    "run_worker",
]

log = get_logger("ragplane.queue")

QUEUE_SCHEMA = "procrastinate"
ENQUEUE_SETTINGS: Mapping[str, str] = {"search_path": f"public, {QUEUE_SCHEMA}"}
"""Transaction-local settings for a unit of work that enqueues on its own connection."""


def create_queue(
    url: str, *, pool_max_size: int = 4, connect_timeout_s: float = 5.0
) -> procrastinate.App:
    """A procrastinate App on ``url`` (the application role). Nothing connects until the
    app is opened (a worker); enqueueing on a unit of work's connection needs no pool."""
    connector = procrastinate.PsycopgConnector(
        conninfo=url,
        min_size=1,
        max_size=pool_max_size,
        timeout=connect_timeout_s,
        name="ragplane-queue",
        kwargs={
            "options": f"-c search_path={QUEUE_SCHEMA}",
            "application_name": "ragplane-queue",
            "connect_timeout": max(1, int(connect_timeout_s)),
        },
    )
    return procrastinate.App(connector=connector)


async def recover_stalled_jobs(app: procrastinate.App, *, stalled_after_s: float) -> list[int]:
    """Put every job whose worker stopped sending heartbeats back in the queue; their ids."""
    manager = app.job_manager
    retried = []
    for job in await manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after_s):
        assert job.id is not None
        try:
            await manager.retry_job(job)
        except pexc.ConnectorException as exc:
            # another worker retried (or finished) it between the two statements
            log.info("stalled_job_not_retried", queue_job_id=job.id, reason=str(exc))
            continue
        log.warning(
            "stalled_job_retried", queue_job_id=job.id, task=job.task_name, attempts=job.attempts
        )
        retried.append(job.id)
    return retried


async def _recover_forever(app: procrastinate.App, settings: WorkerSettings) -> None:
    while True:
        # jitter, so that workers started together do not check in lockstep
        await asyncio.sleep(settings.stalled_check_s * random.uniform(0.8, 1.2))  # noqa: S311
        try:
            await recover_stalled_jobs(app, stalled_after_s=settings.stalled_after_s)
        except (pexc.ConnectorException, psycopg.Error) as exc:
            log.warning("stalled_job_check_failed", error=str(exc))


async def run_worker(
    app: procrastinate.App,
    settings: WorkerSettings,
    *,
    context: Mapping[str, Any],
    install_signal_handlers: bool = True,
    wait: bool = True,
) -> None:
    """Open ``app`` and run its worker until it is stopped (SIGINT/SIGTERM: running jobs get
    ``worker.shutdown_grace_s`` to finish, then they are aborted and queued again).

    ``context`` reaches every task as ``JobContext.additional_context``. With ``wait``
    false the worker stops once the queue has no job it can take (tests, batch runs).
    """
    async with app.open_async():
        recovery = asyncio.create_task(_recover_forever(app, settings), name="stalled_jobs")
        try:
            await app.run_worker_async(
                concurrency=settings.concurrency,
                name="ragplane-worker",
                additional_context=dict(context),
                install_signal_handlers=install_signal_handlers,
                wait=wait,
                update_heartbeat_interval=settings.heartbeat_s,
                stalled_worker_timeout=settings.stalled_after_s,
                fetch_job_polling_interval=settings.poll_s,
                shutdown_graceful_timeout=settings.shutdown_grace_s,
            )
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery
