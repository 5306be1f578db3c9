"""Dead letters: jobs whose attempts ran out, kept with everything known of them."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from trinity_common import names
from trinity_common.messages import JobEnvelope

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = ["AttemptError", "DeadLetter", "publish_dead_letter"]

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


class AttemptError(msgspec.Struct, kw_only=True, frozen=True):
    """How one attempt ended."""

    attempt: int
    error_type: str | None
    error_message: str | None
    finished_at: datetime | None


class DeadLetter(msgspec.Struct, kw_only=True, frozen=True):
    """A job that will not run again unless someone retries it."""

    envelope: JobEnvelope
    attempts: int
    error_type: str
    error_message: str
    at: datetime
    history: list[AttemptError] = msgspec.field(default_factory=list)
    """Earlier attempts' errors, as far as the status projection had recorded them."""


async def _history(pool: asyncpg.Pool, envelope: JobEnvelope) -> list[AttemptError]:
    try:
        rows = await pool.fetch(
            "SELECT attempt, error_type, error_message, finished_at FROM job_attempts"
            " WHERE job_id = $1 AND submission = $2 ORDER BY attempt",
            envelope.job_id,
            envelope.submission,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError) as err:
        # The dead letter matters more than its history: send it without.
        logger.warning("attempt history unavailable", extra={"error_type": type(err).__name__})
        return []
    return [AttemptError(**dict(row)) for row in rows]


async def publish_dead_letter(
    js: JetStreamContext, pool: asyncpg.Pool, letter: DeadLetter, *, ack_timeout_s: float
) -> None:
    """Publish ``letter`` to its queue's dead-letter subject, with the attempt history."""
    letter = msgspec.structs.replace(letter, history=await _history(pool, letter.envelope))
    envelope = letter.envelope
    await js.publish(
        names.dead_subject(envelope.queue),
        _encoder.encode(letter),
        timeout=ack_timeout_s,
        stream=names.DEAD_STREAM,
        headers={names.HEADER_MSG_ID: f"{envelope.job_id}.{envelope.submission}.dead"},
    )
