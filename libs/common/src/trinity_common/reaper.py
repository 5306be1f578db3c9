"""Failing jobs whose last attempt's worker vanished.

When a worker dies during a job's last allowed attempt, nothing is left to say
the job failed: JetStream will not deliver it again, and only announces that
with a core-NATS advisory. Trinity keeps those advisories in a stream, and the
reaper turns each one into what a worker would have done had it lived: a dead
letter, a ``failed`` status event, and the message removed from the work stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import asyncpg
import msgspec
import nats.errors
from nats.js.errors import NotFoundError

from trinity_common import broker, names
from trinity_common.deadletter import DeadLetter, publish_dead_letter
from trinity_common.messages import TERMINAL_STATES, JobEnvelope, JobFailed, utc_now
from trinity_common.status import publish_status

if TYPE_CHECKING:
    import asyncio

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

__all__ = ["ExhaustedJobReaper"]

logger = logging.getLogger(__name__)

ERROR_TYPE = "attempts_exhausted"


class MaxDeliveriesAdvisory(msgspec.Struct, kw_only=True, frozen=True):
    """The part of JetStream's max-deliveries advisory the reaper needs."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory_decoder = msgspec.json.Decoder(MaxDeliveriesAdvisory)
_envelope_decoder = msgspec.json.Decoder(JobEnvelope)


class ExhaustedJobReaper:
    """Consumes max-deliveries advisories and fails the jobs they name."""

    def __init__(
        self, *, js: JetStreamContext, pool: asyncpg.Pool, publish_timeout_s: float = 2.0
    ) -> None:
        self._js = js
        self._pool = pool
        self._timeout_s = publish_timeout_s

    async def run(self, stop: asyncio.Event) -> None:
        """Handle advisories until ``stop`` is set."""
        async for msgs in broker.pull_batches(
            self._js,
            stream=names.ADVISORY_STREAM,
            durable=names.REAPER_CONSUMER,
            batch=16,
            stop=stop,
        ):
            for msg in msgs:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        try:
            advisory = _advisory_decoder.decode(msg.data)
        except msgspec.DecodeError:
            logger.warning("undecodable advisory dropped", extra={"subject": msg.subject})
            await msg.ack()
            return
        try:
            await self._reap(advisory)
        except (nats.errors.Error, OSError, TimeoutError, asyncpg.PostgresError) as err:
            logger.warning("reaping deferred", extra={"error_type": type(err).__name__})
            await msg.nak(delay=2.0)
            return
        await msg.ack()

    async def _reap(self, advisory: MaxDeliveriesAdvisory) -> None:
        try:
            stored = await self._js.get_msg(advisory.stream, advisory.stream_seq)
        except NotFoundError:
            return  # settled meanwhile: a late ack, or an earlier reaping
        try:
            envelope = _envelope_decoder.decode(stored.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            logger.exception("undecodable job removed", extra={"stream_seq": advisory.stream_seq})
            await self._js.delete_msg(advisory.stream, advisory.stream_seq)
            return
        state = await self._pool.fetchval(
            "SELECT state FROM jobs WHERE job_id = $1", envelope.job_id
        )
        if state not in TERMINAL_STATES:
            await self._fail(envelope, advisory.deliveries)
        await self._js.delete_msg(advisory.stream, advisory.stream_seq)

    async def _fail(self, envelope: JobEnvelope, attempts: int) -> None:
        message = (
            f"attempt {attempts} stopped reporting (its worker died or hung)"
            " and no attempts are left"
        )
        await publish_dead_letter(
            self._js,
            self._pool,
            DeadLetter(
                envelope=envelope,
                attempts=attempts,
                error_type=ERROR_TYPE,
                error_message=message,
                at=utc_now(),
            ),
            ack_timeout_s=self._timeout_s,
        )
        event = JobFailed(
            job_id=envelope.job_id,
            queue=envelope.queue,
            at=utc_now(),
            submission=envelope.submission,
            attempt=attempts,
            error_type=ERROR_TYPE,
            error_message=message,
            dead_lettered=True,
        )
        await publish_status(self._js, event, ack_timeout_s=self._timeout_s)
        logger.error(
            "job failed, attempts exhausted",
            extra={"job_id": envelope.job_id, "queue": envelope.queue, "attempt": attempts},
        )
