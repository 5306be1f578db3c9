"""The status projection: events folded into the job table in any order, any number of times."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from trinity_common import names
from trinity_common.messages import (
    JobAccepted,
    JobCancelled,
    JobFailed,
    JobHandedBack,
    JobProgressed,
    JobRetried,
    JobStarted,
    JobSucceeded,
    StatusEvent,
)
from trinity_common.status import apply_event, publish_status

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import asyncpg

    from tests.common.conftest import Platform
    from trinity_common.database import Connection

pytestmark = pytest.mark.timeout(60)

JOB_ID = "a" * 32
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """Return the time ``seconds`` after the job was accepted."""
    return T0 + timedelta(seconds=seconds)


def accepted() -> JobAccepted:
    return JobAccepted(
        job_id=JOB_ID,
        queue="analysis",
        at=at(0),
        max_attempts=3,
        command={"type": "run_analysis", "dataset_id": "0" * 32},
    )


def started(*, attempt: int = 1, second: float = 1) -> JobStarted:
    return JobStarted(
        job_id=JOB_ID, queue="analysis", at=at(second), attempt=attempt, max_attempts=3
    )


def progressed(
    percent: float, message: str = "", *, attempt: int = 1, second: float = 2
) -> JobProgressed:
    return JobProgressed(
        job_id=JOB_ID,
        queue="analysis",
        at=at(second),
        attempt=attempt,
        percent=percent,
        message=message,
    )


def retried(*, attempt: int = 1, second: float = 3) -> JobRetried:
    return JobRetried(
        job_id=JOB_ID,
        queue="analysis",
        at=at(second),
        attempt=attempt,
        error_type="RuntimeError",
        error_message="boom",
        retry_in_s=0.3,
    )


def handed_back(*, attempt: int = 1, second: float = 3) -> JobHandedBack:
    return JobHandedBack(job_id=JOB_ID, queue="analysis", at=at(second), attempt=attempt)


def succeeded(*, attempt: int = 1, second: float = 4) -> JobSucceeded:
    return JobSucceeded(
        job_id=JOB_ID, queue="analysis", at=at(second), attempt=attempt, summary={"rows": 8}
    )


def failed(*, second: float = 4) -> JobFailed:
    return JobFailed(
        job_id=JOB_ID,
        queue="analysis",
        at=at(second),
        attempt=1,
        error_type="no_rows",
        error_message="the dataset has no rows",
        dead_lettered=True,
    )


def cancelled(*, second: float = 4) -> JobCancelled:
    return JobCancelled(
        job_id=JOB_ID, queue="analysis", at=at(second), attempt=1, reason="no longer needed"
    )


async def fold(conn: Connection, *events: StatusEvent) -> None:
    """Apply ``events`` in order, at stream sequences 1, 2, 3 and on."""
    for seq, event in enumerate(events, start=1):
        await apply_event(conn, event, seq=seq)


async def job_row(conn: Connection, job_id: str = JOB_ID) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
    assert row is not None, f"no row for job {job_id}"
    return dict(row)


async def attempt_rows(conn: Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT attempt, worker, started_at, finished_at, outcome, error_type, error_message"
        " FROM job_attempts WHERE job_id = $1 ORDER BY submission, attempt",
        JOB_ID,
    )
    return [dict(row) for row in rows]


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    async with pool.acquire() as acquired:
        yield acquired


@pytest.mark.parametrize(
    ("terminal", "state"),
    [(succeeded, "succeeded"), (failed, "failed"), (cancelled, "cancelled")],
    ids=["succeeded", "failed", "cancelled"],
)
@pytest.mark.parametrize(
    "late",
    [started(second=10), progressed(50, "late beat", second=10), handed_back(second=10)],
    ids=["started", "progressed", "handed_back"],
)
async def test_projector_keeps_terminal_state_when_late_event_arrives(
    conn: Connection,
    terminal: Callable[[], StatusEvent],
    state: str,
    late: StatusEvent,
) -> None:
    await fold(conn, accepted(), started(), progressed(30), terminal())
    before = await job_row(conn)

    await apply_event(conn, late, seq=5)

    after = await job_row(conn)
    assert after["state"] == state
    assert after == before


async def test_projector_never_moves_progress_backwards_within_an_attempt(
    conn: Connection,
) -> None:
    await fold(conn, accepted(), started(), progressed(60, "sixty"))

    await apply_event(conn, progressed(40, "forty", second=3), seq=4)

    job = await job_row(conn)
    assert (job["state"], job["progress_percent"], job["progress_message"]) == (
        "running",
        60.0,
        "sixty",
    )


async def test_projector_starts_progress_afresh_for_a_new_attempt(conn: Connection) -> None:
    await fold(conn, accepted(), started(), progressed(80), retried())

    await apply_event(conn, started(attempt=2, second=5), seq=5)
    await apply_event(conn, progressed(30, "again", attempt=2, second=6), seq=6)

    job = await job_row(conn)
    assert (job["state"], job["attempt"], job["progress_percent"]) == ("running", 2, 30.0)


@pytest.mark.parametrize("seq", [3, 4], ids=["older", "replayed"])
async def test_projector_ignores_event_not_newer_than_last_applied(
    conn: Connection, seq: int
) -> None:
    await apply_event(conn, accepted(), seq=1)
    await apply_event(conn, started(), seq=2)
    await apply_event(conn, progressed(50, "half"), seq=4)
    before = await job_row(conn)

    await apply_event(conn, retried(), seq=seq)

    assert await job_row(conn) == before


async def test_projector_keeps_running_when_accepted_arrives_after_started(
    conn: Connection,
) -> None:
    await fold(conn, started(), progressed(20, "reading"))

    await apply_event(conn, accepted(), seq=3)

    job = await job_row(conn)
    assert (job["state"], job["attempt"], job["progress_percent"]) == ("running", 1, 20.0)


LOST_TO_REDELIVERY = "the worker stopped reporting; the job was delivered again"


async def test_projector_closes_unreported_attempt_as_lost_when_next_attempt_starts(
    conn: Connection,
) -> None:
    await fold(conn, accepted(), started(), progressed(30))

    await apply_event(conn, started(attempt=2, second=20), seq=4)

    first, second = await attempt_rows(conn)
    assert (first["outcome"], first["error_type"], first["error_message"]) == (
        "lost",
        "lost",
        LOST_TO_REDELIVERY,
    )
    assert (first["started_at"], first["finished_at"]) == (at(1), at(20))
    assert (second["attempt"], second["outcome"], second["finished_at"]) == (2, None, None)


async def test_projector_records_lost_attempt_alike_whatever_order_events_arrive_in(
    conn: Connection,
) -> None:
    """Projector replicas may apply a batch's events in any order, and any of them twice."""
    stream: list[StatusEvent] = [
        accepted(),
        started(),
        started(attempt=2, second=20),
        succeeded(attempt=2, second=25),
    ]
    await fold(conn, *stream)
    expected = await attempt_rows(conn)

    outcomes = []
    for order in itertools.permutations(range(1, len(stream) + 1)):
        await conn.execute("DELETE FROM jobs WHERE job_id = $1", JOB_ID)
        for seq in (*order, *order):
            await apply_event(conn, stream[seq - 1], seq=seq)
        outcomes.append(await attempt_rows(conn) == expected)

    assert [(row["attempt"], row["outcome"], row["finished_at"]) for row in expected] == [
        (1, "lost", at(20)),
        (2, "succeeded", at(25)),
    ]
    assert outcomes == [True] * len(outcomes)


