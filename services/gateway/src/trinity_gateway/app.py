"""The gateway application: routes, dependencies and their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin

from trinity_common import broker
from trinity_common.database import apply_migrations, create_pool
from trinity_common.queues import load_all_queue_settings
from trinity_common.reaper import ExhaustedJobReaper
from trinity_common.status import StatusProjector
from trinity_gateway.analyses import AnalysisController
from trinity_gateway.datasets import DatasetController
from trinity_gateway.health import HealthController
from trinity_gateway.jobs import JobController
from trinity_gateway.problems import exception_handlers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Mapping

    from trinity_gateway.settings import GatewaySettings

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

# Multipart framing around the file itself: boundaries, part headers, fields.
_MULTIPART_SLACK_BYTES = 64 * 1024


def create_app(settings: GatewaySettings, *, env: Mapping[str, str]) -> Litestar:
    """Build the gateway for ``settings``; queue overrides are read from ``env``."""
    queues = load_all_queue_settings(env)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            nc = await broker.connect(settings, name="trinity-gateway")
            stack.push_async_callback(broker.close, nc)
            js = nc.jetstream(timeout=settings.nats_timeout_s)
            await broker.ensure_streams(
                js, replicas=settings.nats_replicas, max_jobs_per_queue=settings.queue_max_jobs
            )
            pool = await create_pool(settings)
            stack.push_async_callback(pool.close)
            await apply_migrations(pool)
            app.state.update(nc=nc, js=js, pool=pool, queues=queues, shutting_down=False)
            if settings.gateway_run_projector:
                await broker.ensure_status_consumer(js)
                projector = StatusProjector(js=js, pool=pool)
                reaper = ExhaustedJobReaper(
                    js=js, pool=pool, publish_timeout_s=settings.nats_timeout_s
                )
                loops = {"status-projector": projector.run, "reaper": reaper.run}
                await stack.enter_async_context(_running(loops, app.state.background))
            logger.info("gateway started", extra={"port": settings.gateway_port})
            try:
                yield
            finally:
                app.state.shutting_down = True

    return Litestar(
        route_handlers=[JobController, AnalysisController, DatasetController, HealthController],
        lifespan=[lifespan],
        state=_initial_state(settings),
        exception_handlers=exception_handlers,
        # Logging is configured once per process by trinity_common.logs.
        logging_config=None,
        request_max_body_size=settings.gateway_max_upload_bytes + _MULTIPART_SLACK_BYTES,
        openapi_config=OpenAPIConfig(
            title="Trinity",
            version="0.1.0",
            description="Submit heavy work, get a job id at once, follow it to the end.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin()],
        ),
    )


def _initial_state(settings: GatewaySettings) -> State:
    return State({"settings": settings, "shutting_down": True, "background": []})


@contextlib.asynccontextmanager
async def _running(
    loops: Mapping[str, Callable[[asyncio.Event], Coroutine[Any, Any, None]]],
    tasks: list[asyncio.Task[None]],
) -> AsyncIterator[None]:
    """Run background loops for the life of the app, and stop them together on the way out."""
    stop = asyncio.Event()
    for name, loop in loops.items():
        task = asyncio.create_task(loop(stop), name=name)
        task.add_done_callback(_report_end)
        tasks.append(task)
    try:
        yield
    finally:
        stop.set()
        # A loop notices `stop` between fetches; one still waiting on a fetch is
        # cancelled, which leaves its messages unacked for redelivery, not lost.
        _, pending = await asyncio.wait(tasks, timeout=0.2)
        for task in pending:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)


def _report_end(task: asyncio.Task[None]) -> None:
    # A loop that dies takes readiness with it (see health), so an orchestrator
    # restarts the process rather than leave statuses unprojected.
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "background loop stopped", extra={"task": task.get_name()}, exc_info=task.exception()
        )
