"""Status events: publishing them, and folding them into the job table.

Every state change of a job is an event on the status stream. The projector is
the only writer of a job's state after it was accepted: it reads the stream
through a durable consumer and updates one row per job, so reading a job's
status never scans history.

Events may arrive twice or, with several projector replicas, out of order. The
update is guarded so that neither matters: an event older than the last one
applied (by stream sequence) changes nothing, a terminal state is never left,
events of an earlier submission are ignored, and progress within one attempt
never goes backwards.

Each attempt has a row of its own, closed by the outcome its worker reports; a
worker that stops mid-attempt reports ``handed_back``, and the job shows as
queued again until its next attempt starts. A worker killed outright reports
nothing, so an attempt still open once a later attempt of the job has a row,
or once the job has ended, is closed as ``lost``. Its end is taken to be the
start of the next attempt (or the end of the job): the first moment the record
shows for certain that nobody waited for it any more. The last heartbeat would
be earlier, but it is kept per job, not per attempt, and what it says depends
on the order events arrive in; the next attempt's start does not. An outcome
the worker reports after all (it was only cut off for a while) replaces
``lost``: the process's own word is better than an inference.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from trinity_common import broker, names
from trinity_common.database import UNAVAILABLE_ERRORS
from trinity_common.messages import (
    TERMINAL_STATES,
    AttemptOutcome,
    JobAccepted,
    JobCancelled,
    JobFailed,
    JobHandedBack,
    JobProgressed,
    JobRetried,
    JobStarted,
    JobState,
    JobSucceeded,
    StatusEvent,
)

if TYPE_CHECKING:
    import asyncio

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from trinity_common.database import Connection

__all__ = ["StatusProjector", "publish_status"]

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StatusEvent)

_HANDED_BACK = "handed back by a stopping worker"
_LOST_TO_REDELIVERY = "the worker stopped reporting; the job was delivered again"
_LOST_TO_END = "the worker stopped reporting; the job ended without it"


async def publish_status(js: JetStreamContext, event: StatusEvent, *, ack_timeout_s: float) -> None:
    """Publish ``event`` on its queue's status subject and wait for the stream's ack."""
    await js.publish(
        names.status_subject(event.queue),
        _encoder.encode(event),
        timeout=ack_timeout_s,
        stream=names.STATUS_STREAM,
    )


class _Change(msgspec.Struct, kw_only=True, frozen=True):
    """The columns one event sets; None keeps the stored value."""

    state: JobState
    creates_only: bool = False
    """Whether the event's state only applies to a new record, and an existing one keeps its own."""
    attempt: int | None = None
    max_attempts: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    progress_percent: float | None = None
    progress_message: str | None = None
    summary: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    command: dict[str, Any] | None = None
    outcome: AttemptOutcome | None = None
    worker: str | None = None
    dead_lettered: bool = False


def _change_of(event: StatusEvent) -> _Change:
    match event:
        case JobAccepted():
            return _Change(
                state="queued",
                creates_only=True,
                max_attempts=event.max_attempts,
                command=event.command,
            )
        case JobStarted():
            return _Change(
                state="running",
                attempt=event.attempt,
                max_attempts=event.max_attempts,
                started_at=event.at,
                heartbeat_at=event.at,
                progress_percent=0.0,
                progress_message="started",
                worker=event.worker,
            )
        case JobProgressed():
            return _Change(
                state="running",
                attempt=event.attempt,
                heartbeat_at=event.at,
                progress_percent=event.percent,
                progress_message=event.message,
            )
        case JobRetried():
            return _Change(
                state="retrying",
                attempt=event.attempt,
                error_type=event.error_type,
                error_message=event.error_message,
                outcome="retried",
            )
        case JobHandedBack():
            # The next attempt starts from nothing; the one handed back shows why it ended.
            return _Change(
                state="queued",
                attempt=event.attempt,
                progress_percent=0.0,
                progress_message=_HANDED_BACK,
                outcome="handed_back",
            )
        case JobSucceeded():
            return _Change(
                state="succeeded",
                attempt=event.attempt or None,
                finished_at=event.at,
                progress_percent=100.0,
                progress_message="done",
                summary=event.summary,
                outcome="succeeded",
            )
        case JobFailed():
            return _Change(
                state="failed",
                attempt=event.attempt or None,
                finished_at=event.at,
                error_type=event.error_type,
                error_message=event.error_message,
                outcome="failed",
                dead_lettered=event.dead_lettered,
            )
        case JobCancelled():
            return _Change(
                state="cancelled",
                finished_at=event.at,
                error_type="cancelled",
                error_message=event.reason,
                outcome="cancelled",
            )


