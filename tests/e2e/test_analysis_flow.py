"""A dataset travels the whole path: gateway, JetStream, analysis, status, PostgreSQL."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import palmerpenguins
import pandas as pd
import pytest

from tests.support import wait_for_job
from trinity_common.client import submit_job
from trinity_common.commands import RunAnalysis
from trinity_common.queues import QUEUES

if TYPE_CHECKING:
    import httpx

    from tests.conftest import Services
    from trinity_common.devstack import NatsServer

PENGUINS = Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"


async def upload(
    client: httpx.AsyncClient, name: str, content: bytes, *, analyze: bool = True
) -> dict[str, Any]:
    response = await client.post(
        "/api/upload",
        params={"analyze": str(analyze).lower()},
        files={"data": (name, content, "text/csv")},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def column(profile: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in profile["columns"] if c["name"] == name)
    return found


@pytest.fixture
async def running(services: Services) -> Services:
    await services.start("trinity_analysis")
    await services.start_gateway()
    return services


async def test_penguins_profile_matches_an_independent_computation(running: Services) -> None:
    expected = pd.read_csv(PENGUINS)

    async with running.client() as client:
        accepted = await upload(client, "penguins.csv", PENGUINS.read_bytes())
        job = await wait_for_job(client, accepted["job"]["job_id"], timeout_s=90)
        profile = (await client.get(job["result"]["url"])).json()["profile"]

    assert job["state"] == "succeeded", job
    assert job["attempt"] == 1
    assert profile["row_count"] == len(expected)
    assert [c["name"] for c in profile["columns"]] == list(expected.columns)
    for name in ("bill_length_mm", "flipper_length_mm", "body_mass_g"):
        stats = column(profile, name)
        assert stats["missing"] == int(expected[name].isna().sum())
        assert stats["numeric"]["mean"] == pytest.approx(expected[name].mean())
        assert stats["numeric"]["std"] == pytest.approx(expected[name].std())
        assert stats["numeric"]["min"] == pytest.approx(expected[name].min())
    species = column(profile, "species")
    assert species["distinct"] == expected["species"].nunique()
    assert species["top_values"][0] == {
        "value": expected["species"].value_counts().index[0],
        "count": int(expected["species"].value_counts().iloc[0]),
    }
    correlations = profile["correlations"]
    i = correlations["columns"].index("bill_length_mm")
    j = correlations["columns"].index("flipper_length_mm")
    assert correlations["matrix"][i][j] == pytest.approx(
        expected["bill_length_mm"].corr(expected["flipper_length_mm"])
    )


async def test_bom_and_crlf_file_profiles_clean_column_names(
    running: Services, cases_dir: Path
) -> None:
    content = (cases_dir / "regions-bom-crlf.csv").read_bytes()

    async with running.client() as client:
        accepted = await upload(client, "regions.csv", content)
        job = await wait_for_job(client, accepted["job"]["job_id"], timeout_s=60)
        profile = (await client.get(job["result"]["url"])).json()["profile"]

    assert job["state"] == "succeeded", job
    assert [c["name"] for c in profile["columns"]] == ["region", "month", "revenue"]
    assert profile["row_count"] == 8
    assert math.isclose(column(profile, "revenue")["numeric"]["sum"], 8757.00)


@pytest.mark.parametrize(
    ("content", "error_type", "words"),
    [
        (b"", "empty_file", "empty"),
        (b"region,month,revenue\r\n", "no_rows", "no data rows"),
        ("name,city\nJörg,Köln\n".encode("cp1252"), "encoding", "UTF-8"),
    ],
    ids=["empty", "header-only", "not-utf8"],
)
async def test_unreadable_file_fails_job_once_with_clear_error(
    running: Services, content: bytes, error_type: str, words: str
) -> None:
    async with running.client() as client:
        accepted = await upload(client, "bad.csv", content)
        job = await wait_for_job(client, accepted["job"]["job_id"], timeout_s=60)

    assert job["state"] == "failed"
    assert job["attempt"] == 1, "a permanent error must not be retried"
    assert job["error"]["type"] == error_type
    assert words.lower() in job["error"]["message"].lower()


async def test_job_naming_a_missing_dataset_fails_at_once_without_retries(
    running: Services, nats_server: NatsServer
) -> None:
    """Another service may submit straight to JetStream, naming a dataset that is not there."""
    nc = await nats.connect(nats_server.url)
    try:
        envelope = await submit_job(
            nc.jetstream(), QUEUES["analysis"], RunAnalysis(dataset_id="f" * 32)
        )
    finally:
        await nc.close()

    async with running.client() as client:
        job = await wait_for_job(client, envelope.job_id, timeout_s=60)

    assert (job["state"], job["attempt"]) == ("failed", 1)
    assert job["error"] == {
        "type": "dataset_not_found",
        "message": f"dataset {'f' * 32} does not exist",
    }
    assert job["dead_lettered"] is True
