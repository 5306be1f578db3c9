"""Submitting jobs and following them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import asyncpg
import msgspec
from litestar import Controller, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import HTTP_202_ACCEPTED, HTTP_422_UNPROCESSABLE_ENTITY

from trinity_common.client import BrokerUnavailableError, submit_job
from trinity_common.commands import RunAnalysis
from trinity_gateway.problems import problem_spec
from trinity_gateway.schemas import (
    AcceptedResponse,
    AnalysisResponse,
    Attempt,
    JobError,
    JobResponse,
    JobResult,
    Progress,
    RunAnalysisRequest,
)

if TYPE_CHECKING:
    from trinity_common.commands import Command
    from trinity_common.messages import JobEnvelope

logger = logging.getLogger(__name__)

__all__ = ["JobController", "accept_job"]

JobId = Annotated[
    str,
    PathParameter(pattern=r"^[0-9a-f]{32}$", description="A job id, as returned on submission."),
]


def status_url(job_id: str) -> str:
    """Return the path of a job's status document."""
    return f"/api/jobs/{job_id}"


async def accept_job(state: State, queue_name: str, command: Command) -> AcceptedResponse:
    """Publish a job, then record it as queued, and answer only once both are done.

    JetStream's ack is what makes the job durable, so nothing is written before
    it: a failed publish leaves nothing behind. The record written afterwards
    lets a read right after the answer find the job queued; should that write
    fail, the job still runs and the status projection creates the record from
    the job's accepted event, so the answer stays 202.
    """
    if not state.nc.is_connected:
        raise BrokerUnavailableError("NATS is not connected")
    queue = state.queues[queue_name]
    envelope = await submit_job(
        state.js, queue, command, ack_timeout_s=state.settings.nats_timeout_s
    )
    try:
        await _record_queued(state.pool, envelope, max_attempts=queue.max_attempts)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        logger.warning(
            "queued record deferred to projection",
            extra={"job_id": envelope.job_id, "error_type": type(err).__name__},
        )
    return AcceptedResponse(
        job_id=envelope.job_id,
        queue=queue.name,
        state="queued",
        status_url=status_url(envelope.job_id),
    )


async def _record_queued(pool: asyncpg.Pool, envelope: JobEnvelope, *, max_attempts: int) -> None:
    # The job's durability is JetStream's; this row only mirrors it, and the
    # status stream rebuilds it if lost. So its commit need not wait for a disk
    # flush: set_config(..., true) applies to this statement's own transaction.
    await pool.execute(
        "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true))"
        " INSERT INTO jobs (job_id, queue, state, max_attempts, command, created_at)"
        " SELECT $1, $2, 'queued', $3, $4, $5 FROM async_commit"
        " ON CONFLICT (job_id) DO NOTHING",
        envelope.job_id,
        envelope.queue,
        max_attempts,
        msgspec.to_builtins(envelope.command),
        envelope.created_at,
    )


async def _dataset_exists(pool: asyncpg.Pool, dataset_id: str) -> bool:
    return bool(await pool.fetchval("SELECT 1 FROM datasets WHERE dataset_id = $1", dataset_id))


async def _load_job(pool: asyncpg.Pool, job_id: str) -> JobResponse:
    row = await pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    if row is None:
        raise NotFoundException(f"no job with id {job_id}")
    attempts = await pool.fetch(
        "SELECT * FROM job_attempts WHERE job_id = $1 AND submission = $2 ORDER BY attempt",
        job_id,
        row["submission"],
    )
    return _job_response(row, attempts)


def _error_of(error_type: str | None, message: str | None) -> JobError | None:
    if error_type is None:
        return None
    return JobError(type=error_type, message=message or "")


def _job_response(row: asyncpg.Record, attempts: list[asyncpg.Record]) -> JobResponse:
    result = None
    if row["state"] == "succeeded":
        url = f"/api/analyses/{row['job_id']}" if row["queue"] == "analysis" else None
        result = JobResult(summary=row["summary"] or {}, url=url)
    return JobResponse(
        job_id=row["job_id"],
        queue=row["queue"],
        state=row["state"],
        progress=Progress(percent=row["progress_percent"], message=row["progress_message"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        heartbeat_at=row["heartbeat_at"],
        result=result,
        error=_error_of(row["error_type"], row["error_message"]),
        attempts=[
            Attempt(
                attempt=a["attempt"],
                worker=a["worker"],
                started_at=a["started_at"],
                finished_at=a["finished_at"],
                outcome=a["outcome"],
                error=_error_of(a["error_type"], a["error_message"]),
            )
            for a in attempts
        ],
    )


class JobController(Controller):
    """Jobs: submit, follow, fetch results."""

    path = "/api"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a class attribute

    @post(
        "/analysis",
        status_code=HTTP_202_ACCEPTED,
        responses={
            422: problem_spec("the body is malformed or names an unknown dataset"),
            503: problem_spec("NATS is unreachable or the queue is full; retry later"),
        },
    )
    async def submit_analysis(
        self, state: State, data: JSONBody[RunAnalysisRequest]
    ) -> Response[AcceptedResponse]:
        """Queue an analysis of an uploaded dataset; answers once the job is durable."""
        if not await _dataset_exists(state.pool, data.dataset_id):
            raise ValidationException(
                f"no dataset with id {data.dataset_id}",
                status_code=HTTP_422_UNPROCESSABLE_ENTITY,
                extra=[{"key": "dataset_id", "message": "no such dataset", "source": "body"}],
            )
        accepted = await accept_job(
            state, "analysis", RunAnalysis(dataset_id=data.dataset_id, options=data.options)
        )
        return Response(accepted, headers={"Location": accepted.status_url})

    @get("/jobs/{job_id:str}", responses={404: problem_spec("no job with that id")})
    async def get_job(self, state: State, job_id: JobId) -> JobResponse:
        """Return a job's state, progress, attempts, and result or error."""
        return await _load_job(state.pool, job_id)

    @get(
        "/queue/status/{job_id:str}",
        responses={404: problem_spec("no job with that id")},
        description="The same document as GET /api/jobs/{job_id}, for older clients.",
    )
    async def get_queue_status(self, state: State, job_id: JobId) -> JobResponse:
        """Return a job's status (the route older clients use)."""
        return await _load_job(state.pool, job_id)

    @get(
        "/analyses/{job_id:str}",
        responses={404: problem_spec("no finished analysis with that job id")},
    )
    async def get_analysis(self, state: State, job_id: JobId) -> AnalysisResponse:
        """Return the full profile an analysis job produced."""
        row = await state.pool.fetchrow(
            "SELECT r.result, j.command FROM job_results r JOIN jobs j USING (job_id)"
            " WHERE r.job_id = $1 AND r.queue = 'analysis'",
            job_id,
        )
        if row is None:
            raise NotFoundException(f"no finished analysis for job {job_id}")
        dataset_id = str(row["command"].get("dataset_id", ""))
        return AnalysisResponse(job_id=job_id, dataset_id=dataset_id, profile=row["result"])
