"""D7, from the worker's side: a database outage spends none of a job's attempts.

A worker whose job meets an outage holds the job, keeping its ack deadline away,
until the database answers again; a nak instead would spend an attempt each time,
and a long enough outage would dead-letter a healthy job. The outage here is a
throwaway cluster of the test's own, paused with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest

from tests.common.conftest import ANALYSIS
from tests.e2e.test_database_outage import paused
from tests.support import eventually
from trinity_common import broker, names
from trinity_common.client import submit_job
from trinity_common.commands import RunAnalysis
from trinity_common.database import apply_migrations, create_pool
from trinity_common.devstack import Database, PostgresServer
from trinity_common.settings import ConnectionSettings
from trinity_common.worker import JobContext, JobResult, Worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import asyncpg
    from nats.js import JetStreamContext

    from trinity_common.devstack import NatsServer
    from trinity_common.worker import Handler

# Ack wait 11 s, the pause 9 s: an attempt outlives the pause, while a worker that
# gave a job back after half its ack wait (5.5 s) would spend a delivery on it.
QUEUE = msgspec.structs.replace(ANALYSIS, timeout_s=10, ack_margin_s=1, concurrency=1)
PAUSE_S = 9.0
COMMAND = RunAnalysis(dataset_id="0" * 32)
RESULT_TIMEOUT_S = 30.0


@dataclass
class Held:
    """A worker on a cluster of its own, which the test may pause."""

    js: JetStreamContext
    pool: asyncpg.Pool
    postgres: PostgresServer

    async def result_attempt(self, job_id: str) -> int:
        """Wait for the job's stored result and return the attempt that stored it."""
        attempt: int = await eventually(
            lambda: self.pool.fetchval("SELECT attempt FROM job_results WHERE job_id = $1", job_id),
            timeout_s=RESULT_TIMEOUT_S,
            what="the job's result",
        )
        return attempt

    async def deliveries(self) -> int:
        """Return how many times the queue's consumer delivered a message."""
        consumer = await self.js.consumer_info(names.JOBS_STREAM, QUEUE.durable)
        assert consumer.delivered is not None
        return int(consumer.delivered.consumer_seq)


@contextlib.asynccontextmanager
async def held_worker(nats_server: NatsServer, handler: Handler) -> AsyncIterator[Held]:
    async with contextlib.AsyncExitStack() as stack:
        postgres = await PostgresServer.start()
        stack.push_async_callback(postgres.stop)
        database = await Database.create(server=postgres, name_prefix="trinity_hold")
        stack.push_async_callback(database.drop)
        settings = ConnectionSettings(database_url=database.url, database_timeout_s=0.5)
        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        await apply_migrations(pool)
        nc = await nats.connect(nats_server.url)
        stack.push_async_callback(nc.close)
        js = nc.jetstream()
        await broker.ensure_streams(js)
        await broker.ensure_work_consumer(js, QUEUE)
        worker = Worker(queue=QUEUE, handler=handler, nc=nc, js=js, pool=pool, shutdown_grace_s=1)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        stack.push_async_callback(asyncio.wait_for, running, 10)
        stack.callback(stop.set)
        yield Held(js=js, pool=pool, postgres=postgres)


@pytest.mark.slow
async def test_job_caught_by_a_database_pause_runs_once_on_its_first_delivery(
    nats_server: NatsServer,
) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        return JobResult(data={"rows": 1})

    async with held_worker(nats_server, handler) as held:
        assert held.postgres.pid is not None
        async with paused(held.postgres.pid):
            envelope = await submit_job(held.js, QUEUE, COMMAND)
            await asyncio.sleep(PAUSE_S)
        stored = await held.result_attempt(envelope.job_id)
        deliveries = await held.deliveries()

    assert attempts == [1]
    assert (stored, deliveries) == (1, 1)


@pytest.mark.slow
async def test_handler_query_waits_out_a_database_pause_within_its_attempt(
    nats_server: NatsServer,
) -> None:
    attempts: list[int] = []
    running, paused_now = asyncio.Event(), asyncio.Event()

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        running.set()
        await paused_now.wait()
        answer = await context.patiently(context.pool.fetchval, "SELECT 41 + 1")
        return JobResult(data={"answer": answer})

    async with held_worker(nats_server, handler) as held:
        assert held.postgres.pid is not None
        envelope = await submit_job(held.js, QUEUE, COMMAND)
        await asyncio.wait_for(running.wait(), timeout=RESULT_TIMEOUT_S)
        async with paused(held.postgres.pid):
            paused_now.set()
            await asyncio.sleep(PAUSE_S)
        stored = await held.result_attempt(envelope.job_id)
        deliveries = await held.deliveries()

    assert attempts == [1]
    assert (stored, deliveries) == (1, 1)
