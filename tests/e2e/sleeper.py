"""A stand-in for the analysis service whose jobs only sleep, on the real worker runtime.

Run it as ``python -m tests.e2e.sleeper`` from the repository root. It consumes
the analysis queue like ``trinity_analysis`` does, but each job's dataset id is
a key into ``sleeper_plans``, a table the test fills in the job's database:
how long the job sleeps and how many of its first attempts fail. Every attempt
is recorded in ``sleeper_runs`` when it starts and again when it ends, so a
test can see which process ran what, and whether two runs of a job overlapped.

The test creates both tables (`SLEEPER_TABLES`); the service never does, so a
test that forgot them fails at the first job instead of passing by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from trinity_common.commands import RunAnalysis
from trinity_common.errors import PermanentJobError
from trinity_common.service import run_worker_service
from trinity_common.worker import JobContext, JobResult

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trinity_common.queues import QueueSettings
    from trinity_common.worker import Handler

__all__ = ["SLEEPER_TABLES", "provide_handler", "sleep_through_plan"]

SLEEPER_TABLES = """
CREATE TABLE sleeper_plans (
    dataset_id  text PRIMARY KEY,
    sleep_s     real NOT NULL,
    fail_first  integer NOT NULL DEFAULT 0
);
CREATE TABLE sleeper_runs (
    run_id       bigserial PRIMARY KEY,
    job_id       text NOT NULL,
    attempt      integer NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at  timestamptz,
    -- 'succeeded', 'failed' or 'cancelled'; NULL while running, or if the process died.
    outcome      text
);
"""
"""The tables a test creates in the job database before it starts a sleeper."""

STEP_S = 0.1
"""How long the handler sleeps between two progress reports."""


@contextlib.asynccontextmanager
async def provide_handler(queue: QueueSettings) -> AsyncIterator[Handler]:
    """Yield the sleeping handler; it holds nothing to release."""
    yield sleep_through_plan


async def sleep_through_plan(context: JobContext) -> JobResult:
    """Sleep as long as the job's plan says, failing its first ``fail_first`` attempts."""
    command = context.command
    if not isinstance(command, RunAnalysis):
        raise PermanentJobError("the sleeper runs analysis commands only", error_type="bad_command")
    plan = await context.pool.fetchrow(
        "SELECT sleep_s, fail_first FROM sleeper_plans WHERE dataset_id = $1", command.dataset_id
    )
    if plan is None:
        raise PermanentJobError(
            f"no sleeper plan for dataset {command.dataset_id}", error_type="no_plan"
        )
    run_id = await context.pool.fetchval(
        "INSERT INTO sleeper_runs (job_id, attempt, pid) VALUES ($1, $2, $3) RETURNING run_id",
        context.job_id,
        context.attempt,
        os.getpid(),
    )

    try:
        await _sleep_reporting(context, plan["sleep_s"])
    except asyncio.CancelledError:
        # Shutdown outlasted its grace: record that this run stopped, so a test
        # can tell a handed-back job from one whose process died.
        await _record_end(context, run_id, "cancelled")
        raise
    if context.attempt <= plan["fail_first"]:
        await _record_end(context, run_id, "failed")
        raise RuntimeError(f"planned failure of attempt {context.attempt}")
    await _record_end(context, run_id, "succeeded")

    summary = {"dataset_id": command.dataset_id, "attempt": context.attempt}
    return JobResult(data={"slept_s": plan["sleep_s"], "pid": os.getpid()}, summary=summary)


async def _sleep_reporting(context: JobContext, sleep_s: float) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (elapsed := loop.time() - started) < sleep_s:
        await context.report_progress(100.0 * elapsed / sleep_s, "sleeping")
        await asyncio.sleep(min(STEP_S, sleep_s - elapsed))


async def _record_end(context: JobContext, run_id: int, outcome: str) -> None:
    await context.pool.execute(
        "UPDATE sleeper_runs SET finished_at = clock_timestamp(), outcome = $2 WHERE run_id = $1",
        run_id,
        outcome,
    )


def main() -> None:
    """Consume the analysis queue until SIGTERM."""
    run_worker_service(
        service="sleeper", queue_name="analysis", provide_handler=provide_handler, env=os.environ
    )


if __name__ == "__main__":
    main()
