"""Job documents: reading job records and shaping them for clients."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from litestar.exceptions import NotFoundException, ValidationException

from trinity_common.messages import utc_now
from trinity_gateway.schemas import Attempt, JobError, JobResponse, JobResult, Progress

if TYPE_CHECKING:
    from collections.abc import Mapping

    import asyncpg

    from trinity_common.queues import QueueSettings

__all__ = ["decode_cursor", "encode_cursor", "job_response", "load_job", "stalled_after"]

# A running job that missed this many heartbeats in a row is shown as stalled.
STALLED_AFTER_BEATS = 3


def stalled_after(queue: QueueSettings) -> timedelta:
    """Return how long a running job of ``queue`` may go unheard before it shows stalled."""
    return timedelta(seconds=STALLED_AFTER_BEATS * queue.heartbeat_s)


def _effective_state(row: asyncpg.Record, queue: QueueSettings | None) -> str:
    # The record says what the last event said. A worker that died says nothing
    # more, so "running" is only believed while heartbeats keep coming.
    state: str = row["state"]
    if state != "running" or queue is None or row["heartbeat_at"] is None:
        return state
    if utc_now() - row["heartbeat_at"] > stalled_after(queue):
        return "stalled"
    return state


def _error_of(error_type: str | None, message: str | None) -> JobError | None:
    if error_type is None:
        return None
    return JobError(type=error_type, message=message or "")


def _result_of(row: asyncpg.Record) -> JobResult | None:
    if row["state"] != "succeeded":
        return None
    url = f"/api/analyses/{row['job_id']}" if row["queue"] == "analysis" else None
    return JobResult(summary=row["summary"] or {}, url=url)


def _attempt_of(record: asyncpg.Record) -> Attempt:
    return Attempt(
        submission=record["submission"],
        attempt=record["attempt"],
        worker=record["worker"],
        started_at=record["started_at"],
        finished_at=record["finished_at"],
        outcome=record["outcome"],
        error=_error_of(record["error_type"], record["error_message"]),
    )


def job_response(
    row: asyncpg.Record,
    attempts: list[asyncpg.Record],
    queues: Mapping[str, QueueSettings],
) -> JobResponse:
    """Shape a job record and its attempts as the status document."""
    return JobResponse(
        job_id=row["job_id"],
        queue=row["queue"],
        state=_effective_state(row, queues.get(row["queue"])),  # type: ignore[arg-type]
        progress=Progress(percent=row["progress_percent"], message=row["progress_message"]),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        heartbeat_at=row["heartbeat_at"],
        result=_result_of(row),
        error=_error_of(row["error_type"], row["error_message"]),
        dead_lettered=row["dead_lettered"],
        attempts=[_attempt_of(a) for a in attempts],
    )


async def load_job(
    pool: asyncpg.Pool, job_id: str, queues: Mapping[str, QueueSettings]
) -> JobResponse:
    """Return the status document of ``job_id``.

    Raises:
        NotFoundException: there is no such job.
    """
    row = await pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    if row is None:
        raise NotFoundException(f"no job with id {job_id}")
    attempts = await pool.fetch(
        "SELECT * FROM job_attempts WHERE job_id = $1 ORDER BY submission, attempt", job_id
    )
    return job_response(row, attempts, queues)


def encode_cursor(at: datetime, job_id: str) -> str:
    """Return an opaque cursor pointing just past (``at``, ``job_id``)."""
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Return the position a cursor points at.

    Raises:
        ValidationException: the cursor was not made by `encode_cursor`.
    """
    try:
        at, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(at), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as err:
        problem: dict[str, Any] = {
            "key": "cursor",
            "message": "not a cursor this API returned",
            "source": "query",
        }
        raise ValidationException(
            "invalid cursor: pass the next_cursor of a previous page unchanged", extra=[problem]
        ) from err
