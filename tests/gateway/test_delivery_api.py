"""Delivery controls over HTTP: idempotent submission, cancel, retry, listings, limits.

No worker runs here. Where a test needs a job to have started, finished or been
dead-lettered, it publishes the status events a worker would, and waits until
the gateway's status projector has folded them into the job's record.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import pytest

from tests.support import eventually
from trinity_common import names
from trinity_common.messages import (
    CancelRequest,
    JobAccepted,
    JobFailed,
    JobStarted,
    JobSucceeded,
    StatusEvent,
    utc_now,
)
from trinity_common.status import publish_status

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx
    from litestar import Litestar
    from litestar.testing import AsyncTestClient
    from nats.aio.client import Client
    from nats.js import JetStreamContext

    from tests.conftest import Services
    from trinity_common.devstack import Database, NatsServer

    TestClient = AsyncTestClient[Litestar]

# Longest a JetStream request made by a test may take, in seconds.
NATS_TIMEOUT_S = 5.0
# Deadline for the projector to apply an event, or for NATS to come back, in seconds.
WAIT_S = 15.0
# The default analysis queue: three retries after the first attempt.
MAX_ATTEMPTS = 4
KEY = "Idempotency-Key"
CSV = b"city,temp\nOslo,3.5\nRome,17.25\n"


async def submit(
    client: TestClient, dataset_id: str, *, key: str | None = None, bins: int = 10
) -> httpx.Response:
    body = {"dataset_id": dataset_id, "options": {"histogram_bins": bins}}
    headers = {KEY: key} if key is not None else {}
    return await client.post("/api/analysis", json=body, headers=headers)


async def submit_job(client: TestClient, dataset_id: str) -> str:
    response = await submit(client, dataset_id)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def read_job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def wait_for_job(
    client: TestClient, job_id: str, check: Callable[[dict[str, Any]], bool], *, what: str
) -> dict[str, Any]:
    async def poll() -> dict[str, Any] | None:
        response = await client.get(f"/api/jobs/{job_id}")
        if response.status_code == 404:  # a job made by events alone appears once projected
            return None
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job if check(job) else None

    return await eventually(poll, timeout_s=WAIT_S, what=f"job {job_id} to be {what}")


async def publish(js: JetStreamContext, *events: StatusEvent) -> None:
    for event in events:
        await publish_status(js, event, ack_timeout_s=NATS_TIMEOUT_S)


def started(job_id: str, *, at: datetime | None = None, queue: str = "analysis") -> JobStarted:
    return JobStarted(
        job_id=job_id,
        queue=queue,
        at=at or utc_now(),
        attempt=1,
        max_attempts=MAX_ATTEMPTS,
        worker="test-worker",
    )


async def start(client: TestClient, js: JetStreamContext, job_id: str) -> None:
    await publish(js, started(job_id))
    await wait_for_job(client, job_id, lambda job: job["state"] == "running", what="running")


async def succeed(client: TestClient, js: JetStreamContext, job_id: str) -> None:
    done = JobSucceeded(job_id=job_id, queue="analysis", at=utc_now(), attempt=1)
    await publish(js, started(job_id), done)
    await wait_for_job(client, job_id, lambda job: job["state"] == "succeeded", what="succeeded")


async def dead_letter(
    client: TestClient,
    js: JetStreamContext,
    job_id: str,
    *,
    at: datetime | None = None,
    queue: str = "analysis",
) -> None:
    """Fail the job for good at ``at`` (its finish time), as a worker's last attempt would."""
    finished = at or utc_now()
    failed = JobFailed(
        job_id=job_id,
        queue=queue,
        at=finished,
        attempt=1,
        error_type="permanent_job_error",
        error_message="the file is not a table",
        dead_lettered=True,
    )
    await publish(js, started(job_id, at=finished - timedelta(seconds=1), queue=queue), failed)
    await wait_for_job(client, job_id, lambda job: job["dead_lettered"], what="dead-lettered")


