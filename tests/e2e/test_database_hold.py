"""D7, from the worker's side: a database outage spends none of a job's attempts.

A worker whose job meets an outage holds the job, keeping its ack deadline away,
until the database answers again; a nak instead would spend an attempt each time,
and a long enough outage would dead-letter a healthy job. The outage here is a
throwaway cluster of the test's own, paused with SIGSTOP for three ack waits.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    from trinity_common.devstack import NatsServer

# Ack wait 3 s: the pause below outlasts it three times over.
QUEUE = msgspec.structs.replace(ANALYSIS, timeout_s=2, ack_margin_s=1, concurrency=1)
PAUSE_S = 3 * QUEUE.ack_wait_s
RESULT_TIMEOUT_S = 30.0


@pytest.mark.slow
async def test_job_caught_by_a_database_pause_runs_once_on_its_first_delivery(
    nats_server: NatsServer,
) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        return JobResult(data={"rows": 1})

    async with contextlib.AsyncExitStack() as stack:
        postgres = await PostgresServer.start()
        stack.push_async_callback(postgres.stop)
        database = await Database.create(server=postgres, name_prefix="trinity_hold")
        stack.push_async_callback(database.drop)
        pool = await create_pool(
            ConnectionSettings(database_url=database.url, database_timeout_s=0.5)
        )
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
        assert postgres.pid is not None

        async with paused(postgres.pid):
            envelope = await submit_job(js, QUEUE, RunAnalysis(dataset_id="0" * 32))
            await asyncio.sleep(PAUSE_S)
        stored = await eventually(
            lambda: pool.fetchval(
                "SELECT attempt FROM job_results WHERE job_id = $1", envelope.job_id
            ),
            timeout_s=RESULT_TIMEOUT_S,
            what="the job's result",
        )
        consumer = await js.consumer_info(names.JOBS_STREAM, QUEUE.durable)

    assert attempts == [1]
    assert stored == 1
    assert consumer.delivered is not None
    assert consumer.delivered.consumer_seq == 1, "the job was delivered more than once"
