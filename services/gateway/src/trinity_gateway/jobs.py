"""Jobs: submit, follow, list, cancel, retry."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import nats.errors
from litestar import Controller, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, ValidationException
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_202_ACCEPTED,
    HTTP_409_CONFLICT,
    HTTP_422_UNPROCESSABLE_ENTITY,
)

from trinity_common import names
from trinity_common.client import submit_job
from trinity_common.commands import Command, RunAnalysis
from trinity_common.messages import CancelRequest as CancelBroadcast
from trinity_common.messages import JobCancelled, utc_now
from trinity_common.queues import QueueName
from trinity_common.status import publish_status
from trinity_gateway.bodies import MAX_JSON_BODY_BYTES, OptionalBodyOperation, json_only
from trinity_gateway.documents import (
    decode_cursor,
    encode_cursor,
    job_response,
    load_job,
    stalled_after,
)
from trinity_gateway.problems import problem_spec
from trinity_gateway.schemas import (
    AcceptedResponse,
    CancelRequest,
    JobPage,
    JobResponse,
    JobStatus,
    RunAnalysisRequest,
)
from trinity_gateway.submission import (
    IdempotencyConflictError,
    accept_job,
    accepted,
    claim_key,
    request_hash,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = ["JobController"]

logger = logging.getLogger(__name__)

JobId = Annotated[
    str,
    PathParameter(pattern=r"^[0-9a-f]{32}$", description="A job id, as returned on submission."),
]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Repeat a submission safely: the same key and body return the same job.",
    ),
]
Limit = Annotated[int, QueryParameter(ge=1, le=500, description="Most items per page.")]
Cursor = Annotated[
    str | None, QueryParameter(description="The `next_cursor` of the previous page.")
]
QueueFilter = Annotated[QueueName | None, QueryParameter(description="Only jobs of this queue.")]

_NOT_FOUND = problem_spec("no job with that id")
_JSON_TOO_LARGE = problem_spec(f"the body is larger than {MAX_JSON_BODY_BYTES} bytes")
_NOT_JSON = problem_spec("the body is not application/json")
_TERMINAL = ("succeeded", "failed", "cancelled")


class ConflictError(ClientException):
    """The job is not in a state that allows the request."""

    status_code = HTTP_409_CONFLICT


def _unknown_dataset(dataset_id: str) -> ValidationException:
    return ValidationException(
        f"no dataset with id {dataset_id}",
        status_code=HTTP_422_UNPROCESSABLE_ENTITY,
        extra=[{"key": "dataset_id", "message": "no such dataset", "source": "body"}],
    )


async def _submit_once(
    state: State, queue: str, command: Command, key: str | None
) -> AcceptedResponse:
    if key is None:
        return await accept_job(state, queue, command)
    ttl = timedelta(seconds=state.settings.gateway_idempotency_ttl_s)
    try:
        claim = await claim_key(state.pool, key, request_hash(queue, command), ttl=ttl)
    except IdempotencyConflictError as err:
        raise ValidationException(
            "this Idempotency-Key was already used for a different request;"
            " send a new key for a new job",
            status_code=HTTP_422_UNPROCESSABLE_ENTITY,
            extra=[{"key": "Idempotency-Key", "message": "used before", "source": "header"}],
        ) from err
    if not claim.is_new and await _is_recorded(state.pool, claim.job_id):
        return accepted(claim.job_id, queue)
    # A new claim, or one whose first submission has no confirmed outcome (its
    # ack was lost, or it is still in flight): publish under the claimed job id.
    # The message id is the same, so JetStream stores the job at most once.
    return await accept_job(state, queue, command, job_id=claim.job_id)


async def _is_recorded(pool: asyncpg.Pool, job_id: str) -> bool:
    return bool(await pool.fetchval("SELECT 1 FROM jobs WHERE job_id = $1", job_id))


async def _page(
    pool: asyncpg.Pool, state: State, rows: list[asyncpg.Record], limit: int, at_column: str
) -> JobPage:
    more = len(rows) > limit
    rows = rows[:limit]
    attempts: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for record in await pool.fetch(
        "SELECT * FROM job_attempts WHERE job_id = ANY($1) ORDER BY submission, attempt",
        [row["job_id"] for row in rows],
    ):
        attempts[record["job_id"]].append(record)
    items = [job_response(row, attempts[row["job_id"]], state.queues) for row in rows]
    last = rows[-1] if rows else None
    cursor = encode_cursor(last[at_column], last["job_id"]) if more and last else None
    return JobPage(items=items, next_cursor=cursor)


def _position(cursor: str | None) -> tuple[Any, str]:
    return decode_cursor(cursor) if cursor else (None, "")


class JobController(Controller):
    """Jobs: submit, follow, list, cancel, retry."""

    path = "/api"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a class attribute

    @post(
        "/analysis",
        status_code=HTTP_202_ACCEPTED,
        before_request=json_only,
        request_max_body_size=MAX_JSON_BODY_BYTES,
        responses={
            400: problem_spec("the body is malformed; every bad field is listed"),
            413: _JSON_TOO_LARGE,
            415: _NOT_JSON,
            422: problem_spec("unknown dataset, or an Idempotency-Key reused with another body"),
            503: problem_spec("NATS is unreachable or the queue is full; retry later"),
        },
    )
    async def submit_analysis(
        self,
        state: State,
        data: JSONBody[RunAnalysisRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[AcceptedResponse]:
        """Queue an analysis of an uploaded dataset; answers once the job is durable."""
        exists = await state.pool.fetchval(
            "SELECT 1 FROM datasets WHERE dataset_id = $1", data.dataset_id
        )
        if not exists:
            raise _unknown_dataset(data.dataset_id)
        command = RunAnalysis(dataset_id=data.dataset_id, options=data.options)
        answer = await _submit_once(state, "analysis", command, idempotency_key)
        return Response(answer, headers={"Location": answer.status_url})

    @get("/jobs", responses={400: problem_spec("a malformed filter or cursor")})
    async def list_jobs(
        self,
        state: State,
        queue: QueueFilter = None,
        job_state: Annotated[
            JobStatus | None,
            QueryParameter(name="state", description="Only jobs shown in this state."),
        ] = None,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> JobPage:
        """List jobs, newest first, a page at a time."""
        at, after = _position(cursor)
        # "stalled" is not stored: it is a running job whose heartbeats stopped,
        # judged by its queue's heartbeat interval as the job document judges it.
        stored_state = "running" if job_state == "stalled" else job_state
        stalled = None if job_state not in ("running", "stalled") else job_state == "stalled"
        stall_after_s = {name: stalled_after(q).total_seconds() for name, q in state.queues.items()}
        rows = await state.pool.fetch(
            "SELECT * FROM jobs WHERE ($1::text IS NULL OR queue = $1)"
            " AND ($2::text IS NULL OR state = $2)"
            " AND ($3::boolean IS NULL OR $3 = coalesce(heartbeat_at < now()"
            "      - make_interval(secs => ($6::jsonb ->> queue)::float8), false))"
            " AND ($4::timestamptz IS NULL OR (created_at, job_id) < ($4, $5))"
            " ORDER BY created_at DESC, job_id DESC LIMIT $7",
            queue,
            stored_state,
            stalled,
            at,
            after,
            stall_after_s,
            limit + 1,
        )
        return await _page(state.pool, state, rows, limit, "created_at")

    @get("/jobs/{job_id:str}", responses={404: _NOT_FOUND})
    async def get_job(self, state: State, job_id: JobId) -> JobResponse:
        """Return a job's state, progress, attempts, and result or error."""
        return await load_job(state.pool, job_id, state.queues)

    @get(
        "/queue/status/{job_id:str}",
        responses={404: _NOT_FOUND},
        description="The same document as GET /api/jobs/{job_id}, for older clients.",
    )
    async def get_queue_status(self, state: State, job_id: JobId) -> JobResponse:
        """Return a job's status (the route older clients use)."""
        return await load_job(state.pool, job_id, state.queues)

    @delete(
        "/jobs/{job_id:str}",
        status_code=HTTP_200_OK,
        before_request=json_only,
        request_max_body_size=MAX_JSON_BODY_BYTES,
        operation_class=OptionalBodyOperation,
        responses={
            404: _NOT_FOUND,
            409: problem_spec("the job already finished"),
            413: _JSON_TOO_LARGE,
            415: _NOT_JSON,
        },
    )
    async def cancel_job(
        self, state: State, job_id: JobId, data: JSONBody[CancelRequest | None] = None
    ) -> JobResponse:
        """Cancel a queued or running job: a queued one never runs, a running one is stopped."""
        reason = (data.reason if data else "") or "cancelled by request"
        row = await state.pool.fetchrow(
            "UPDATE jobs SET state = 'cancelled', finished_at = now(), error_type = 'cancelled',"
            " error_message = $2, updated_at = now()"
            " WHERE job_id = $1 AND state NOT IN ('succeeded', 'failed', 'cancelled')"
            # A stored result means the job succeeded, even before its status
            # event has reached this record.
            " AND NOT EXISTS (SELECT 1 FROM job_results WHERE job_id = $1)"
            " RETURNING queue, submission, attempt",
            job_id,
            reason,
        )
        if row is None:
            current = await load_job(state.pool, job_id, state.queues)
            ended = current.state if current.state in _TERMINAL else "succeeded"
            raise ConflictError(
                f"job {job_id} already {ended}; only unfinished jobs can be cancelled"
            )
        await _announce_cancel(state, job_id, row, reason)
        return await load_job(state.pool, job_id, state.queues)

    @post(
        "/jobs/{job_id:str}/retry",
        status_code=HTTP_202_ACCEPTED,
        responses={
            404: _NOT_FOUND,
            409: problem_spec("only a failed, dead-lettered job can be retried"),
            503: problem_spec("NATS is unreachable; nothing was changed"),
        },
    )
    async def retry_job(self, state: State, job_id: JobId) -> Response[AcceptedResponse]:
        """Queue a dead-lettered job again, with a fresh set of attempts."""
        async with state.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE jobs SET state = 'queued', submission = submission + 1, attempt = 0,"
                " progress_percent = 0, progress_message = '', started_at = NULL,"
                " finished_at = NULL, heartbeat_at = NULL, error_type = NULL,"
                " error_message = NULL, summary = NULL, dead_lettered = false, updated_at = now()"
                " WHERE job_id = $1 AND state = 'failed' AND dead_lettered"
                " RETURNING queue, submission, command",
                job_id,
            )
            if row is None:
                current = await load_job(state.pool, job_id, state.queues)
                raise ConflictError(
                    f"job {job_id} is {current.state}; only a failed, dead-lettered job"
                    " can be retried"
                )
            queue = state.queues[row["queue"]]
            command = msgspec.convert(row["command"], Command)
            # The new submission number gives the publish a new message id, so
            # JetStream's de-duplication window cannot swallow it.
            await submit_job(
                state.js,
                queue,
                command,
                job_id=job_id,
                submission=row["submission"],
                ack_timeout_s=state.settings.nats_timeout_s,
            )
        answer = accepted(job_id, queue.name)
        return Response(answer, headers={"Location": answer.status_url})

    @get("/dead-letters", responses={400: problem_spec("a malformed filter or cursor")})
    async def list_dead_letters(
        self, state: State, queue: QueueFilter = None, limit: Limit = 50, cursor: Cursor = None
    ) -> JobPage:
        """List jobs whose attempts ran out, most recent first."""
        at, after = _position(cursor)
        rows = await state.pool.fetch(
            "SELECT * FROM jobs WHERE dead_lettered AND ($1::text IS NULL OR queue = $1)"
            " AND ($2::timestamptz IS NULL OR (finished_at, job_id) < ($2, $3))"
            " ORDER BY finished_at DESC, job_id DESC LIMIT $4",
            queue,
            at,
            after,
            limit + 1,
        )
        return await _page(state.pool, state, rows, limit, "finished_at")


async def _announce_cancel(state: State, job_id: str, row: asyncpg.Record, reason: str) -> None:
    # The record already says cancelled, which every worker checks before it
    # starts a job and once a heartbeat while it runs; the broadcast only makes
    # a running job stop at once. Losing either message delays, never undoes.
    try:
        await state.nc.publish(
            names.cancel_subject(row["queue"]),
            msgspec.json.encode(CancelBroadcast(job_id=job_id, reason=reason)),
        )
        event = JobCancelled(
            job_id=job_id,
            queue=row["queue"],
            at=utc_now(),
            submission=row["submission"],
            attempt=row["attempt"],
            reason=reason,
        )
        await publish_status(state.js, event, ack_timeout_s=state.settings.nats_timeout_s)
    except nats.errors.Error as err:
        logger.warning("cancel broadcast lost", extra={"job_id": job_id, "error": repr(err)})