# One statement for every event type: the guard in the WHERE clause is the
# whole of the ordering logic, so it is written once.
_APPLY_TO_JOB = """
INSERT INTO jobs AS j (
    job_id, queue, state, submission, attempt, max_attempts, command, created_at,
    started_at, finished_at, heartbeat_at, progress_percent, progress_message,
    summary, error_type, error_message, last_event_seq, dead_lettered)
VALUES (
    $1, $2, $3, $4, coalesce($5, 0), coalesce($6, 1), coalesce($7, '{}'::jsonb), $8,
    $9, $10, $11, coalesce($12, 0), coalesce($13, ''), $14, $15, $16, $17, $18)
ON CONFLICT (job_id) DO UPDATE SET
    -- Acceptance only ever creates the record; arriving after the job's first
    -- events (it may), it adds what it knows and leaves the state alone.
    state = CASE WHEN $19 THEN j.state ELSE EXCLUDED.state END,
    command = CASE WHEN j.command = '{}'::jsonb THEN EXCLUDED.command ELSE j.command END,
    attempt = coalesce($5, j.attempt),
    max_attempts = coalesce($6, j.max_attempts),
    started_at = coalesce(j.started_at, EXCLUDED.started_at),
    finished_at = coalesce(EXCLUDED.finished_at, j.finished_at),
    heartbeat_at = greatest(j.heartbeat_at, EXCLUDED.heartbeat_at),
    progress_percent = CASE
        WHEN $12::real IS NULL THEN j.progress_percent
        WHEN $5 IS NOT DISTINCT FROM j.attempt AND EXCLUDED.state = 'running'
            THEN greatest(j.progress_percent, $12)
        ELSE $12 END,
    progress_message = CASE
        WHEN $13::text IS NULL THEN j.progress_message
        WHEN $5 IS NOT DISTINCT FROM j.attempt AND EXCLUDED.state = 'running'
             AND $12 < j.progress_percent THEN j.progress_message
        ELSE $13 END,
    summary = coalesce(EXCLUDED.summary, j.summary),
    -- Until the job ends, the error is the last failed attempt's; success clears it.
    error_type = CASE WHEN EXCLUDED.state = 'succeeded' THEN NULL
        ELSE coalesce(EXCLUDED.error_type, j.error_type) END,
    error_message = CASE WHEN EXCLUDED.state = 'succeeded' THEN NULL
        ELSE coalesce(EXCLUDED.error_message, j.error_message) END,
    last_event_seq = EXCLUDED.last_event_seq,
    dead_lettered = j.dead_lettered OR EXCLUDED.dead_lettered,
    updated_at = now()
WHERE j.state NOT IN ('succeeded', 'failed', 'cancelled')
  AND j.submission <= EXCLUDED.submission
  AND j.last_event_seq < EXCLUDED.last_event_seq
  -- An earlier attempt's late word (a hand-back published slowly, say) never
  -- overwrites what a later attempt says.
  AND coalesce($5, j.attempt) >= j.attempt
"""

_APPLY_TO_ATTEMPT = """
INSERT INTO job_attempts AS a (
    job_id, submission, attempt, worker, started_at, finished_at, outcome,
    error_type, error_message)
VALUES ($1, $2, $3, coalesce($4, ''), $5, $6, $7, $8, $9)
ON CONFLICT (job_id, submission, attempt) DO UPDATE SET
    worker = CASE WHEN a.worker = '' THEN EXCLUDED.worker ELSE a.worker END,
    started_at = least(a.started_at, EXCLUDED.started_at),
    -- The first reported outcome stays; 'lost' was only inferred, and yields to one.
    finished_at = CASE WHEN a.outcome = 'lost' AND EXCLUDED.outcome IS NOT NULL
        THEN EXCLUDED.finished_at ELSE coalesce(a.finished_at, EXCLUDED.finished_at) END,
    outcome = CASE WHEN a.outcome = 'lost' AND EXCLUDED.outcome IS NOT NULL
        THEN EXCLUDED.outcome ELSE coalesce(a.outcome, EXCLUDED.outcome) END,
    error_type = CASE WHEN a.outcome = 'lost' AND EXCLUDED.outcome IS NOT NULL
        THEN EXCLUDED.error_type ELSE coalesce(a.error_type, EXCLUDED.error_type) END,
    error_message = CASE WHEN a.outcome = 'lost' AND EXCLUDED.outcome IS NOT NULL
        THEN EXCLUDED.error_message ELSE coalesce(a.error_message, EXCLUDED.error_message) END
"""

