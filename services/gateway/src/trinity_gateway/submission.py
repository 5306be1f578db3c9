"""Putting a job on its queue: publish, record, and idempotent resubmission."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, NamedTuple

import asyncpg
import msgspec

from trinity_common.client import BrokerUnavailableError, new_job_id, submit_job
from trinity_gateway.schemas import AcceptedResponse

if TYPE_CHECKING:
    from datetime import timedelta

    from litestar.datastructures import State

    from trinity_common.commands import Command
    from trinity_common.messages import JobEnvelope

__all__ = ["IdempotencyConflictError", "accept_job", "claim_key", "status_url"]

logger = logging.getLogger(__name__)

_DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def status_url(job_id: str) -> str:
    """Return the path of a job's status document."""
    return f"/api/jobs/{job_id}"


def accepted(job_id: str, queue: str) -> AcceptedResponse:
    """Return the answer to a submission of job ``job_id``."""
    return AcceptedResponse(
        job_id=job_id, queue=queue, state="queued", status_url=status_url(job_id)
    )


async def accept_job(
    state: State, queue_name: str, command: Command, *, job_id: str | None = None
) -> AcceptedResponse:
    """Publish a job, then record it as queued, and answer only once both are done.

    JetStream's ack is what makes the job durable, so nothing is written before
    it: a failed publish leaves nothing behind. The record written afterwards
    lets a read right after the answer find the job queued; should that write
    fail, the job still runs and the status projection creates the record from
    the job's accepted event, so the answer stays 202.
    """
    if not state.nc.is_connected:
        raise BrokerUnavailableError("NATS is not connected; nothing was queued")
    queue = state.queues[queue_name]
    envelope = await submit_job(
        state.js, queue, command, job_id=job_id, ack_timeout_s=state.settings.nats_timeout_s
    )
    try:
        await _record_queued(state.pool, envelope, max_attempts=queue.max_attempts)
    except _DATABASE_ERRORS as err:
        logger.warning(
            "queued record deferred to projection",
            extra={"job_id": envelope.job_id, "error_type": type(err).__name__},
        )
    return accepted(envelope.job_id, queue.name)


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


class IdempotencyConflictError(Exception):
    """The key was used before with a different request."""


class Claim(NamedTuple):
    """A key's job: a fresh id to submit under, or the job submitted earlier."""

    job_id: str
    is_new: bool


def request_hash(queue: str, command: Command) -> str:
    """Return a digest that is equal for equal requests."""
    return hashlib.sha256(queue.encode() + b"\0" + msgspec.json.encode(command)).hexdigest()


async def claim_key(pool: asyncpg.Pool, key: str, digest: str, *, ttl: timedelta) -> Claim:
    """Reserve ``key`` for a new job, or return the job it was used for before.

    Two requests racing with one key both land here; the insert lets exactly
    one of them win, and the other is answered with the winner's job.

    Raises:
        IdempotencyConflictError: the key was used with a different request.
    """
    job_id = new_job_id()
    won = await pool.fetchval(
        "INSERT INTO idempotency_keys (key, request_hash, job_id, expires_at)"
        " VALUES ($1, $2, $3, now() + $4)"
        " ON CONFLICT (key) DO UPDATE SET request_hash = EXCLUDED.request_hash,"
        "   job_id = EXCLUDED.job_id, created_at = now(), expires_at = EXCLUDED.expires_at"
        " WHERE idempotency_keys.expires_at <= now()"
        " RETURNING job_id",
        key,
        digest,
        job_id,
        ttl,
    )
    if won is not None:
        return Claim(job_id=won, is_new=True)
    row = await pool.fetchrow(
        "SELECT request_hash, job_id FROM idempotency_keys WHERE key = $1", key
    )
    if row is None or row["request_hash"] != digest:
        raise IdempotencyConflictError(key)
    return Claim(job_id=row["job_id"], is_new=False)


async def release_key(pool: asyncpg.Pool, key: str, job_id: str) -> None:
    """Forget a claim whose job could not be published, so a retry may use the key."""
    await pool.execute("DELETE FROM idempotency_keys WHERE key = $1 AND job_id = $2", key, job_id)
