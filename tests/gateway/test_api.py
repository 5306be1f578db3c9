"""The HTTP API against real NATS and PostgreSQL, with the app in this process."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from trinity_common.settings import load_settings
from trinity_gateway.app import create_app
from trinity_gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar import Litestar

    from trinity_common.devstack import Database, NatsServer

CSV = b"city,temp\nOslo,3.5\nRome,17.25\n"


@pytest.fixture
def env(service_env: dict[str, str]) -> dict[str, str]:
    return {**service_env, "TRINITY_GATEWAY_MAX_UPLOAD_BYTES": "4096"}


@pytest.fixture
async def client(env: dict[str, str]) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(load_settings(GatewaySettings, env), env=env)
    async with AsyncTestClient(app) as test_client:
        yield test_client


async def upload(client: AsyncTestClient[Litestar], content: bytes = CSV) -> dict[str, Any]:
    response = await client.post("/api/upload", files={"data": ("temps.csv", content)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def count_rows(database: Database, table: str) -> int:
    conn = await asyncpg.connect(database.url)
    try:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
    finally:
        await conn.close()
    return count


async def test_submit_answers_202_and_job_reads_queued_at_once(
    client: AsyncTestClient[Litestar],
) -> None:
    dataset = await upload(client)

    response = await client.post("/api/analysis", json={"dataset_id": dataset["dataset_id"]})
    job = (await client.get(response.headers["location"])).json()

    assert response.status_code == 202
    assert response.json()["status_url"] == response.headers["location"]
    assert job["state"] == "queued"
    assert job["queue"] == "analysis"
    assert job["max_attempts"] == 4
    assert job["progress"] == {"percent": 0.0, "message": ""}


async def test_queue_status_route_serves_the_same_document(
    client: AsyncTestClient[Litestar],
) -> None:
    dataset = await upload(client)
    job_id = (
        await client.post("/api/analysis", json={"dataset_id": dataset["dataset_id"]})
    ).json()["job_id"]

    current = await client.get(f"/api/jobs/{job_id}")
    legacy = await client.get(f"/api/queue/status/{job_id}")

    assert legacy.status_code == 200
    assert legacy.json() == current.json()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"dataset_id": 42}, "dataset_id", "Expected `str`"),
        ({}, "dataset_id", "required, and missing"),
        ({"dataset_id": "0" * 32, "colour": "red"}, "colour", "no such field"),
        ({"dataset_id": "0" * 32, "options": {"bins": 3}}, "options.bins", "no such field"),
        ([], "body", "Expected `object`, got `array`"),
        ({"dataset_id": "0" * 32, "a`b": 1}, "a`b", "no such field"),
        ({"dataset_id": "0" * 32, "": 1}, "body", "no such field"),
        (
            {"dataset_id": "0" * 32, "options": {"histogram_bins": 0}},
            "options.histogram_bins",
            ">= 1",
        ),
    ],
    ids=[
        "wrong-type",
        "missing",
        "unknown-field",
        "unknown-option",
        "out-of-range",
        "array",
        "backtick-name",
        "empty-name",
    ],
)
async def test_malformed_body_gets_400_naming_the_problem(
    client: AsyncTestClient[Litestar], body: Any, field: str, words: str
) -> None:
    response = await client.post("/api/analysis", json=body)

    assert response.status_code == 400
    problem = response.json()
    assert problem["status"] == 400
    assert words in problem["detail"]
    assert [p["field"] for p in problem["problems"]] == [field]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"delimiter": "\u0000"}, "Invalid enum value"),
        ({"encoding": "rot13"}, "'rot13' is not a text encoding"),
        ({"encoding": "klingon"}, "'klingon' is not a text encoding"),
        ({"encoding": "utf\u00008"}, "Expected `str` matching regex"),
    ],
    ids=["nul-delimiter", "bytes-codec", "unknown-encoding", "nul-encoding"],
)
async def test_option_that_could_never_work_gets_400_at_submission(
    client: AsyncTestClient[Litestar], options: dict[str, str], words: str
) -> None:
    dataset = await upload(client)

    response = await client.post(
        "/api/analysis", json={"dataset_id": dataset["dataset_id"], "options": options}
    )

    assert response.status_code == 400
    assert words in response.json()["detail"]
    assert [p["field"] for p in response.json()["problems"]] == [f"options.{next(iter(options))}"]


async def test_deeply_nested_body_gets_400_not_500(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post(
        "/api/analysis", content=b"[" * 5000, headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["detail"] == "the JSON body is nested too deeply"


async def test_missing_body_gets_400_saying_it_is_missing(
    client: AsyncTestClient[Litestar],
) -> None:
    response = await client.post("/api/analysis")

    assert response.status_code == 400
    assert response.json()["problems"] == [{"field": "body", "message": "required, and missing"}]


async def test_truncated_json_gets_400_saying_it_is_malformed(
    client: AsyncTestClient[Litestar],
) -> None:
    response = await client.post(
        "/api/analysis", content=b'{"dataset_id": "ab', headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["detail"] == "JSON is malformed: the body ends before the JSON does"
    assert response.json()["problems"] == [
        {"field": "body", "message": "the body ends before the JSON does"}
    ]


@pytest.mark.parametrize(
    ("content_type", "named"),
    [
        ("text/plain", "text/plain"),
        ("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("", "a body without a Content-Type"),
    ],
    ids=["text", "form", "none"],
)
async def test_json_route_refuses_another_media_type_with_415_naming_it(
    client: AsyncTestClient[Litestar], content_type: str, named: str
) -> None:
    dataset = await upload(client)
    body = f'{{"dataset_id": "{dataset["dataset_id"]}"}}'.encode()
    headers = {"content-type": content_type} if content_type else {}

    response = await client.post("/api/analysis", content=body, headers=headers)

    assert response.status_code == 415
    assert response.json()["detail"] == f"send the body as application/json, not {named}"


async def test_json_body_over_its_limit_gets_413_stating_the_limit(
    client: AsyncTestClient[Litestar],
) -> None:
    body = b'{"dataset_id": "' + b"a" * 70_000 + b'"}'

    response = await client.post(
        "/api/analysis", content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert response.json()["detail"] == (
        "the request body is larger than this route's limit of 65536 bytes"
    )


async def test_bad_job_id_on_cancel_names_only_the_id(client: AsyncTestClient[Litestar]) -> None:
    response = await client.delete("/api/jobs/nope")

    assert response.status_code == 400
    assert [p["field"] for p in response.json()["problems"]] == ["path.job_id"]


async def test_openapi_describes_the_upload_form_and_the_optional_cancel_body(
    client: AsyncTestClient[Litestar],
) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]

    upload_body = paths["/api/upload"]["post"]["requestBody"]
    form = upload_body["content"]["multipart/form-data"]["schema"]
    assert upload_body["required"] is True
    assert form["required"] == ["data"]
    assert form["properties"]["data"]["format"] == "binary"
    assert paths["/api/jobs/{job_id}"]["delete"]["requestBody"]["required"] is False
    assert {"413", "415"} <= set(paths["/api/analysis"]["post"]["responses"])


async def test_upload_name_keeps_only_printable_characters(
    client: AsyncTestClient[Litestar],
) -> None:
    # Built by hand: HTTP clients percent-encode what this test needs sent raw.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="data"; filename="te\x00mps\t.csv"\r\n'
        b"Content-Type: text/csv\r\n\r\n" + CSV + b"\r\n--b--\r\n"
    )
    response = await client.post(
        "/api/upload", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )

    assert response.status_code == 201
    assert response.json()["dataset"]["name"] == "temps.csv"


async def test_unknown_dataset_gets_422_naming_the_field(
    client: AsyncTestClient[Litestar], database: Database
) -> None:
    response = await client.post("/api/analysis", json={"dataset_id": "f" * 32})

    assert response.status_code == 422
    assert response.json()["problems"] == [{"field": "dataset_id", "message": "no such dataset"}]
    assert await count_rows(database, "jobs") == 0


async def test_unknown_job_gets_404(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get(f"/api/jobs/{'a' * 32}")

    assert response.status_code == 404
    assert response.json()["detail"] == f"no job with id {'a' * 32}"


async def test_upload_over_the_limit_gets_413_stating_it(
    client: AsyncTestClient[Litestar], database: Database
) -> None:
    response = await client.post("/api/upload", files={"data": ("big.csv", b"x" * 5000)})

    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]
    assert await count_rows(database, "datasets") == 0


async def test_upload_records_size_and_checksum(client: AsyncTestClient[Litestar]) -> None:
    import hashlib

    body = await upload(client)
    record = (await client.get(f"/api/datasets/{body['dataset_id']}")).json()

    assert record["size_bytes"] == len(CSV)
    assert record["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert record["name"] == "temps.csv"


async def test_submit_answers_503_fast_when_nats_is_down(
    client: AsyncTestClient[Litestar], nats_server: NatsServer, database: Database
) -> None:
    dataset = await upload(client)
    await nats_server.stop()

    async with asyncio.timeout(5):  # a hang, not slowness, is the failure looked for
        response = await client.post("/api/analysis", json={"dataset_id": dataset["dataset_id"]})
    ready = await client.get("/health/ready")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert "nothing was queued" in response.json()["detail"]
    assert await count_rows(database, "jobs") == 0
    assert ready.status_code == 503
    assert ready.json()["checks"]["nats"].startswith("down")


async def test_openapi_document_describes_every_route(client: AsyncTestClient[Litestar]) -> None:
    document = (await client.get("/schema/openapi.json")).json()

    assert set(document["paths"]) >= {
        "/api/upload",
        "/api/analysis",
        "/api/jobs/{job_id}",
        "/api/queue/status/{job_id}",
        "/api/datasets/{dataset_id}",
        "/api/analyses/{job_id}",
        "/health/live",
        "/health/ready",
        "/health",
    }
    assert "503" in document["paths"]["/api/analysis"]["post"]["responses"]


async def test_readiness_fails_while_nats_is_frozen_and_the_gateway_recovers_after(
    client: AsyncTestClient[Litestar], nats_server: NatsServer
) -> None:
    dataset = await upload(client)
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        frozen = await client.get("/health/ready")
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    # The answer to the probe's request arrives now, after the probe gave up on it.
    await asyncio.sleep(0.5)
    thawed = await client.get("/health/ready")
    submitted = await client.post("/api/analysis", json={"dataset_id": dataset["dataset_id"]})

    assert frozen.status_code == 503
    assert frozen.json()["checks"] == {"nats": "down: TimeoutError", "database": "ok"}
    assert thawed.status_code == 200, thawed.text
    assert submitted.status_code == 202, submitted.text


async def test_upload_with_two_files_in_the_field_gets_400_saying_so(
    client: AsyncTestClient[Litestar],
) -> None:
    response = await client.post(
        "/api/upload", files=[("data", ("a.csv", CSV)), ("data", ("b.csv", CSV))]
    )

    assert response.status_code == 400
    assert response.json()["problems"] == [{"field": "data", "message": "more than one file"}]
