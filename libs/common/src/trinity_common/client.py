"""Submitting jobs straight to JetStream, for services that do not go through HTTP.

`submit_job` is the one way a job enters a queue; the gateway uses it too. It
returns once JetStream has stored the job, so a returned job is durable. The
publish carries ``Nats-Msg-Id``, so retrying a submission whose ack was lost
never makes a second job.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import msgspec
import nats.errors

from trinity_common import names
from trinity_common.errors import TrinityError
from trinity_common.messages import JobAccepted, JobEnvelope, utc_now
from trinity_common.status import publish_status

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from trinity_common.commands import Command
    from trinity_common.queues import QueueSettings

__all__ = ["BrokerUnavailableError", "QueueFullError", "new_job_id", "submit_job"]

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()

# JetStream's error code for a publish refused by a stream limit with discard-new.
_STREAM_FULL_CODES = frozenset({10077, 10027})


class BrokerUnavailableError(TrinityError):
    """JetStream did not confirm the publish; the job may be retried later."""


class QueueFullError(BrokerUnavailableError):
    """The queue holds as many jobs as it is allowed; try again once it drains."""


def new_job_id() -> str:
    """Return a fresh job id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


async def submit_job(
    js: JetStreamContext,
    queue: QueueSettings,
    command: Command,
    *,
    job_id: str | None = None,
    submission: int = 1,
    ack_timeout_s: float = 2.0,
    traceparent: str | None = None,
) -> JobEnvelope:
    """Publish ``command`` to ``queue``, wait for JetStream's ack, announce it.

    Raises:
        QueueFullError: the queue is at its limit.
        BrokerUnavailableError: NATS is unreachable or did not ack in time.
    """
    envelope = JobEnvelope(
        job_id=job_id or new_job_id(),
        queue=queue.name,
        command=command,
        created_at=utc_now(),
        submission=submission,
        traceparent=traceparent,
    )
    await _publish_envelope(js, envelope, ack_timeout_s=ack_timeout_s)
    accepted = JobAccepted(
        job_id=envelope.job_id,
        queue=queue.name,
        at=envelope.created_at,
        submission=submission,
        max_attempts=queue.max_attempts,
        command=msgspec.to_builtins(command),
    )
    try:
        await publish_status(js, accepted, ack_timeout_s=ack_timeout_s)
    except nats.errors.Error as err:
        # The job is durable already; only its 'queued' event is missing, and
        # the worker's first event will create the status record instead.
        logger.warning("job accepted event lost", extra={"error_type": type(err).__name__})
    return envelope


async def _publish_envelope(
    js: JetStreamContext, envelope: JobEnvelope, *, ack_timeout_s: float
) -> None:
    headers = {
        names.HEADER_MSG_ID: f"{envelope.job_id}.{envelope.submission}",
        names.HEADER_JOB_ID: envelope.job_id,
    }
    if envelope.traceparent:
        headers["traceparent"] = envelope.traceparent
    try:
        await js.publish(
            names.job_subject(envelope.queue),
            _encoder.encode(envelope),
            timeout=ack_timeout_s,
            stream=names.JOBS_STREAM,
            headers=headers,
        )
    except nats.js.errors.APIError as err:
        if err.err_code in _STREAM_FULL_CODES:
            raise QueueFullError(f"the {envelope.queue} queue is full") from err
        raise BrokerUnavailableError(f"JetStream refused the job: {err.description}") from err
    except nats.errors.OutboundBufferLimitError as err:
        raise BrokerUnavailableError("NATS is not connected; nothing was queued") from err
    except (nats.errors.Error, OSError) as err:
        raise BrokerUnavailableError(
            "NATS did not confirm the job in time, so it may or may not be queued;"
            " resubmit with the same Idempotency-Key to find out without making a second job"
        ) from err
