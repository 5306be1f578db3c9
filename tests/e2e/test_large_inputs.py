"""Large and wide inputs: bytes stay out of messages, heavy work stays off the loop (C2, C3)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import nats
import pytest

from tests.support import eventually, wait_for_job
from trinity_common import names

if TYPE_CHECKING:
    import httpx

    from tests.conftest import Services
    from trinity_common.devstack import Database, NatsServer


def orders_csv(rows: int) -> bytes:
    """Return a CSV shaped like the orders case file, ``rows`` rows long."""
    lines = ["order_id,customer,amount,note"]
    lines += [
        f'{i},cust-{i % 977},{i * 1.01:.2f},"lorem ipsum dolor sit amet {i}"' for i in range(rows)
    ]
    return ("\n".join(lines) + "\n").encode()


def wide_csv(columns: int, rows: int, *, seed: int = 3) -> bytes:
    """Return ``rows`` rows of ``columns`` random numeric columns."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    header = ",".join(f"c{i}" for i in range(columns))
    body = (",".join(f"{rng.gauss(0, 1):.4f}" for _ in range(columns)) for _ in range(rows))
    return (header + "\n" + "\n".join(body) + "\n").encode()


async def upload(
    client: httpx.AsyncClient, name: str, content: bytes, *, analyze: bool
) -> dict[str, Any]:
    response = await client.post(
        "/api/upload", params={"analyze": str(analyze).lower()}, files={"data": (name, content)}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def queued_messages(nats_url: str) -> list[bytes]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.JOBS_STREAM)
        first, last = info.state.first_seq, info.state.last_seq
        found = [await js.get_msg(names.JOBS_STREAM, seq) for seq in range(first, last + 1)]
    finally:
        await nc.close()
    return [msg.data or b"" for msg in found]


async def test_large_uploads_travel_by_reference_and_profile(
    services: Services, nats_server: NatsServer
) -> None:
    files = {"orders-3mb.csv": orders_csv(60_000), "orders-1mb.csv": orders_csv(19_000)}
    await services.start_gateway()

    async with services.client() as client:
        jobs = {
            name: (await upload(client, name, content, analyze=True))["job"]["job_id"]
            for name, content in files.items()
        }
        messages = await queued_messages(nats_server.url)
        await services.start("trinity_analysis")
        done = {name: await wait_for_job(client, job, timeout_s=120) for name, job in jobs.items()}

    assert min(len(content) for content in files.values()) > 1024 * 1024
    assert len(messages) == 2
    assert all(len(message) < 2048 for message in messages), [len(m) for m in messages]
    for message in messages:
        envelope = msgspec.json.decode(message)
        assert set(envelope["command"]) == {"type", "dataset_id", "options"}
    assert {name: job["state"] for name, job in done.items()} == dict.fromkeys(files, "succeeded")
    assert done["orders-3mb.csv"]["result"]["summary"]["row_count"] == 60_000


async def test_upload_over_the_limit_gets_413_and_creates_nothing(
    services: Services, database: Database
) -> None:
    await services.start_gateway(TRINITY_GATEWAY_MAX_UPLOAD_BYTES=str(1024 * 1024))

    async with services.client() as client:
        response = await client.post(
            "/api/upload",
            params={"analyze": "true"},
            files={"data": ("big.csv", orders_csv(40_000))},
        )
    conn = await asyncpg.connect(database.url)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM datasets) AS datasets,"
            " (SELECT count(*) FROM jobs) AS jobs"
        )
    finally:
        await conn.close()

    assert response.status_code == 413
    assert str(1024 * 1024) in response.json()["detail"]
    assert counts is not None
    assert dict(counts) == {"datasets": 0, "jobs": 0}


@pytest.mark.slow
async def test_wide_correlation_runs_once_across_two_services(
    services: Services, database: Database
) -> None:
    content = wide_csv(400, 2_500)
    for _ in range(2):
        await services.start("trinity_analysis")
    await services.start_gateway()

    async with services.client() as client:
        accepted = await upload(client, "wide.csv", content, analyze=True)
        job = await wait_for_job(client, accepted["job"]["job_id"], timeout_s=120)
        profile = (await client.get(job["result"]["url"])).json()["profile"]
    conn = await asyncpg.connect(database.url)
    try:
        result = await conn.fetchrow(
            "SELECT count(*) AS rows, max(object_name) AS object_name FROM job_results"
        )
    finally:
        await conn.close()

    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1
    assert [a["attempt"] for a in job["attempts"]] == [1]
    assert result is not None
    assert result["rows"] == 1
    assert result["object_name"] == job["job_id"], "a big result is stored like a big upload"
    matrix = profile["correlations"]["matrix"]
    assert len(matrix) == 400
    assert all(matrix[i][i] == pytest.approx(1.0) for i in range(400))


async def test_work_that_outlasts_the_timeout_fails_with_a_timeout_error(
    services: Services,
) -> None:
    queue_env = {
        "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "0.2",
        "TRINITY_QUEUE_ANALYSIS_RETRIES": "0",
    }
    await services.start("trinity_analysis", **queue_env)
    await services.start_gateway(**queue_env)

    async with services.client() as client:
        accepted = await upload(client, "wide.csv", wide_csv(400, 2_500), analyze=True)
        job = await wait_for_job(client, accepted["job"]["job_id"], timeout_s=60)

    assert job["state"] == "failed"
    assert job["error"]["type"] == "timeout"
    assert "0.2 s timeout" in job["error"]["message"]


async def test_heartbeats_flow_while_the_profile_computes(
    services: Services, database: Database
) -> None:
    """The heartbeat is stamped by the event loop; a busy loop could not stamp it."""
    queue_env = {
        "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "1",
        "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "5",
    }
    await services.start("trinity_analysis", **queue_env)
    await services.start_gateway(**queue_env)

    async with services.client() as client:
        accepted = await upload(client, "wide.csv", wide_csv(400, 6_000), analyze=True)
        job_id = accepted["job"]["job_id"]
        beats: set[str] = set()

        async def two_beats_while_running() -> bool | None:
            job = (await client.get(f"/api/jobs/{job_id}")).json()
            if job["state"] == "running" and job["heartbeat_at"]:
                beats.add(job["heartbeat_at"])
            return len(beats) >= 2 or job["state"] in {"succeeded", "failed"} or None

        await eventually(two_beats_while_running, timeout_s=60, what="heartbeats")
        job = await wait_for_job(client, job_id, timeout_s=60)

    assert job["state"] == "succeeded", job
    assert len(beats) >= 2, "the heartbeat did not advance while the profile computed"


def descendants(pid: int) -> set[int]:
    """Return the pids of every living descendant of ``pid``."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        for child in map(int, children):
            found |= {child, *descendants(child)}
    return found


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_killed_service_leaves_no_profiling_process_behind(services: Services) -> None:
    """Its profiling children would otherwise compute on for no one, holding memory."""
    analysis = await services.start("trinity_analysis")
    await services.start_gateway()
    async with services.client() as client:
        accepted = await upload(client, "orders.csv", orders_csv(100), analyze=True)
        await wait_for_job(client, accepted["job"]["job_id"], timeout_s=60)
    children = descendants(analysis.pid)

    await analysis.kill()

    async def all_gone() -> bool | None:
        return not any(is_alive(pid) for pid in children) or None

    await eventually(all_gone, timeout_s=10, what="the service's children to exit")
    assert children, "the service had no children to check"