async def fetch_value(database: Database, query: str, *args: object) -> Any:
    conn = await asyncpg.connect(database.url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def jobs_stream_messages(js: JetStreamContext) -> int:
    info = await js.stream_info(names.JOBS_STREAM)
    return info.state.messages


async def job_message_ids(js: JetStreamContext) -> list[str]:
    """Return the ``Nats-Msg-Id`` of every job in the work stream, oldest first."""
    info = await js.stream_info(names.JOBS_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(names.JOBS_STREAM, seq)
        ids.append(str((message.headers or {})[names.HEADER_MSG_ID]))
    return ids


def ids_of(page: dict[str, Any]) -> list[str]:
    return [item["job_id"] for item in page["items"]]


async def get_page(client: TestClient, path: str, **params: str | int) -> dict[str, Any]:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def walk_pages(client: TestClient, path: str, *, limit: int) -> list[list[str]]:
    """Follow ``next_cursor`` from the first page to the last; return each page's ids."""
    pages = [await get_page(client, path, limit=limit)]
    for _ in range(20):  # a cursor that never ends is a failure, not a hang
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return [ids_of(page) for page in pages]
        pages.append(await get_page(client, path, limit=limit, cursor=cursor))
    raise AssertionError(f"{path} still had a next_cursor after 20 pages")


# Idempotent submission


async def test_same_idempotency_key_and_body_returns_the_first_job(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    first = await submit(client, dataset_id, key="order-1")

    second = await submit(client, dataset_id, key="order-1")

    assert (first.status_code, second.status_code) == (202, 202)
    job_id = first.json()["job_id"]
    assert second.json()["job_id"] == job_id
    assert await job_message_ids(js) == [f"{job_id}.1"]


async def test_same_idempotency_key_with_another_body_gets_422_naming_the_header(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    first = await submit(client, dataset_id, key="order-1", bins=10)

    response = await submit(client, dataset_id, key="order-1", bins=20)

    assert response.status_code == 422
    assert response.json() == {
        "status": 422,
        "detail": (
            "this Idempotency-Key was already used for a different request;"
            " send a new key for a new job"
        ),
        "problems": [{"field": "header.Idempotency-Key", "message": "used before"}],
    }
    assert await job_message_ids(js) == [f"{first.json()['job_id']}.1"]


async def test_different_idempotency_keys_make_different_jobs(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    first = await submit(client, dataset_id, key="order-1")

    second = await submit(client, dataset_id, key="order-2")

    assert (first.status_code, second.status_code) == (202, 202)
    first_id, second_id = first.json()["job_id"], second.json()["job_id"]
    assert first_id != second_id
    assert await job_message_ids(js) == [f"{first_id}.1", f"{second_id}.1"]


async def test_idempotency_key_is_free_again_after_a_503(
    client: TestClient, dataset_id: str, nats_server: NatsServer
) -> None:
    await nats_server.stop()
    refused = await submit(client, dataset_id, key="order-1")
    await nats_server.restart()

    async def is_ready() -> bool | None:
        return (await client.get("/health/ready")).status_code == 200 or None

    await eventually(is_ready, timeout_s=WAIT_S, what="the gateway to be ready again")
    accepted = await submit(client, dataset_id, key="order-1")

    assert refused.status_code == 503
    assert accepted.status_code == 202, accepted.text
    job = await read_job(client, accepted.json()["job_id"])
    assert job["state"] == "queued"


async def test_resubmitting_with_the_key_after_a_lost_ack_makes_no_second_job(
    client: TestClient, dataset_id: str, nats_server: NatsServer, js: JetStreamContext
) -> None:
    """A 503 may follow a publish JetStream stored but never acknowledged in time.

    Pausing nats-server lets the gateway write the job to its socket and then
    give up waiting for the ack; once resumed, the server stores the job.
    """
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        refused = await submit(client, dataset_id, key="order-1")
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)

    async def is_stored() -> bool | None:
        return await jobs_stream_messages(js) > 0 or None

    await eventually(is_stored, timeout_s=WAIT_S, what="the unacknowledged job to be stored")
    accepted = await submit(client, dataset_id, key="order-1")

    assert refused.status_code == 503
    assert accepted.status_code == 202, accepted.text
    assert await job_message_ids(js) == [f"{accepted.json()['job_id']}.1"]


async def test_repeat_of_a_submission_in_flight_is_never_a_second_job(
    services: Services, nats_server: NatsServer, database: Database, js: JetStreamContext
) -> None:
    """A repeat while the first request still waits for its ack publishes the same job.

    Both carry the claimed job id as their message id, so JetStream stores one
    job whichever of them gets through; neither answer is a 202 for a job that
    may not exist. Pausing nats-server holds the first request until its ack
    times out. The gateway runs as a process: the in-process test client serves
    one request at a time, so it cannot overlap two.
    """
    await services.start_gateway(TRINITY_NATS_TIMEOUT_S="4")
    async with services.client() as http:
        upload = await http.post("/api/upload", files={"data": ("temps.csv", CSV)})
        assert upload.status_code == 201, upload.text
        body = {"dataset_id": upload.json()["dataset_id"]}
        headers = {KEY: "order-1"}

        async def is_claimed() -> bool | None:
            query = "SELECT true FROM idempotency_keys WHERE key = $1"
            claimed: bool | None = await fetch_value(database, query, "order-1")
            return claimed

        assert nats_server.pid is not None
        os.kill(nats_server.pid, signal.SIGSTOP)
        try:
            async with asyncio.TaskGroup() as group:
                first = group.create_task(http.post("/api/analysis", json=body, headers=headers))
                await eventually(is_claimed, timeout_s=WAIT_S, what="the first request's claim")
                repeat = await http.post("/api/analysis", json=body, headers=headers)
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)

        async def is_stored() -> bool | None:
            return await jobs_stream_messages(js) > 0 or None

        await eventually(is_stored, timeout_s=WAIT_S, what="the unacknowledged job to be stored")
        settled = await http.post("/api/analysis", json=body, headers=headers)

    assert first.result().status_code == 503
    assert repeat.status_code == 503, repeat.text
    assert settled.status_code == 202, settled.text
    assert await job_message_ids(js) == [f"{settled.json()['job_id']}.1"]


# Cancelling


async def test_cancelling_a_queued_job_marks_it_cancelled_and_broadcasts_it(
    client: TestClient, dataset_id: str, nc: Client
) -> None:
    job_id = await submit_job(client, dataset_id)
    broadcasts = await nc.subscribe(names.cancel_subject("analysis"))
    await nc.flush()

    response = await client.delete(f"/api/jobs/{job_id}")
    broadcast = await broadcasts.next_msg(timeout=NATS_TIMEOUT_S)

    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "cancelled"
    assert job["error"] == {"type": "cancelled", "message": "cancelled by request"}
    assert msgspec.json.decode(broadcast.data, type=CancelRequest) == CancelRequest(
        job_id=job_id, reason="cancelled by request"
    )


async def test_cancelling_a_succeeded_job_gets_409_saying_so(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)
    await succeed(client, js, job_id)

    response = await client.delete(f"/api/jobs/{job_id}")

    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {job_id} already succeeded; only unfinished jobs can be cancelled"
    )
    assert (await read_job(client, job_id))["state"] == "succeeded"


async def test_cancelling_a_job_whose_result_is_stored_gets_409_before_its_status_arrives(
    client: TestClient, dataset_id: str, database: Database
) -> None:
    job_id = await submit_job(client, dataset_id)
    # The worker stores the result, then publishes the success: between the two,
    # and until the projector applies it, the record still reads queued or running.
    conn = await asyncpg.connect(database.url)
    try:
        await conn.execute(
            "INSERT INTO job_results (job_id, queue, result, size_bytes)"
            " VALUES ($1, 'analysis', '{}', 2)",
            job_id,
        )
    finally:
        await conn.close()

    response = await client.delete(f"/api/jobs/{job_id}")

    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {job_id} already succeeded; only unfinished jobs can be cancelled"
    )
    assert (await read_job(client, job_id))["state"] == "queued"


async def test_cancelling_an_unknown_job_gets_404(client: TestClient) -> None:
    response = await client.delete(f"/api/jobs/{'a' * 32}")

    assert response.status_code == 404
    assert response.json()["detail"] == f"no job with id {'a' * 32}"


async def test_late_start_event_does_not_revive_a_cancelled_job(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)
    marker_id = await submit_job(client, dataset_id)
    assert (await client.delete(f"/api/jobs/{job_id}")).status_code == 200

    # Events are projected in stream order, so once the marker's start shows,
    # the late start published before it has been dealt with.
    await publish(js, started(job_id))
    await start(client, js, marker_id)

    job = await read_job(client, job_id)
    assert job["state"] == "cancelled"
    assert job["started_at"] is None


# Retrying dead-lettered jobs


async def test_retrying_a_dead_lettered_job_queues_it_under_a_new_message_id(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)
    await dead_letter(client, js, job_id)

    response = await client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 202, response.text
    assert response.json() == {
        "job_id": job_id,
        "queue": "analysis",
        "state": "queued",
        "status_url": f"/api/jobs/{job_id}",
    }
    job = await read_job(client, job_id)
    assert (job["state"], job["attempt"], job["dead_lettered"]) == ("queued", 0, False)
    assert job["error"] is None
    assert await job_message_ids(js) == [f"{job_id}.1", f"{job_id}.2"]


@pytest.mark.parametrize("outcome", ["running", "succeeded"])
async def test_retrying_a_job_that_was_not_dead_lettered_gets_409(
    client: TestClient, dataset_id: str, js: JetStreamContext, outcome: str
) -> None:
    job_id = await submit_job(client, dataset_id)
    await (start if outcome == "running" else succeed)(client, js, job_id)

    response = await client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {job_id} is {outcome}; only a failed, dead-lettered job can be retried"
    )
    assert await job_message_ids(js) == [f"{job_id}.1"]


