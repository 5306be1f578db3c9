"""Liveness and readiness: distinct questions with distinct answers.

Live means the event loop answers; an orchestrator restarts the process if not.
Ready means NATS and PostgreSQL answer and the gateway is not shutting down; an
orchestrator stops sending traffic if not, and resumes once they do.
"""

from __future__ import annotations

import asyncio

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from trinity_common import broker, database
from trinity_gateway.schemas import HealthResponse

__all__ = ["HealthController"]


async def _checks(state: State) -> dict[str, str]:
    nats_state, database_state = await asyncio.gather(
        broker.ping(state.nc), database.ping(state.pool)
    )
    checks = {"nats": nats_state, "database": database_state}
    if state.shutting_down:
        checks["gateway"] = "down: shutting down"
    for task in state.background:
        if task.done():
            checks[task.get_name()] = "down: stopped"
    return checks


def _answer(checks: dict[str, str]) -> Response[HealthResponse]:
    ok = all(value == "ok" for value in checks.values())
    return Response(
        HealthResponse(status="ok" if ok else "unavailable", checks=checks),
        status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
    )


_DOWN = {503: ResponseSpec(HealthResponse, description="a dependency is down")}


class HealthController(Controller):
    """Probes for orchestrators and people."""

    path = "/health"
    tags = ["health"]  # noqa: RUF012 - Litestar reads it as a class attribute

    @get("/live")
    async def get_live(self) -> HealthResponse:
        """Answer 200 while the event loop runs."""
        return HealthResponse(status="ok", checks={})

    @get("/ready", responses=_DOWN)
    async def get_ready(self, state: State) -> Response[HealthResponse]:
        """Answer 200 when NATS and PostgreSQL answer, else 503 naming what is down."""
        return _answer(await _checks(state))

    @get("/", responses=_DOWN)
    async def get_health(self, state: State) -> Response[HealthResponse]:
        """Report each dependency; the same verdict as readiness."""
        return _answer(await _checks(state))