async def test_projector_replaces_lost_with_outcome_reported_late(conn: Connection) -> None:
    """A worker cut off for a while may still report; its word beats the inference."""
    await fold(conn, accepted(), started(), started(attempt=2, second=20))

    await apply_event(conn, retried(attempt=1, second=21), seq=4)

    first, _ = await attempt_rows(conn)
    assert (first["outcome"], first["error_type"], first["error_message"]) == (
        "retried",
        "RuntimeError",
        "boom",
    )
    assert first["finished_at"] == at(21)
    job = await job_row(conn)
    assert (job["state"], job["attempt"]) == ("running", 2)


async def test_projector_closes_unreported_attempt_as_lost_when_job_ended_before_it(
    conn: Connection,
) -> None:
    """A worker may start an attempt just as the job is cancelled, and die before it notices."""
    await fold(conn, accepted(), started(), cancelled(second=4))

    await apply_event(conn, started(attempt=2, second=5), seq=4)

    first, second = await attempt_rows(conn)
    assert (first["outcome"], first["finished_at"]) == ("cancelled", at(4))
    assert (second["outcome"], second["error_type"], second["error_message"]) == (
        "lost",
        "lost",
        "the worker stopped reporting; the job ended without it",
    )
    assert second["finished_at"] == at(5), "no earlier than the attempt started"
    assert (await job_row(conn))["state"] == "cancelled"


