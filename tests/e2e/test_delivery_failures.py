"""Delivery under faults: workers killed or stopped mid-job, nats-server stopped or restarted.

Every test runs real processes: the gateway (which also projects status events)
and one or more sleepers (`tests.e2e.sleeper`), a service on the real worker
runtime whose jobs sleep for as long as the test planned. The sleepers record
each run in ``sleeper_runs``, so the tests can tell which process ran what, and
compare that with what the status documents and ``job_results`` say.

Queue timings are shortened through the same ``TRINITY_QUEUE_ANALYSIS_*``
variables a deployment would set, so a lost job is redelivered in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.plans import plan_job, result_counts, start_sleeper, start_sleepers, submit
from tests.support import eventually, wait_for_job
from trinity_common import names

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import asyncpg

    from tests.conftest import Services
    from trinity_common.devstack import NatsServer
    from trinity_common.devstack.services import ServiceProcess


# Ack wait is timeout + margin = 10 s: a job whose worker died is redelivered
# about 10 s after its last heartbeat, instead of the default 150 s.
QUEUE_ENV = {
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "8",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "2",
    "TRINITY_QUEUE_ANALYSIS_CONCURRENCY": "2",
    "TRINITY_QUEUE_ANALYSIS_BACKOFF_BASE_S": "0.5",
}

# Long enough for a sleeper to connect, migrate, bind its consumer and fetch.

# The quiet-spell test: idle workers side by side, and the empty polls each
# makes (about one a second). More loops polling make a rare fault show.
IDLE_SLEEPERS = 5
QUIET_POLLS = 40

# Bursts of jobs the busy-worker test sends, each at a different polling phase.
BURSTS = 6


def tail(process: ServiceProcess) -> str:
    """The end of a process's log: enough for a traceback, not the whole debug trail."""
    return process.output()[-4000:]


async def submit_planned(client: httpx.AsyncClient, db: asyncpg.Pool, *, sleep_s: float) -> str:
    """Plan a job sleeping ``sleep_s`` and submit it; return the job id."""
    return await submit(client, await plan_job(db, sleep_s=sleep_s))


