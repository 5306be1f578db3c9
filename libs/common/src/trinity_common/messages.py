"""Messages on the wire: job commands, the job envelope, and status events.

Internal messages tolerate unknown fields, so an older reader survives a newer
writer. A new field always has a default; fields are never renamed, retyped or
reordered. Datetimes are aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from trinity_common.commands import Command

__all__ = [
    "TERMINAL_STATES",
    "AttemptOutcome",
    "CancelRequest",
    "JobAccepted",
    "JobCancelled",
    "JobEnvelope",
    "JobFailed",
    "JobHandedBack",
    "JobProgressed",
    "JobRetried",
    "JobStarted",
    "JobState",
    "JobSucceeded",
    "StatusEvent",
    "utc_now",
]

JobState = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

AttemptOutcome = Literal["retried", "succeeded", "failed", "cancelled", "handed_back", "lost"]
"""How an attempt ended. ``lost``: its worker stopped reporting, and the job was
delivered again or ended without it; every other outcome is one a process reported."""

Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class JobEnvelope(msgspec.Struct, kw_only=True, frozen=True):
    """A job as it travels on its work queue.

    The message id JetStream de-duplicates on is ``<job_id>.<submission>``, so a
    retried publish never makes a second job, while a deliberate resubmission of
    a dead job (a new submission) is never swallowed.
    """

    job_id: str
    queue: str
    command: Command
    created_at: datetime
    submission: int = 1
    """How many times the job was submitted; a manual retry of a dead job adds one."""
    traceparent: str | None = None
    """W3C trace context of the request that created the job, if any."""


class _Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Fields every status event carries."""

    job_id: str
    queue: str
    at: datetime
    submission: int = 1
    attempt: int = 0
    """The delivery this event is about, counted from 1; 0 before any attempt."""


class JobAccepted(_Event, kw_only=True, frozen=True, tag="job_accepted"):
    """The job was durably queued."""

    max_attempts: int
    command: dict[str, Any] = msgspec.field(default_factory=dict)


class JobStarted(_Event, kw_only=True, frozen=True, tag="job_started"):
    """A worker began an attempt."""

    max_attempts: int
    worker: str = ""


class JobProgressed(_Event, kw_only=True, frozen=True, tag="job_progressed"):
    """A running attempt reported progress; also serves as its heartbeat."""

    percent: Percent
    message: str = ""


class JobRetried(_Event, kw_only=True, frozen=True, tag="job_retried"):
    """An attempt failed and another one is scheduled."""

    error_type: str
    error_message: str
    retry_in_s: float


class JobSucceeded(_Event, kw_only=True, frozen=True, tag="job_succeeded"):
    """The job finished and its result is stored."""

    summary: dict[str, Any] = msgspec.field(default_factory=dict)


class JobFailed(_Event, kw_only=True, frozen=True, tag="job_failed"):
    """The job ended without a result and will not run again on its own."""

    error_type: str
    error_message: str
    dead_lettered: bool = False


class JobHandedBack(_Event, kw_only=True, frozen=True, tag="job_handed_back"):
    """A stopping worker gave back an attempt it could not finish; the job waits in its queue."""


class JobCancelled(_Event, kw_only=True, frozen=True, tag="job_cancelled"):
    """The job was cancelled before it could finish."""

    reason: str = ""


class CancelRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Asks whichever process runs a job to stop it; broadcast on the queue's cancel subject."""

    job_id: str
    reason: str = ""


StatusEvent = (
    JobAccepted
    | JobStarted
    | JobProgressed
    | JobRetried
    | JobHandedBack
    | JobSucceeded
    | JobFailed
    | JobCancelled
)
