"""The gateway's SIGTERM: not ready first, requests in flight finished, exit 0."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from tests.support import eventually

if TYPE_CHECKING:
    import httpx

    from tests.conftest import Services


async def test_gateway_turns_not_ready_then_stops_cleanly_on_sigterm(services: Services) -> None:
    gateway = await services.start_gateway(TRINITY_GATEWAY_SHUTDOWN_DELAY_S="3")

    async with services.client() as client:
        gateway.signal(signal.SIGTERM)

        async def not_ready() -> httpx.Response | None:
            response = await client.get("/health/ready")
            return response if response.status_code == 503 else None

        refusing = await eventually(not_ready, timeout_s=3, what="readiness to fail")
        still_serving = await client.get("/health/live")
    exit_code = await gateway.wait(15)

    assert refusing.json()["checks"]["gateway"] == "down: shutting down"
    assert still_serving.status_code == 200, "requests are served until the delay is over"
    assert exit_code == 0
    assert "Application shutdown complete" in gateway.output(), "NATS drained, pool closed"