async def wait_for_jobs(
    client: httpx.AsyncClient, job_ids: list[str], *, timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Wait for every job to end, all against one deadline; return their documents."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    jobs = {}
    for job_id in job_ids:
        left_s = max(deadline - loop.time(), 0.1)
        jobs[job_id] = await wait_for_job(client, job_id, timeout_s=left_s)
    return jobs


async def wait_until_ready(client: httpx.AsyncClient, *, timeout_s: float) -> None:
    async def ready() -> bool | None:
        with contextlib.suppress(httpx.TransportError):
            return (await client.get("/health/ready")).status_code == 200 or None
        return None

    await eventually(ready, timeout_s=timeout_s, what="the gateway to be ready again")


async def answer_within(timeout_s: float, request: Awaitable[httpx.Response]) -> httpx.Response:
    """Return the response, or fail the test if it takes longer than ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request
    except TimeoutError:
        raise AssertionError(f"no answer within {timeout_s:g} s") from None


async def runs_of(db: asyncpg.Pool) -> list[Any]:
    """Return every run the sleepers recorded, in the order they started."""
    rows: list[Any] = await db.fetch("SELECT * FROM sleeper_runs ORDER BY run_id")
    return rows


async def job_ids_recorded(db: asyncpg.Pool) -> set[str]:
    return {row["job_id"] for row in await db.fetch("SELECT job_id FROM jobs")}


async def wait_for_a_run(db: asyncpg.Pool) -> None:
    async def started() -> bool | None:
        return bool(await runs_of(db)) or None

    await eventually(started, timeout_s=20, what="a job to start running")


def attempt_history(job: dict[str, Any]) -> list[tuple[int, str | None]]:
    return [(a["attempt"], a["outcome"]) for a in job["attempts"]]


async def pull_requests_sent(nats_server: NatsServer, connection_name: str) -> int:
    """Return how many messages the named client connection has published to nats-server.

    An idle worker publishes about one pull request per empty poll, so this
    counts its polls without depending on how long each one takes.
    """
    url = f"http://127.0.0.1:{nats_server.monitor_port}/connz"
    async with httpx.AsyncClient(timeout=5.0) as monitor:
        connections = (await monitor.get(url)).json()["connections"]
    return sum(c["in_msgs"] for c in connections if c.get("name") == connection_name)


async def jobs_in_hand(nats_server: NatsServer) -> int:
    """Return how many analysis jobs JetStream has delivered and not yet seen acknowledged."""
    url = f"http://127.0.0.1:{nats_server.monitor_port}/jsz"
    async with httpx.AsyncClient(timeout=5.0) as monitor:
        report = (await monitor.get(url, params={"consumers": "true"})).json()
    return sum(
        consumer["num_ack_pending"]
        for stream in report["account_details"][0]["stream_detail"]
        if stream["name"] == names.JOBS_STREAM
        for consumer in stream["consumer_detail"]
        if consumer["name"] == "analysis"
    )


def in_hand_while_two_run(
    db: asyncpg.Pool, nats_server: NatsServer, *, runs_before: int
) -> Callable[[], Awaitable[int | None]]:
    """A check: once two runs newer than ``runs_before`` are running, the jobs in hand."""

    async def running() -> list[int]:
        runs = (await runs_of(db))[runs_before:]
        return [run["run_id"] for run in runs if run["finished_at"] is None]

    async def check() -> int | None:
        before = await running()
        if len(before) != 2:
            return None
        in_hand = await jobs_in_hand(nats_server)
        # Only a reading taken while the same two ran counts.
        return in_hand if await running() == before else None

    return check


@pytest.mark.slow
async def test_idle_gateway_and_worker_keep_consuming_through_many_empty_polls(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """An idle queue is the usual state: no empty poll may stop a consuming loop.

    The worker, the status projector and the reaper each poll their consumer
    about once a second while nothing is queued. A poll that comes back empty,
    however it says so, must lead to the next poll, never end the loop.
    """
    await services.start_gateway(**QUEUE_ENV)
    await start_sleepers(services, IDLE_SLEEPERS, **QUEUE_ENV)
    polls_at_start = await pull_requests_sent(nats_server, "trinity-sleeper")

    async with services.client() as client:

        async def quiet_spell_over() -> bool | None:
            for process in services.processes:
                if process.returncode is not None:
                    raise AssertionError(f"{process.module} exited:\n{tail(process)}")
            ready = await client.get("/health/ready")
            if ready.status_code != 200:
                raise AssertionError(f"the gateway stopped being ready: {ready.text}")
            polls = await pull_requests_sent(nats_server, "trinity-sleeper") - polls_at_start
            return polls >= QUIET_POLLS * IDLE_SLEEPERS or None

        await eventually(quiet_spell_over, timeout_s=QUIET_POLLS * 2, what="the empty polls")
        job = await wait_for_job(
            client, await submit_planned(client, db, sleep_s=0.1), timeout_s=20
        )

    assert [process.returncode for process in services.processes] == [None] * (1 + IDLE_SLEEPERS)
    assert job["state"] == "succeeded"
    assert job["attempt"] == 1


@pytest.mark.slow
async def test_busy_worker_holds_no_more_jobs_than_it_runs(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """Nothing waits in the hands of a worker that runs all it can.

    A job delivered to a busy process burns its ack deadline while another
    process could run it, and is lost with the process (D2, D5). Each burst
    lands at a different point of the worker's polling, which is where
    fetching more than it can start shows.
    """
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)
    in_hand = []

    async with services.client() as client:
        for _ in range(BURSTS):
            runs_before = len(await runs_of(db))
            burst = [await submit_planned(client, db, sleep_s=1) for _ in range(4)]
            check = in_hand_while_two_run(db, nats_server, runs_before=runs_before)
            in_hand.append(await eventually(check, timeout_s=20, what="two jobs to run"))
            await wait_for_jobs(client, burst, timeout_s=30)

    assert in_hand == [2] * BURSTS


@pytest.mark.slow
async def test_sigkilled_worker_jobs_run_again_on_its_replacement_and_others_once(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """D5: what ran in the killed process runs again; nothing else runs twice."""
    await services.start_gateway(**QUEUE_ENV)
    first = await start_sleeper(services, **QUEUE_ENV)
    datasets = [await plan_job(db, sleep_s=6) for _ in range(6)]

    async with services.client() as client:
        job_ids = [await submit(client, dataset_id) for dataset_id in datasets]

        async def two_running() -> list[Any] | None:
            runs = [run for run in await runs_of(db) if run["pid"] == first.pid]
            return runs if len(runs) == 2 else None

        killed = {
            run["job_id"] for run in await eventually(two_running, timeout_s=20, what="2 runs")
        }
        in_hand = await jobs_in_hand(nats_server)
        await first.kill()
        second = await start_sleeper(services, **QUEUE_ENV)
        jobs = await wait_for_jobs(client, job_ids, timeout_s=80)
    runs = await runs_of(db)

    assert in_hand == 2, "the killed process held jobs it had not started"
    assert {j: job["state"] for j, job in jobs.items()} == dict.fromkeys(job_ids, "succeeded")
    assert {j: job["attempt"] for j, job in jobs.items()} == {
        j: 2 if j in killed else 1 for j in job_ids
    }
    for job_id in killed:
        assert attempt_history(jobs[job_id]) in (
            [(1, None), (2, "succeeded")],
            [(1, "lost"), (2, "succeeded")],
        )
    for job_id in set(job_ids) - killed:
        assert attempt_history(jobs[job_id]) == [(1, "succeeded")]
    assert await result_counts(db) == dict.fromkeys(job_ids, 1)
    assert Counter(r["job_id"] for r in runs if r["finished_at"] is not None) == Counter(job_ids)
    assert sorted((r["job_id"], r["attempt"], r["pid"], r["outcome"]) for r in runs) == sorted(
        [(j, 1, first.pid, None) for j in killed]
        + [(j, 2, second.pid, "succeeded") for j in killed]
        + [(j, 1, second.pid, "succeeded") for j in set(job_ids) - killed]
    )


@pytest.mark.slow
async def test_services_resume_without_restart_after_nats_server_restarts(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """D3: a broker restart is ridden out by reconnecting, in the gateway and the worker."""
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)

    async with services.client() as client:
        before = [await submit_planned(client, db, sleep_s=3) for _ in range(3)]
        await wait_for_a_run(db)
        await nats_server.restart()
        await wait_until_ready(client, timeout_s=20)
        after = [await submit_planned(client, db, sleep_s=0.5) for _ in range(2)]
        jobs = await wait_for_jobs(client, before + after, timeout_s=60)

    assert [process.returncode for process in services.processes] == [None, None]
    assert {j: job["state"] for j, job in jobs.items()} == dict.fromkeys(
        before + after, "succeeded"
    )
    assert await result_counts(db) == dict.fromkeys(before + after, 1)


@pytest.mark.slow
async def test_job_finishing_while_nats_server_is_down_ends_succeeded_without_rerun(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """D3: the result is stored, but neither its event nor the ack can get out."""
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)

    async with services.client() as client:
        job_id = await submit_planned(client, db, sleep_s=2)
        await wait_for_a_run(db)
        await nats_server.stop()

        async def finished() -> bool | None:
            return any(run["finished_at"] is not None for run in await runs_of(db)) or None

        await eventually(finished, timeout_s=20, what="the run to finish while nats is down")
        await nats_server.restart()
        job = await wait_for_job(client, job_id, timeout_s=40)
    runs = await runs_of(db)

    assert [process.returncode for process in services.processes] == [None, None]
    assert job["state"] == "succeeded"
    assert [(r["attempt"], r["outcome"]) for r in runs] == [(1, "succeeded")]
    assert await result_counts(db) == {job_id: 1}


async def test_failed_attempt_is_retried_and_the_job_succeeds_on_the_next(
    services: Services, db: asyncpg.Pool
) -> None:
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)

    async with services.client() as client:
        job_id = await submit(client, await plan_job(db, sleep_s=0.1, fail_first=1))
        job = await wait_for_job(client, job_id, timeout_s=30)
    runs = await runs_of(db)

    assert job["state"] == "succeeded"
    assert attempt_history(job) == [(1, "retried"), (2, "succeeded")]
    assert job["attempts"][0]["error"] == {
        "type": "RuntimeError",
        "message": "planned failure of attempt 1",
    }
    assert [(r["attempt"], r["outcome"]) for r in runs] == [(1, "failed"), (2, "succeeded")]
    assert await result_counts(db) == {job_id: 1}


async def test_submission_answers_503_and_other_routes_answer_while_nats_server_is_down(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """D4, first half: refuse at once, record nothing, keep reading and reporting."""
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)
    async with services.client() as client:
        existing = await submit_planned(client, db, sleep_s=0.1)
        await wait_for_job(client, existing, timeout_s=30)
        dataset_id = await plan_job(db, sleep_s=0.1)

        await nats_server.stop()
        refused = await answer_within(
            5, client.post("/api/analysis", json={"dataset_id": dataset_id})
        )
        status = await answer_within(5, client.get(f"/api/jobs/{existing}"))

        async def reported_down() -> httpx.Response | None:
            response = await client.get("/health/ready")
            return response if response.status_code == 503 else None

        ready = await eventually(reported_down, timeout_s=5, what="readiness to report nats")

    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "5"
    assert refused.json()["status"] == 503
    assert status.status_code == 200
    assert status.json()["state"] == "succeeded"
    assert ready.json() == {
        "status": "unavailable",
        "checks": {"nats": "down: not connected", "database": "ok"},
    }
    assert await job_ids_recorded(db) == {existing}


async def test_first_submission_after_nats_server_returns_is_accepted_and_runs(
    services: Services, db: asyncpg.Pool, nats_server: NatsServer
) -> None:
    """D4, second half: once ready again, the very next submission is a 202 that runs."""
    await services.start_gateway(**QUEUE_ENV)
    await start_sleeper(services, **QUEUE_ENV)
    refused_dataset, dataset_id = await plan_job(db, sleep_s=0.1), await plan_job(db, sleep_s=0.1)
    async with services.client() as client:
        await nats_server.stop()
        refused = await answer_within(
            5, client.post("/api/analysis", json={"dataset_id": refused_dataset})
        )

        await nats_server.restart()
        await wait_until_ready(client, timeout_s=20)
        accepted = await answer_within(
            5, client.post("/api/analysis", json={"dataset_id": dataset_id})
        )
        assert accepted.status_code == 202, accepted.text
        job = await wait_for_job(client, accepted.json()["job_id"], timeout_s=30)

    assert refused.status_code == 503, refused.text
    assert job["state"] == "succeeded"
    assert job["attempt"] == 1
    assert await job_ids_recorded(db) == {job["job_id"]}
    assert await result_counts(db) == {job["job_id"]: 1}


@pytest.mark.slow
async def test_sigterm_hands_a_job_outlasting_the_grace_back_to_another_process(
    services: Services, db: asyncpg.Pool
) -> None:
    """Graceful shutdown: exit 0 within the grace, the job finishes elsewhere, never twice."""
    grace_s = 2.0
    env = {**QUEUE_ENV, "TRINITY_WORKER_SHUTDOWN_GRACE_S": f"{grace_s:g}"}
    await services.start_gateway(**env)
    first = await start_sleeper(services, **env)

    async with services.client() as client:
        job_id = await submit_planned(client, db, sleep_s=6)
        await wait_for_a_run(db)
        second = await start_sleeper(services, **env)
        first.signal(signal.SIGTERM)
        # The grace, then the nak and the connection's drain, which are quick.
        exit_status = await first.wait(grace_s + 8)
        job = await wait_for_job(client, job_id, timeout_s=40)
    runs = await runs_of(db)

    assert exit_status == 0, tail(first)
    assert job["state"] == "succeeded"
    assert attempt_history(job) == [(1, "handed_back"), (2, "succeeded")]
    assert [(r["attempt"], r["pid"], r["outcome"]) for r in runs] == [
        (1, first.pid, "cancelled"),
        (2, second.pid, "succeeded"),
    ]
    assert runs[1]["started_at"] > runs[0]["finished_at"], "the two runs overlapped"
    assert await result_counts(db) == {job_id: 1}


@pytest.mark.slow
async def test_every_accepted_job_succeeds_once_despite_sigkills_at_random_moments(
    services: Services, db: asyncpg.Pool
) -> None:
    """Kill the only worker five times, each at a moment drawn at random, while jobs flow.

    The moments are events, not delays: at once, once some run started, or once
    some run finished (the window between the work and its ack).
    """
    seed = secrets.randbits(32)
    rng = random.Random(seed)  # noqa: S311 - drawing kill moments, not secrets
    env = {
        **QUEUE_ENV,
        # Ack wait 5 s; enough attempts that no job can run out of them.
        "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "4",
        "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
        "TRINITY_QUEUE_ANALYSIS_RETRIES": "8",
    }
    await services.start_gateway(**env)
    moments = []

    async with services.client() as client:
        accepted: list[str] = []
        for _ in range(5):
            runs = await runs_of(db)
            sleeper = await start_sleeper(services, **env)
            for _ in range(2):
                accepted.append(await submit_planned(client, db, sleep_s=rng.uniform(0.3, 1.5)))
            moment, more = rng.choice(["at once", "started", "finished"]), rng.randint(1, 2)
            moments.append(f"{moment} +{more}")
            await eventually(
                moment_reached(db, moment, runs, more), timeout_s=30, what=f"moment {moment}"
            )
            await sleeper.kill()
        await start_sleeper(services, **env)
        jobs = await wait_for_jobs(client, accepted, timeout_s=60)

    context = f"seed {seed}, kills {moments}"
    assert {j: job["state"] for j, job in jobs.items()} == dict.fromkeys(accepted, "succeeded"), (
        context
    )
    assert await result_counts(db) == dict.fromkeys(accepted, 1), context
    assert await job_ids_recorded(db) == set(accepted), context


def moment_reached(
    db: asyncpg.Pool, moment: str, before: list[Any], more: int
) -> Callable[[], Awaitable[bool | None]]:
    async def reached() -> bool | None:
        if moment == "at once":
            return True
        runs = await runs_of(db)
        if moment == "started":
            return len(runs) >= len(before) + more or None
        finished = sum(r["finished_at"] is not None for r in runs)
        return finished >= sum(r["finished_at"] is not None for r in before) + more or None

    return reached
