"""What a job's attempt history says after its worker is killed or stopped mid-job.

A worker killed outright says nothing more: its attempt is closed as lost once
the job is delivered again. A worker stopped by SIGTERM hands its attempt back
and says so: the job shows as queued until another process runs it.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.plans import plan_job, start_sleeper, submit
from tests.support import wait_for_job

if TYPE_CHECKING:
    import asyncpg
    import httpx

    from tests.conftest import Services


# Ack wait is timeout + margin = 5 s: a killed worker's job runs again about 5 s
# after its last heartbeat. Each job sleeps 3 s, inside the timeout.
QUEUE_ENV = {
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "4",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
    "TRINITY_WORKER_SHUTDOWN_GRACE_S": "0.5",
}
SLEEP_S = 3.0


@pytest.fixture
async def db(db: asyncpg.Pool, services: Services) -> asyncpg.Pool:
    """The sleeper's pool, once the gateway has migrated the database for the plan rows."""
    await services.start_gateway(**QUEUE_ENV)
    return db


async def running_job(client: httpx.AsyncClient, db: asyncpg.Pool) -> str:
    """Submit a sleeping job and return its id once its status document says it runs."""
    job_id = await submit(client, await plan_job(db, sleep_s=SLEEP_S))
    await wait_for_job(client, job_id, states=frozenset({"running"}), timeout_s=20)
    return job_id


def history(job: dict[str, Any]) -> list[tuple[int, str | None, dict[str, str] | None]]:
    return [(a["attempt"], a["outcome"], a["error"]) for a in job["attempts"]]


@pytest.mark.slow
async def test_attempt_of_a_killed_worker_reads_lost_once_the_job_runs_again(
    services: Services, db: asyncpg.Pool
) -> None:
    first = await start_sleeper(services, **QUEUE_ENV)
    async with services.client() as client:
        job_id = await running_job(client, db)

        await first.kill()
        await start_sleeper(services, **QUEUE_ENV)
        job = await wait_for_job(client, job_id, timeout_s=40)

    assert (job["state"], job["attempt"]) == ("succeeded", 2)
    lost = {"type": "lost", "message": "the worker stopped reporting; the job was delivered again"}
    assert history(job) == [(1, "lost", lost), (2, "succeeded", None)]
    first_attempt, second_attempt = job["attempts"]
    assert first_attempt["finished_at"] == second_attempt["started_at"]


@pytest.mark.slow
async def test_job_handed_back_on_sigterm_reads_queued_until_another_worker_runs_it(
    services: Services, db: asyncpg.Pool
) -> None:
    first = await start_sleeper(services, **QUEUE_ENV)
    async with services.client() as client:
        job_id = await running_job(client, db)

        first.signal(signal.SIGTERM)
        exit_status = await first.wait(10)
        queued = await wait_for_job(client, job_id, states=frozenset({"queued"}), timeout_s=10)
        await start_sleeper(services, **QUEUE_ENV)
        done = await wait_for_job(client, job_id, timeout_s=30)

    assert exit_status == 0
    assert (queued["attempt"], queued["progress"]) == (
        1,
        {"percent": 0.0, "message": "handed back by a stopping worker"},
    )
    [handed_back] = queued["attempts"]
    assert (handed_back["outcome"], handed_back["error"]) == ("handed_back", None)
    assert handed_back["finished_at"] is not None
    assert (done["state"], done["attempt"]) == ("succeeded", 2)
    assert history(done) == [(1, "handed_back", None), (2, "succeeded", None)]
