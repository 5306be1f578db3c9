"""D2: no second run of a job while its first is still working.

Two sleeper processes (`tests.e2e.sleeper`) share the analysis queue, one job
at a time each, and eight jobs queue up behind them. A process that took more
messages than it can start would leave them waiting in its hands past their
ack deadline, and JetStream would hand them to the other process while the
first still meant to run them; so would a process that forgot to send
in-progress acks while working. The sleepers record every run they start, so a
second run shows, whichever way it came about.

Scaled down from the case: jobs sleep 3 s, not 20, and the queue timeout is
6 s, not 30; the ack margin of 1 s makes the ack deadline 7 s, shorter than the
wait of a job queued behind two others in one process.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.plans import plan_job, result_counts, start_sleepers, submit
from tests.support import wait_for_job

if TYPE_CHECKING:
    import asyncpg
    import httpx

    from tests.conftest import Services

SLEEPERS = 2
JOBS = 8
JOB_SLEEP_S = 3.0

QUEUE_ENV = {
    "TRINITY_QUEUE_ANALYSIS_CONCURRENCY": "1",
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "6",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
}

# Eight 3 s jobs on two one-at-a-time processes take about 12 s.
JOBS_DEADLINE_S = 60.0

# What each job's status document, runs and result rows must show.
RAN_ONCE = {"state": "succeeded", "attempt": 1, "runs": [(1, "succeeded")], "results": 1}


async def wait_for_jobs(client: httpx.AsyncClient, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Wait for every job to end, all against one deadline; return their documents."""
    async with asyncio.timeout(JOBS_DEADLINE_S):
        return {
            job_id: await wait_for_job(client, job_id, timeout_s=JOBS_DEADLINE_S)
            for job_id in job_ids
        }


async def runs_by_job(db: asyncpg.Pool) -> dict[str, list[asyncpg.Record]]:
    """Return every run the sleepers recorded, by job, in the order they started."""
    runs: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for run in await db.fetch("SELECT * FROM sleeper_runs ORDER BY started_at, run_id"):
        runs[run["job_id"]].append(run)
    return dict(runs)


def overlapping(runs: list[asyncpg.Record]) -> list[tuple[int, int]]:
    """Return the pairs of runs (by run id) of one job that were under way at once."""
    pairs = []
    for i, first in enumerate(runs):
        for second in runs[i + 1 :]:
            first_over = first["finished_at"] is not None
            if not first_over or second["started_at"] < first["finished_at"]:
                pairs.append((first["run_id"], second["run_id"]))
    return pairs


@pytest.mark.slow
async def test_each_job_runs_once_when_two_workers_share_jobs_longer_than_their_wait(
    services: Services, db: asyncpg.Pool
) -> None:
    await services.start_gateway(**QUEUE_ENV)
    await start_sleepers(services, SLEEPERS, **QUEUE_ENV)
    datasets = [await plan_job(db, sleep_s=JOB_SLEEP_S) for _ in range(JOBS)]

    async with services.client() as client:
        job_ids = [await submit(client, dataset_id) for dataset_id in datasets]
        jobs = await wait_for_jobs(client, job_ids)
    runs = await runs_by_job(db)
    results = await result_counts(db)

    seen = {
        job_id: {
            "state": job["state"],
            "attempt": job["attempt"],
            "runs": [(run["attempt"], run["outcome"]) for run in runs.get(job_id, [])],
            "results": results.get(job_id, 0),
        }
        for job_id, job in jobs.items()
    }
    assert seen == dict.fromkeys(job_ids, RAN_ONCE)
    assert [pair for job_runs in runs.values() for pair in overlapping(job_runs)] == []
