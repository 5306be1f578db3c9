"""Every name Trinity puts on the wire: streams, subjects, consumers, buckets, headers.

Subjects are lowercase dot-separated tokens, broad to narrow. Streams are named by
purpose. Changing any value here is a migration of live data, not a refactor.
"""

from __future__ import annotations

__all__ = [
    "ADVISORY_STREAM",
    "DATASETS_BUCKET",
    "DEAD_STREAM",
    "HEADER_ATTEMPT",
    "HEADER_JOB_ID",
    "HEADER_MSG_ID",
    "JOBS_STREAM",
    "MAX_DELIVERIES_ADVISORIES",
    "REAPER_CONSUMER",
    "RESULTS_BUCKET",
    "STATUS_CONSUMER",
    "STATUS_STREAM",
    "cancel_subject",
    "dead_subject",
    "job_subject",
    "status_subject",
]

JOBS_STREAM = "TRINITY_JOBS"
"""Work queues: one subject per queue, consumed by that queue's durable consumer."""

STATUS_STREAM = "TRINITY_STATUS"
"""Every job state change, from every queue, in order of publication."""

DEAD_STREAM = "TRINITY_DEAD"
"""Jobs whose attempts ran out, with their payload and every attempt's error."""

STATUS_CONSUMER = "status-projector"
"""Durable consumer that folds status events into the job table."""

ADVISORY_STREAM = "TRINITY_ADVISORIES"
"""JetStream's max-deliveries advisories for the work stream, kept until handled."""

MAX_DELIVERIES_ADVISORIES = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{JOBS_STREAM}.*"

REAPER_CONSUMER = "exhausted-reaper"
"""Durable consumer that fails jobs whose last attempt's worker vanished."""

DATASETS_BUCKET = "trinity-datasets"
"""Object Store bucket holding uploaded dataset bytes, keyed by dataset id."""

RESULTS_BUCKET = "trinity-results"
"""Object Store bucket holding results too large for a database row."""

HEADER_MSG_ID = "Nats-Msg-Id"
"""JetStream de-duplicates publishes carrying the same value within its window."""

HEADER_JOB_ID = "Trinity-Job-Id"
HEADER_ATTEMPT = "Trinity-Attempt"

_JOBS_PREFIX = "trinity.jobs"
_STATUS_PREFIX = "trinity.status"
_DEAD_PREFIX = "trinity.dead"
_CANCEL_PREFIX = "trinity.cancel"

JOBS_SUBJECTS = f"{_JOBS_PREFIX}.>"
STATUS_SUBJECTS = f"{_STATUS_PREFIX}.>"
DEAD_SUBJECTS = f"{_DEAD_PREFIX}.>"


def job_subject(queue: str) -> str:
    """Return the work subject of a queue, e.g. ``trinity.jobs.analysis``."""
    return f"{_JOBS_PREFIX}.{queue}"


def status_subject(queue: str) -> str:
    """Return the status subject of a queue, e.g. ``trinity.status.analysis``."""
    return f"{_STATUS_PREFIX}.{queue}"


def cancel_subject(queue: str) -> str:
    """Return the core NATS subject cancel requests for a queue's jobs are broadcast on."""
    return f"{_CANCEL_PREFIX}.{queue}"


def dead_subject(queue: str) -> str:
    """Return the dead-letter subject of a queue, e.g. ``trinity.dead.analysis``."""
    return f"{_DEAD_PREFIX}.{queue}"
