"""Liveness and readiness endpoints for worker services.

Workers serve no API, but an orchestrator still needs to ask them two things:
is the event loop alive (``/health/live``), and can the worker do its job right
now (``/health/ready``: NATS connected, PostgreSQL answering, and the fetch loop
reaching the server recently). The server shares the worker's event loop, so a
blocked loop fails liveness, which is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec
import uvicorn
from litestar import Litestar, Response, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

__all__ = ["ProbeResponse", "serving_probes"]

logger = logging.getLogger(__name__)


class ProbeResponse(msgspec.Struct, kw_only=True, frozen=True):
    """The verdict, and each check's answer (``ok`` or ``down: why``)."""

    status: str
    checks: dict[str, str]


def _probe_app(checks: dict[str, Callable[[], Awaitable[str]]]) -> Litestar:
    @get("/health/live")
    async def get_live() -> ProbeResponse:
        return ProbeResponse(status="ok", checks={})

    @get("/health/ready")
    async def get_ready() -> Response[ProbeResponse]:
        answers = {name: await check() for name, check in checks.items()}
        ok = all(answer == "ok" for answer in answers.values())
        return Response(
            ProbeResponse(status="ok" if ok else "unavailable", checks=answers),
            status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE,
        )

    return Litestar(route_handlers=[get_live, get_ready], logging_config=None, openapi_config=None)


class _QuietServer(uvicorn.Server):
    # The service owns SIGTERM; this server stops when the service tells it to.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving_probes(
    *, host: str, port: int, checks: dict[str, Callable[[], Awaitable[str]]]
) -> AsyncIterator[None]:
    """Serve the probes on ``host:port`` for the duration of the block; port 0 serves none."""
    if port == 0:
        yield
        return
    config = uvicorn.Config(
        _probe_app(checks), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(), name="probes")
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=5)
