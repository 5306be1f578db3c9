"""The worker runtime against real NATS and PostgreSQL: ack, retry, fail, cancel, reap."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest

from tests.common.conftest import ANALYSIS, STOP_TIMEOUT_S
from tests.support import TERMINAL
from trinity_common import broker, names
from trinity_common.client import submit_job
from trinity_common.commands import RunAnalysis
from trinity_common.errors import PermanentJobError
from trinity_common.messages import CancelRequest, JobCancelled, utc_now
from trinity_common.offload import ProcessOffloader
from trinity_common.status import publish_status
from trinity_common.worker import JobContext, JobResult, Worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from tests.common.conftest import Platform
    from trinity_common.messages import JobEnvelope
    from trinity_common.queues import QueueSettings
    from trinity_common.worker import Handler

pytestmark = pytest.mark.timeout(60)

COMMAND = RunAnalysis(dataset_id="0" * 32)

LONGER_THAN_ANY_TEST_S = 60.0
"""How long a handler that must be stopped would work; past every deadline of these tests."""

CANCEL_DEADLINE_S = 1.0
"""How soon a cancelled handler must stop; cancelling a task takes one loop iteration."""

START_TIMEOUT_S = 10.0
"""Deadline for a submitted job to reach its handler."""


def shortest_backoff_s(queue: QueueSettings, attempt: int) -> float:
    """Return the least delay the policy allows after ``attempt``: half its ceiling."""
    return min(queue.backoff_max_s, queue.backoff_base_s * 2.0 ** (attempt - 1)) / 2


def is_gone(pid: int) -> bool:
    """Return whether no process has id ``pid`` any more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def own_pid(*, progress: Callable[[float, str], None]) -> int:
    """Return the id of the offloader process this runs in."""
    return os.getpid()


def own_process_group(*, progress: Callable[[float, str], None]) -> int:
    """Return the process group of the offloader process this runs in."""
    return os.getpgrp()


def spin_past_timeout(pid_file: str, *, progress: Callable[[float, str], None]) -> None:
    """Write this process's id, then keep a CPU busy far past the attempt's timeout."""
    Path(pid_file).write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + LONGER_THAN_ANY_TEST_S
    while time.monotonic() < deadline:
        pass


async def succeed(context: JobContext) -> JobResult:
    """A handler whose every attempt succeeds at once."""
    return JobResult(data={"rows": 8})


@dataclass(eq=False)
class BlockingHandler:
    """A handler that works until it is stopped, noting when it runs and when it stops."""

    attempts: list[int] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, context: JobContext) -> JobResult:
        self.attempts.append(context.attempt)
        self.running.set()
        try:
            await asyncio.sleep(LONGER_THAN_ANY_TEST_S)
        finally:
            self.stopped.set()
        return JobResult(data=None)