# Derived from the rows alone, not from the event at hand, so the same rows give
# the same answer whichever order their events were applied in. Rows already
# right are left alone, so a replayed event writes nothing.
_CLOSE_LOST_ATTEMPTS = """
WITH unreported AS (
    SELECT a.submission, a.attempt, a.started_at,
        (SELECT min(later.started_at) FROM job_attempts AS later
          WHERE later.job_id = a.job_id
            AND (later.submission, later.attempt) > (a.submission, a.attempt)
        ) AS superseded_at,
        CASE WHEN j.state IN ('succeeded', 'failed', 'cancelled') THEN j.finished_at
        END AS job_ended_at
    FROM job_attempts AS a JOIN jobs AS j USING (job_id)
    WHERE a.job_id = $1 AND (a.outcome IS NULL OR a.outcome = 'lost')
), closing AS (
    SELECT submission, attempt,
        greatest(started_at, coalesce(superseded_at, job_ended_at)) AS finished_at,
        CASE WHEN superseded_at IS NULL THEN $3 ELSE $2 END AS error_message
    FROM unreported
    WHERE superseded_at IS NOT NULL OR job_ended_at IS NOT NULL
)
UPDATE job_attempts AS a SET
    finished_at = c.finished_at, outcome = 'lost', error_type = 'lost',
    error_message = c.error_message
FROM closing AS c
WHERE a.job_id = $1 AND (a.submission, a.attempt) = (c.submission, c.attempt)
  AND (a.outcome IS NULL OR a.finished_at IS DISTINCT FROM c.finished_at
       OR a.error_message IS DISTINCT FROM c.error_message)
"""


def _storable(text: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL, and error messages quote whatever failed.
    return None if text is None else text.replace("\x00", "\ufffd")


async def apply_event(conn: Connection, event: StatusEvent, *, seq: int) -> None:
    """Fold one status event, at stream sequence ``seq``, into the job tables."""
    change = _change_of(event)
    change = msgspec.structs.replace(
        change,
        error_message=_storable(change.error_message),
        progress_message=_storable(change.progress_message),
    )
    await _apply_to_job(conn, event, change, seq=seq)

    writes_attempt = change.worker is not None or change.outcome is not None
    if event.attempt > 0 and writes_attempt:
        await conn.execute(
            _APPLY_TO_ATTEMPT,
            event.job_id,
            event.submission,
            event.attempt,
            change.worker,
            change.started_at or event.at,
            event.at if change.outcome else None,
            change.outcome,
            change.error_type,
            change.error_message,
        )
    # Only a new attempt row or the job's end can leave an attempt unreported.
    if (event.attempt > 0 and writes_attempt) or change.state in TERMINAL_STATES:
        await conn.execute(_CLOSE_LOST_ATTEMPTS, event.job_id, _LOST_TO_REDELIVERY, _LOST_TO_END)


async def _apply_to_job(conn: Connection, event: StatusEvent, change: _Change, *, seq: int) -> None:
    await conn.execute(
        _APPLY_TO_JOB,
        event.job_id,
        event.queue,
        change.state,
        event.submission,
        change.attempt,
        change.max_attempts,
        change.command,
        event.at,
        change.started_at,
        change.finished_at,
        change.heartbeat_at,
        change.progress_percent,
        change.progress_message,
        change.summary,
        change.error_type,
        change.error_message,
        seq,
        change.dead_lettered,
        change.creates_only,
    )


class StatusProjector:
    """Reads the status stream and keeps the job table current.

    Several replicas may run it at once: they share one durable consumer, and the
    guarded update makes the order they apply events in irrelevant.
    """

    def __init__(
        self, *, js: JetStreamContext, pool: asyncpg.Pool, batch: int = 256, retry_s: float = 1.0
    ) -> None:
        self._js = js
        self._pool = pool
        self._batch = batch
        self._retry_s = retry_s

    async def run(self, stop: asyncio.Event) -> None:
        """Project events until ``stop`` is set."""
        async for msgs in broker.pull_batches(
            self._js,
            stream=names.STATUS_STREAM,
            durable=names.STATUS_CONSUMER,
            batch=self._batch,
            stop=stop,
        ):
            await self._project(msgs)

    async def _project(self, msgs: list[Msg]) -> None:
        events = [(msg, self._decode(msg)) for msg in msgs]
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                for msg, event in events:
                    if event is not None:
                        await apply_event(conn, event, seq=msg.metadata.sequence.stream)
        except UNAVAILABLE_ERRORS as err:
            # The database is unavailable: hand the batch back for later.
            logger.warning("status projection deferred", extra={"error_type": type(err).__name__})
            for msg, _ in events:
                await broker.settle(msg.nak(delay=self._retry_s))
            return
        except asyncpg.PostgresError:
            # One event the table refuses must not hold back the batch for ever.
            await self._project_one_by_one(events)
            return
        for msg, _ in events:
            await broker.settle(msg.ack())

    async def _project_one_by_one(self, events: list[tuple[Msg, StatusEvent | None]]) -> None:
        for msg, event in events:
            try:
                if event is not None:
                    async with self._pool.acquire() as conn:
                        await apply_event(conn, event, seq=msg.metadata.sequence.stream)
            except UNAVAILABLE_ERRORS:
                await broker.settle(msg.nak(delay=self._retry_s))
                continue
            except asyncpg.PostgresError:
                logger.exception("status event refused, dropped", extra={"subject": msg.subject})
                await broker.settle(msg.term())
                continue
            await broker.settle(msg.ack())

    @staticmethod
    def _decode(msg: Msg) -> StatusEvent | None:
        try:
            return _decoder.decode(msg.data)
        except msgspec.DecodeError:
            logger.exception("undecodable status event dropped", extra={"subject": msg.subject})
            return None
