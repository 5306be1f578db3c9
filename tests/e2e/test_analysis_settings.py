"""The analysis service's own settings, as a deployment sets them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.support import wait_for_job

if TYPE_CHECKING:
    from tests.conftest import Services

SIX_COLUMNS = b"a,b,c,d,e,f\n1,2,3,4,5,6\n7,8,9,10,11,12\n"


async def test_file_wider_than_the_column_limit_fails_once_naming_both(
    services: Services,
) -> None:
    await services.start("trinity_analysis", TRINITY_ANALYSIS_MAX_COLUMNS="5")
    await services.start_gateway()

    async with services.client() as client:
        response = await client.post(
            "/api/upload", params={"analyze": "true"}, files={"data": ("six.csv", SIX_COLUMNS)}
        )
        job = await wait_for_job(client, response.json()["job"]["job_id"], timeout_s=60)

    assert job["state"] == "failed"
    assert job["attempt"] == 1, "a file too wide stays too wide: no retries"
    assert job["error"]["type"] == "too_wide"
    assert job["error"]["message"].startswith(
        "the file has 6 columns, more than the 5 this service profiles;"
    )


async def test_analysis_refuses_to_start_with_a_malformed_column_limit(
    services: Services,
) -> None:
    process = await services.start("trinity_analysis", TRINITY_ANALYSIS_MAX_COLUMNS="many")

    status = await process.wait(30)

    assert status == 2
    assert "TRINITY_ANALYSIS_MAX_COLUMNS" in process.output()
    assert "Traceback" not in process.output()
