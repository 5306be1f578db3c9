"""What a job's attempt history says after its worker is killed or stopped mid-job.

A worker killed outright says nothing more: its attempt is closed as lost once
the job is delivered again. A worker stopped by SIGTERM hands its attempt back
and says so: the job shows as queued until another process runs it.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from tests.e2e.plans import plan_job, submit
from tests.e2e.sleeper import SLEEPER_TABLES
from tests.support import wait_for_job
from trinity_common.devstack import free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import httpx

    from tests.conftest import Services
    from trinity_common.devstack import Database
    from trinity_common.devstack.services import ServiceProcess

SLEEPER = "tests.e2e.sleeper"

# Ack wait is timeout + margin = 5 s: a killed worker's job runs again about 5 s
# after its last heartbeat. Each job sleeps 3 s, inside the timeout.
QUEUE_ENV = {
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "4",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
    "TRINITY_WORKER_SHUTDOWN_GRACE_S": "0.5",
}
SLEEP_S = 3.0

STARTUP_TIMEOUT_S = 30.0
"""Long enough for a sleeper to connect, migrate, bind its consumer and fetch."""


@pytest.fixture
async def db(database: Database, services: Services) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's database, migrated by the gateway, with the sleeper's tables."""
    await services.start_gateway(**QUEUE_ENV)
    pool = await asyncpg.create_pool(database.url, min_size=1, max_size=2)
    await pool.execute(SLEEPER_TABLES)
    yield pool
    await pool.close()


async def start_sleeper(services: Services) -> ServiceProcess:
    """Start a sleeper and return once it consumes the analysis queue."""
    port = free_port()
    process = await services.start(SLEEPER, TRINITY_WORKER_HEALTH_PORT=str(port), **QUEUE_ENV)
    await process.wait_ready(port, timeout_s=STARTUP_TIMEOUT_S)
    return process


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
    first = await start_sleeper(services)
    async with services.client() as client:
        job_id = await running_job(client, db)

        await first.kill()
        await start_sleeper(services)
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
    first = await start_sleeper(services)
    async with services.client() as client:
        job_id = await running_job(client, db)

        first.signal(signal.SIGTERM)
        exit_status = await first.wait(10)
        queued = await wait_for_job(client, job_id, states=frozenset({"queued"}), timeout_s=10)
        await start_sleeper(services)
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
