"""A job whose worker died never claims to be running for ever (case D6)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.plans import plan_job
from tests.support import eventually

if TYPE_CHECKING:
    import asyncpg
    import httpx

    from tests.conftest import Services

# One attempt only, a short ack deadline (4 s + 1 s), heartbeats under a second.
QUEUE_ENV = {
    "TRINITY_QUEUE_ANALYSIS_RETRIES": "0",
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "4",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
}


@pytest.fixture
async def db(db: asyncpg.Pool, services: Services) -> asyncpg.Pool:
    """The sleeper's pool, once the gateway has migrated the database for the plan rows."""
    await services.start_gateway(**QUEUE_ENV)
    return db


async def job_in(client: httpx.AsyncClient, job_id: str, *states: str) -> dict[str, Any] | None:
    job: dict[str, Any] = (await client.get(f"/api/jobs/{job_id}")).json()
    return job if job["state"] in states else None


@pytest.mark.slow
async def test_job_of_a_killed_worker_shows_stalled_then_fails_when_attempts_run_out(
    services: Services, db: asyncpg.Pool
) -> None:
    sleeper = await services.start("tests.e2e.sleeper", **QUEUE_ENV)
    async with services.client() as client:
        accepted = await client.post(
            "/api/analysis", json={"dataset_id": await plan_job(db, sleep_s=60)}
        )
        job_id = accepted.json()["job_id"]
        running = await eventually(
            lambda: job_in(client, job_id, "running"), timeout_s=20, what="the job to run"
        )

        await sleeper.kill()
        stalled = await eventually(
            lambda: job_in(client, job_id, "stalled"), timeout_s=15, what="the job to stall"
        )
        failed = await eventually(
            lambda: job_in(client, job_id, "failed"), timeout_s=30, what="the job to fail"
        )

    assert running["attempt"] == 1
    last_beat = datetime.fromisoformat(stalled["heartbeat_at"])
    assert last_beat >= datetime.fromisoformat(running["heartbeat_at"])
    assert failed["error"]["type"] == "attempts_exhausted"
    assert "stopped reporting" in failed["error"]["message"]
    assert failed["dead_lettered"] is True
    assert failed["heartbeat_at"] == stalled["heartbeat_at"], "no beat came after the kill"