async def test_projector_shows_handed_back_job_as_queued_afresh(conn: Connection) -> None:
    await fold(conn, accepted(), started(), progressed(40, "reading"))

    await apply_event(conn, handed_back(second=5), seq=4)

    job = await job_row(conn)
    assert (job["state"], job["attempt"], job["finished_at"]) == ("queued", 1, None)
    assert (job["progress_percent"], job["progress_message"]) == (
        0.0,
        "handed back by a stopping worker",
    )
    [attempt] = await attempt_rows(conn)
    assert (attempt["outcome"], attempt["error_type"], attempt["finished_at"]) == (
        "handed_back",
        None,
        at(5),
    )


async def test_projector_keeps_next_attempt_running_when_hand_back_arrives_late(
    conn: Connection,
) -> None:
    """Even at a newer stream position, as when the hand-back's publish was slow to be stored."""
    await fold(conn, accepted(), started(), started(attempt=2, second=5))
    await apply_event(conn, progressed(10, "again", attempt=2, second=6), seq=4)

    await apply_event(conn, handed_back(attempt=1, second=4), seq=5)

    job = await job_row(conn)
    assert (job["state"], job["attempt"], job["progress_percent"]) == ("running", 2, 10.0)
    assert [(row["attempt"], row["outcome"]) for row in await attempt_rows(conn)] == [
        (1, "handed_back"),
        (2, None),
    ]


async def test_projector_keeps_succeeded_when_late_progress_is_published(
    platform: Platform,
) -> None:
    for event in (accepted(), started(), succeeded()):
        await publish_status(platform.js, event, ack_timeout_s=2)

    await publish_status(platform.js, progressed(50, "late beat", second=10), ack_timeout_s=2)
    await wait_until_projected(platform)

    async with platform.pool.acquire() as conn:
        job = await job_row(conn)
    assert (job["state"], job["progress_percent"], job["summary"]) == (
        "succeeded",
        100.0,
        {"rows": 8},
    )


async def test_projector_keeps_running_when_idle_fetch_times_out(
    platform: Platform, time_out_next_fetch: Callable[[str], asyncio.Event]
) -> None:
    timed_out = time_out_next_fetch(names.STATUS_CONSUMER)
    await asyncio.wait_for(timed_out.wait(), timeout=5)

    await publish_status(platform.js, accepted(), ack_timeout_s=2)
    await wait_until_projected(platform)

    async with platform.pool.acquire() as conn:
        job = await job_row(conn)
    assert job["state"] == "queued"


async def test_projector_stores_an_error_message_holding_nul(platform: Platform) -> None:
    """PostgreSQL text cannot hold NUL; such a message must neither block the stream nor vanish."""
    refused = JobFailed(
        job_id="b" * 32,
        queue="analysis",
        at=at(4),
        attempt=1,
        error_type="RuntimeError",
        error_message="bad \x00 byte",
    )
    await publish_status(platform.js, refused, ack_timeout_s=2)

    for event in (accepted(), started()):
        await publish_status(platform.js, event, ack_timeout_s=2)
    await wait_until_projected(platform)

    async with platform.pool.acquire() as conn:
        job = await job_row(conn)
        odd = await job_row(conn, "b" * 32)
    assert job["state"] == "running"
    assert (odd["state"], odd["error_message"]) == ("failed", "bad \ufffd byte")


async def wait_until_projected(platform: Platform) -> None:
    """Wait until the projector has acknowledged every event in the status stream."""
    last = (await platform.js.stream_info(names.STATUS_STREAM)).state.last_seq

    async def check() -> bool | None:
        info = await platform.js.consumer_info(names.STATUS_STREAM, names.STATUS_CONSUMER)
        return (info.ack_floor is not None and info.ack_floor.stream_seq >= last) or None

    await platform.wait_until(check, timeout_s=10, what=f"status event {last} to be projected")