async def test_retried_job_leaves_the_dead_letter_list(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)
    await dead_letter(client, js, job_id)
    assert ids_of(await get_page(client, "/api/dead-letters")) == [job_id]

    response = await client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 202, response.text
    assert ids_of(await get_page(client, "/api/dead-letters")) == []


# Listing dead letters


async def test_dead_letters_are_listed_most_recently_failed_first(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    now = utc_now()
    oldest, newest, middle = [await submit_job(client, dataset_id) for _ in range(3)]
    for job_id, minutes_ago in ((oldest, 3), (newest, 1), (middle, 2)):
        await dead_letter(client, js, job_id, at=now - timedelta(minutes=minutes_ago))

    page = await get_page(client, "/api/dead-letters")

    assert ids_of(page) == [newest, middle, oldest]
    assert page["next_cursor"] is None


async def test_dead_letters_filter_by_queue(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    analysis_id = await submit_job(client, dataset_id)
    await dead_letter(client, js, analysis_id)
    report_id = "b" * 32
    accepted = JobAccepted(job_id=report_id, queue="reports", at=utc_now(), max_attempts=3)
    await publish(js, accepted)
    await dead_letter(client, js, report_id, queue="reports")

    reports = await get_page(client, "/api/dead-letters", queue="reports")
    analyses = await get_page(client, "/api/dead-letters", queue="analysis")

    assert ids_of(reports) == [report_id]
    assert ids_of(analyses) == [analysis_id]


async def test_dead_letters_paginate_with_next_cursor(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    now = utc_now()
    job_ids = [await submit_job(client, dataset_id) for _ in range(3)]
    for minutes_ago, job_id in enumerate(job_ids, start=1):
        await dead_letter(client, js, job_id, at=now - timedelta(minutes=minutes_ago))

    pages = await walk_pages(client, "/api/dead-letters", limit=2)

    assert pages == [job_ids[:2], job_ids[2:]]


async def test_dead_letters_answer_400_naming_the_cursor_when_it_is_garbage(
    client: TestClient,
) -> None:
    response = await client.get("/api/dead-letters", params={"cursor": "not-a-cursor"})

    assert response.status_code == 400
    assert response.json() == {
        "status": 400,
        "detail": "invalid cursor: pass the next_cursor of a previous page unchanged",
        "problems": [{"field": "query.cursor", "message": "not a cursor this API returned"}],
    }


# Listing jobs


async def test_jobs_are_listed_newest_first(client: TestClient, dataset_id: str) -> None:
    job_ids = [await submit_job(client, dataset_id) for _ in range(3)]

    page = await get_page(client, "/api/jobs")

    assert ids_of(page) == job_ids[::-1]
    assert page["next_cursor"] is None


async def test_jobs_filter_by_state(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    queued_id, running_id, succeeded_id = [await submit_job(client, dataset_id) for _ in range(3)]
    await start(client, js, running_id)
    await succeed(client, js, succeeded_id)

    by_state = {
        state: ids_of(await get_page(client, "/api/jobs", state=state))
        for state in ("queued", "running", "succeeded", "failed")
    }

    assert by_state == {
        "queued": [queued_id],
        "running": [running_id],
        "succeeded": [succeeded_id],
        "failed": [],
    }


async def test_jobs_pages_cover_every_job_exactly_once(client: TestClient, dataset_id: str) -> None:
    job_ids = [await submit_job(client, dataset_id) for _ in range(5)]

    pages = await walk_pages(client, "/api/jobs", limit=2)

    newest_first = job_ids[::-1]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:]]


# Queue limits


@pytest.mark.parametrize("env", [{"TRINITY_QUEUE_MAX_JOBS": "2"}], indirect=True, ids=["max-2"])
async def test_submission_to_a_full_queue_gets_503_with_retry_after(
    client: TestClient, dataset_id: str, database: Database
) -> None:
    for _ in range(2):
        await submit_job(client, dataset_id)

    response = await submit(client, dataset_id)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["detail"] == "the analysis queue is full; retry later"
    assert await fetch_value(database, "SELECT count(*) FROM jobs") == 2


# Stalled jobs


async def test_job_whose_heartbeats_stopped_shows_stalled(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)
    last_beat = utc_now() - timedelta(minutes=10)

    await publish(js, started(job_id, at=last_beat))
    job = await wait_for_job(
        client, job_id, lambda job: job["heartbeat_at"] is not None, what="started"
    )

    assert job["state"] == "stalled"
    assert datetime.fromisoformat(job["heartbeat_at"]) == last_beat


async def test_job_with_a_fresh_heartbeat_shows_running(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    job_id = await submit_job(client, dataset_id)

    await publish(js, started(job_id))
    job = await wait_for_job(
        client, job_id, lambda job: job["heartbeat_at"] is not None, what="started"
    )

    assert job["state"] == "running"


async def test_jobs_filter_tells_stalled_jobs_from_running_ones(
    client: TestClient, dataset_id: str, js: JetStreamContext
) -> None:
    stalled_id, running_id = [await submit_job(client, dataset_id) for _ in range(2)]
    await publish(js, started(stalled_id, at=utc_now() - timedelta(minutes=10)))
    await publish(js, started(running_id))
    for job_id in (stalled_id, running_id):
        await wait_for_job(
            client, job_id, lambda job: job["heartbeat_at"] is not None, what="started"
        )

    stalled = ids_of(await get_page(client, "/api/jobs", state="stalled"))
    running = ids_of(await get_page(client, "/api/jobs", state="running"))

    assert (stalled, running) == ([stalled_id], [running_id])


# The API's description


async def test_openapi_document_describes_the_delivery_routes(client: TestClient) -> None:
    document = (await client.get("/schema/openapi.json")).json()

    paths = document["paths"]
    assert "delete" in paths["/api/jobs/{job_id}"]
    assert "post" in paths["/api/jobs/{job_id}/retry"]
    assert "get" in paths["/api/dead-letters"]
    assert "get" in paths["/api/jobs"]
    headers = [
        parameter["name"]
        for parameter in paths["/api/analysis"]["post"]["parameters"]
        if parameter["in"] == "header"
    ]
    assert headers == ["Idempotency-Key"]