@contextlib.asynccontextmanager
async def stoppable_worker(
    platform: Platform, handler: Handler, *, queue: QueueSettings, shutdown_grace_s: float
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Run a worker, yielding what stops it the way SIGTERM does; it is stopped on exit too.

    The platform's own workers run until the test ends; this one ends on cue.
    """
    await broker.ensure_work_consumer(platform.js, queue)
    worker = Worker(
        queue=queue,
        handler=handler,
        nc=platform.nc,
        js=platform.js,
        pool=platform.pool,
        shutdown_grace_s=shutdown_grace_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="stoppable worker")

    async def stop_worker() -> None:
        stop.set()
        await asyncio.wait_for(task, timeout=STOP_TIMEOUT_S)

    try:
        yield stop_worker
    finally:
        await stop_worker()


async def start_job_on_a_worker_that_dies(platform: Platform, queue: QueueSettings) -> JobEnvelope:
    """Submit a job, and once a worker runs it, end that worker the way a crash would.

    Its connection drops without an ack or a word, and its code stops.
    """
    handler = BlockingHandler()
    doomed = await platform.connect()
    running = await platform.start_worker(handler, queue=queue, nc=doomed, shutdown_grace_s=0.1)
    envelope = await submit_job(platform.js, queue, COMMAND)
    await asyncio.wait_for(handler.running.wait(), timeout=START_TIMEOUT_S)
    await doomed.close()
    await platform.abandon(running.background)
    return envelope


@pytest.fixture
async def offloader() -> AsyncIterator[ProcessOffloader]:
    """An offloader with one process, spawned already so that costs no attempt time."""
    started = await asyncio.to_thread(ProcessOffloader, workers=1)
    try:
        await started.run(own_pid)
        yield started
    finally:
        await asyncio.to_thread(started.close)


async def test_worker_acks_successful_job_once_and_stores_its_result(platform: Platform) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        await context.report_progress(40, "counting rows")
        return JobResult(data={"rows": 8}, summary={"rows": 8})

    await platform.start_worker(handler)

    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)
    consumer = await platform.wait_for_settled(deliveries=1)

    assert (job["state"], job["attempt"], job["progress_percent"]) == ("succeeded", 1, 100.0)
    assert job["summary"] == {"rows": 8}
    assert attempts == [1]
    results = await platform.results(envelope.job_id)
    assert [(row["result"], row["summary"]) for row in results] == [({"rows": 8}, {"rows": 8})]
    assert consumer.ack_floor is not None
    assert (consumer.ack_floor.consumer_seq, consumer.num_redelivered) == (1, 0)
    assert await platform.work_stream_messages() == 0


async def test_worker_keeps_running_when_idle_fetch_times_out(
    platform: Platform, time_out_next_fetch: Callable[[str], asyncio.Event]
) -> None:
    timed_out = time_out_next_fetch(ANALYSIS.durable)
    await platform.start_worker(succeed)
    await asyncio.wait_for(timed_out.wait(), timeout=START_TIMEOUT_S)

    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    assert (job["state"], job["attempt"]) == ("succeeded", 1)


async def test_worker_retries_failed_attempts_after_backoff(platform: Platform) -> None:
    """Case D1 on the analysis queue: attempts spaced by the backoff, never back to back.

    The webhook form of the case waits for the notify service, which has no queue handler yet.
    """
    started_at: list[float] = []

    async def handler(context: JobContext) -> JobResult:
        started_at.append(time.monotonic())
        if context.attempt < 3:
            raise RuntimeError(f"boom {context.attempt}")
        return JobResult(data="third time lucky")

    await platform.start_worker(handler)

    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    assert (job["state"], job["attempt"]) == ("succeeded", 3)
    assert await platform.attempts(envelope.job_id) == [
        (1, "retried", "RuntimeError", "boom 1"),
        (2, "retried", "RuntimeError", "boom 2"),
        (3, "succeeded", None, None),
    ]
    gaps = [later - earlier for earlier, later in itertools.pairwise(started_at)]
    floors = [shortest_backoff_s(ANALYSIS, attempt) for attempt in (1, 2)]
    assert [gap >= floor for gap, floor in zip(gaps, floors, strict=True)] == [True, True], (
        f"attempt starts {gaps} s apart, the backoff allows no less than {floors} s"
    )


async def test_worker_dead_letters_job_after_last_attempt(platform: Platform) -> None:
    async def handler(context: JobContext) -> JobResult:
        raise RuntimeError(f"boom {context.attempt}")

    await platform.start_worker(handler)

    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)
    await platform.wait_for_empty_work_stream()

    gave_up = "gave up after 3 attempts; last error: boom 3"
    assert (job["state"], job["attempt"], job["dead_lettered"]) == ("failed", 3, True)
    assert (job["error_type"], job["error_message"]) == ("RuntimeError", gave_up)
    [(subject, letter)] = await platform.dead_letters()
    assert subject == "trinity.dead.analysis"
    assert letter.envelope == envelope
    assert (letter.attempts, letter.error_type, letter.error_message) == (
        3,
        "RuntimeError",
        gave_up,
    )
    # The last attempt's own row may or may not be projected yet when the letter
    # is written; the earlier ones were, a backoff before it started.
    assert [(h.attempt, h.error_type, h.error_message) for h in letter.history[:2]] == [
        (1, "RuntimeError", "boom 1"),
        (2, "RuntimeError", "boom 2"),
    ]


async def test_worker_fails_job_at_once_on_permanent_error(platform: Platform) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        raise PermanentJobError("the dataset has no rows", error_type="no_rows")

    await platform.start_worker(handler)

    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)
    await platform.wait_for_settled(deliveries=1)
    await platform.wait_for_empty_work_stream()

    assert (job["state"], job["attempt"], job["dead_lettered"]) == ("failed", 1, True)
    assert (job["error_type"], job["error_message"]) == ("no_rows", "the dataset has no rows")
    assert attempts == [1]
    assert await platform.attempts(envelope.job_id) == [
        (1, "failed", "no_rows", "the dataset has no rows")
    ]


async def test_worker_fails_job_whose_command_it_cannot_read_and_keeps_the_message(
    platform: Platform,
) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        return JobResult(data=None)

    await platform.start_worker(handler)
    # A command this service's AnalysisOptions refuses, as a submitter that
    # validates less (or differently) could still publish it.
    job_id = "f" * 32
    payload = msgspec.json.encode(
        {
            "job_id": job_id,
            "queue": "analysis",
            "created_at": utc_now(),
            "command": {
                "type": "run_analysis",
                "dataset_id": "0" * 32,
                "options": {"encoding": "idna"},
            },
        }
    )

    await platform.js.publish(names.job_subject("analysis"), payload, stream=names.JOBS_STREAM)
    job = await platform.wait_for_job(job_id, states=TERMINAL)
    await platform.wait_for_settled(deliveries=1)
    await platform.wait_for_empty_work_stream()
    dead = await platform.js.get_msg(names.DEAD_STREAM, subject=ANALYSIS.dead_subject)

    assert (job["state"], job["attempt"], job["dead_lettered"]) == ("failed", 1, True)
    assert job["error_type"] == "bad_payload"
    assert job["error_message"].startswith("the analysis service cannot read this job: ")
    assert "options.encoding 'idna' cannot decode a file" in job["error_message"]
    assert dead.data == payload
    assert attempts == []


async def test_worker_retries_attempt_that_outlasts_timeout(platform: Platform) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=0.5, retries=1)
    stopped: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        if context.attempt == 1:
            try:
                await asyncio.sleep(LONGER_THAN_ANY_TEST_S)
            except asyncio.CancelledError:
                stopped.append(context.attempt)
                raise
        return JobResult(data="in time")

    await platform.start_worker(handler, queue=queue)

    envelope = await submit_job(platform.js, queue, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    assert (job["state"], job["attempt"]) == ("succeeded", 2)
    assert await platform.attempts(envelope.job_id) == [
        (1, "retried", "timeout", "attempt exceeded the analysis queue's 0.5 s timeout"),
        (2, "succeeded", None, None),
    ]
    assert stopped == [1]


async def test_offloaded_work_is_out_of_reach_of_signals_to_the_services_group(
    offloader: ProcessOffloader,
) -> None:
    """SIGTERM to the whole group (Ctrl-C, ``kill -- -pgid``) must reach the service alone.

    It then hands running jobs back after its grace; a child killed by the same
    signal would instead fail the attempt and spend a retry.
    """
    group = await offloader.run(own_process_group)

    assert group != os.getpgrp()


async def test_worker_kills_offloaded_process_at_attempt_deadline(
    platform: Platform, offloader: ProcessOffloader, tmp_path: Path
) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=2, retries=0)
    pid_file = tmp_path / "child.pid"

    async def handler(context: JobContext) -> JobResult:
        await offloader.run(spin_past_timeout, str(pid_file))
        return JobResult(data=None)

    await platform.start_worker(handler, queue=queue)

    envelope = await submit_job(platform.js, queue, COMMAND)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)
    pid = int(pid_file.read_text(encoding="utf-8"))

    async def child_gone() -> bool | None:
        return is_gone(pid) or None

    await platform.wait_until(child_gone, timeout_s=5, what=f"offloaded process {pid} to end")
    assert (job["state"], job["attempt"], job["error_type"]) == ("failed", 1, "timeout")
    assert job["error_message"] == (
        "gave up after 1 attempt; last error: attempt exceeded the analysis queue's 2 s timeout"
    )
    # Heartbeats are the only progress events here: the child reports none.
    assert job["started_at"] < job["heartbeat_at"] <= job["finished_at"]


async def test_worker_acks_redelivered_job_without_running_it_again(platform: Platform) -> None:
    attempts: list[int] = []

    async def handler(context: JobContext) -> JobResult:
        attempts.append(context.attempt)
        return JobResult(data={"rows": 8})

    await platform.start_worker(handler)
    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    await platform.js.publish(
        ANALYSIS.subject,
        msgspec.json.encode(envelope),
        stream=names.JOBS_STREAM,
        headers={names.HEADER_MSG_ID: f"{envelope.job_id}.duplicate"},
    )
    await platform.wait_for_settled(deliveries=2)

    assert attempts == [1]
    assert len(await platform.results(envelope.job_id)) == 1
    job = await platform.job(envelope.job_id)
    assert job is not None
    assert (job["state"], job["attempt"]) == ("succeeded", 1)
    assert await platform.work_stream_messages() == 0


async def test_worker_cancel_job_stops_running_handler(platform: Platform) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=30)
    handler = BlockingHandler()
    running = await platform.start_worker(handler, queue=queue)
    envelope = await submit_job(platform.js, queue, COMMAND)
    await asyncio.wait_for(handler.running.wait(), timeout=START_TIMEOUT_S)

    found = running.worker.cancel_job(envelope.job_id, reason="no longer needed")
    await asyncio.wait_for(handler.stopped.wait(), timeout=CANCEL_DEADLINE_S)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)
    await platform.wait_for_empty_work_stream()

    assert found is True
    assert (job["state"], job["error_type"], job["error_message"]) == (
        "cancelled",
        "cancelled",
        "no longer needed",
    )
    assert handler.attempts == [1]


async def test_cancel_request_broadcast_stops_running_handler(platform: Platform) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=30)
    handler = BlockingHandler()
    await platform.start_worker(handler, queue=queue)
    envelope = await submit_job(platform.js, queue, COMMAND)
    await asyncio.wait_for(handler.running.wait(), timeout=START_TIMEOUT_S)
    gateway = await platform.connect()

    request = CancelRequest(job_id=envelope.job_id, reason="no longer needed")
    await gateway.publish(names.cancel_subject("analysis"), msgspec.json.encode(request))
    await gateway.flush()
    await asyncio.wait_for(handler.stopped.wait(), timeout=CANCEL_DEADLINE_S)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    assert (job["state"], job["error_type"], job["error_message"]) == (
        "cancelled",
        "cancelled",
        "no longer needed",
    )
    assert handler.attempts == [1]


async def test_worker_never_runs_job_cancelled_before_delivery(platform: Platform) -> None:
    envelope = await submit_job(platform.js, ANALYSIS, COMMAND)
    cancelled = JobCancelled(
        job_id=envelope.job_id, queue="analysis", at=utc_now(), reason="no longer needed"
    )
    await publish_status(platform.js, cancelled, ack_timeout_s=2)
    await platform.wait_for_job(envelope.job_id, states={"cancelled"})
    handler = BlockingHandler()

    await platform.start_worker(handler)
    await platform.wait_for_settled(deliveries=1)
    await platform.wait_for_empty_work_stream()

    assert handler.attempts == []
    job = await platform.job(envelope.job_id)
    assert job is not None
    assert (job["state"], job["attempt"], job["error_message"]) == (
        "cancelled",
        0,
        "no longer needed",
    )


async def test_reaper_fails_job_whose_worker_died_in_last_attempt(platform: Platform) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=1, retries=0, concurrency=1)
    platform.start_reaper()
    envelope = await start_job_on_a_worker_that_dies(platform, queue)
    job = await platform.wait_for_job(
        envelope.job_id, states=TERMINAL, timeout_s=queue.ack_wait_s + 10
    )
    await platform.wait_for_empty_work_stream()

    explanation = "attempt 1 stopped reporting (its worker died or hung) and no attempts are left"
    assert (job["state"], job["attempt"], job["dead_lettered"]) == ("failed", 1, True)
    assert (job["error_type"], job["error_message"]) == ("attempts_exhausted", explanation)
    [(subject, letter)] = await platform.dead_letters()
    assert subject == "trinity.dead.analysis"
    assert letter.envelope == envelope
    assert (letter.attempts, letter.error_type) == (1, "attempts_exhausted")


async def test_worker_closes_attempt_of_a_dead_worker_as_lost_when_job_runs_again(
    platform: Platform,
) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=2, concurrency=1)
    envelope = await start_job_on_a_worker_that_dies(platform, queue)
    await platform.start_worker(succeed, queue=queue)
    job = await platform.wait_for_job(
        envelope.job_id, states=TERMINAL, timeout_s=queue.ack_wait_s + 10
    )

    assert (job["state"], job["attempt"]) == ("succeeded", 2)
    assert await platform.attempts(envelope.job_id) == [
        (1, "lost", "lost", "the worker stopped reporting; the job was delivered again"),
        (2, "succeeded", None, None),
    ]
    first, second = await platform.pool.fetch(
        "SELECT started_at, finished_at FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
        envelope.job_id,
    )
    assert first["finished_at"] == second["started_at"]


async def test_worker_shows_job_queued_again_when_shutdown_hands_it_back(
    platform: Platform,
) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=30)
    handler = BlockingHandler()
    async with stoppable_worker(
        platform, handler, queue=queue, shutdown_grace_s=0.1
    ) as stop_worker:
        envelope = await submit_job(platform.js, queue, COMMAND)
        await asyncio.wait_for(handler.running.wait(), timeout=START_TIMEOUT_S)
        await platform.wait_for_job(envelope.job_id, states={"running"})

        await stop_worker()
    job = await platform.wait_for_job(envelope.job_id, states={"queued"})

    assert handler.stopped.is_set()
    assert (job["attempt"], job["progress_percent"], job["progress_message"]) == (
        1,
        0.0,
        "handed back by a stopping worker",
    )
    assert job["finished_at"] is None
    assert await platform.attempts(envelope.job_id) == [(1, "handed_back", None, None)]


async def test_worker_runs_handed_back_job_again_as_its_next_attempt(platform: Platform) -> None:
    queue = msgspec.structs.replace(ANALYSIS, timeout_s=30)
    handler = BlockingHandler()
    async with stoppable_worker(
        platform, handler, queue=queue, shutdown_grace_s=0.1
    ) as stop_worker:
        envelope = await submit_job(platform.js, queue, COMMAND)
        await asyncio.wait_for(handler.running.wait(), timeout=START_TIMEOUT_S)
        await stop_worker()

    await platform.start_worker(succeed, queue=queue)
    job = await platform.wait_for_job(envelope.job_id, states=TERMINAL)

    assert (job["state"], job["attempt"]) == ("succeeded", 2)
    assert await platform.attempts(envelope.job_id) == [
        (1, "handed_back", None, None),
        (2, "succeeded", None, None),
    ]
