"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from trinity_common.commands import AnalysisOptions, DatasetId
from trinity_common.messages import AttemptOutcome, JobState

__all__ = [
    "AcceptedResponse",
    "AnalysisResponse",
    "DatasetResponse",
    "HealthResponse",
    "JobPage",
    "JobResponse",
    "RunAnalysisRequest",
    "UploadResponse",
]


class RunAnalysisRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Profile an uploaded dataset."""

    dataset_id: DatasetId
    """The id ``POST /api/upload`` returned."""
    options: AnalysisOptions = msgspec.field(default_factory=AnalysisOptions)
    """How to read and profile the file; every option has a default."""


class AcceptedResponse(msgspec.Struct, kw_only=True, frozen=True):
    """A job was durably queued."""

    job_id: str
    queue: str
    state: JobState
    status_url: str


class DatasetResponse(msgspec.Struct, kw_only=True, frozen=True):
    """An uploaded dataset."""

    dataset_id: str
    name: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: datetime
    url: str


class UploadResponse(msgspec.Struct, kw_only=True, frozen=True):
    """The stored dataset and, with ``?analyze=true``, the analysis job."""

    dataset_id: str
    dataset: DatasetResponse
    job: AcceptedResponse | None = None


class Progress(msgspec.Struct, kw_only=True, frozen=True):
    """How far the current attempt got."""

    percent: float
    message: str


class JobError(msgspec.Struct, kw_only=True, frozen=True):
    """Why the job (or its last attempt) failed."""

    type: str
    message: str


class JobResult(msgspec.Struct, kw_only=True, frozen=True):
    """Headline figures of the result, and where the full result is."""

    summary: dict[str, Any]
    url: str | None


class Attempt(msgspec.Struct, kw_only=True, frozen=True):
    """One attempt at the job."""

    submission: int
    """1, plus one for each manual retry of the dead job; attempts count afresh in each."""
    attempt: int
    worker: str
    started_at: datetime
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    """How the attempt ended; None while it runs. ``lost``: its worker stopped reporting."""
    error: JobError | None


JobStatus = Literal["queued", "running", "stalled", "retrying", "succeeded", "failed", "cancelled"]
"""A job's state as shown: ``stalled`` is a running job whose heartbeats stopped."""


class JobResponse(msgspec.Struct, kw_only=True, frozen=True):
    """A job's status, as of its latest event."""

    job_id: str
    queue: str
    state: JobStatus
    progress: Progress
    attempt: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    """When the running attempt last reported in; a stalled job shows it ageing."""
    result: JobResult | None
    error: JobError | None
    dead_lettered: bool
    """Whether the job's attempts ran out; ``POST /api/jobs/{job_id}/retry`` runs it anew."""
    attempts: list[Attempt]


class AnalysisResponse(msgspec.Struct, kw_only=True, frozen=True):
    """The full profile an analysis job produced."""

    job_id: str
    dataset_id: str
    profile: dict[str, Any]


class JobPage(msgspec.Struct, kw_only=True, frozen=True):
    """A page of jobs, newest first."""

    items: list[JobResponse]
    next_cursor: str | None
    """Pass as ``cursor`` to get the next page; None on the last page."""


class CancelRequest(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Why a job is cancelled; the body is optional."""

    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class HealthResponse(msgspec.Struct, kw_only=True, frozen=True):
    """Whether the gateway and its dependencies answer."""

    status: str
    checks: dict[str, str]
