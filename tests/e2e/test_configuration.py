"""A malformed setting stops a service before it connects anywhere, naming the variable."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import Services


@pytest.mark.parametrize(
    ("module", "variable", "value"),
    [
        ("trinity_gateway", "TRINITY_GATEWAY_PORT", "http"),
        ("trinity_gateway", "TRINITY_QUEUE_EMAIL_RETRYS", "3"),
        ("trinity_analysis", "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S", "soon"),
        ("trinity_analysis", "TRINITY_DATABASE_POOL_MAX", "0"),
        ("trinity_analysis", "TRINITY_QUEUE_EMAIL_CONCURRENCY", "0"),
        ("trinity_analysis", "TRINITY_QUEUE_NOPE_RETRIES", "1"),
    ],
    ids=[
        "gateway-type",
        "gateway-unknown-queue-field",
        "worker-queue-type",
        "worker-range",
        "worker-other-queue",
        "worker-unknown-queue",
    ],
)
async def test_service_refuses_to_start_naming_the_bad_variable(
    services: Services, module: str, variable: str, value: str
) -> None:
    process = await services.start(module, **{variable: value})

    status = await process.wait(30)

    assert status == 2
    assert variable in process.output()
    assert "Traceback" not in process.output()
