"""Start-up and shutdown of a worker service, the same for every queue.

A service's ``main`` names its queue and passes a handler provider: an async
context manager that builds the handler (and whatever it holds, such as a
process pool) and releases it on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING, Annotated

import msgspec
import nats.errors
import uvloop

from trinity_common import broker
from trinity_common.database import UNAVAILABLE_ERRORS, apply_migrations, create_pool, ping
from trinity_common.logs import configure_logging
from trinity_common.probes import serving_probes
from trinity_common.queues import load_all_queue_settings, load_queue_settings
from trinity_common.settings import ConnectionSettings, load_settings, settings_or_exit
from trinity_common.worker import Worker

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from contextlib import AbstractAsyncContextManager

    import asyncpg

    from trinity_common.queues import QueueSettings
    from trinity_common.worker import Handler

__all__ = ["WorkerSettings", "run_worker_service", "serve_queue"]

logger = logging.getLogger(__name__)

_UNAVAILABLE: tuple[type[Exception], ...] = (nats.errors.NoServersError, *UNAVAILABLE_ERRORS)


class WorkerSettings(ConnectionSettings, kw_only=True, frozen=True):
    """How a worker service shuts down."""

    worker_shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    """On SIGTERM, how long running jobs may go on before they are handed back."""

    worker_health_host: str = "127.0.0.1"
    """Address the liveness and readiness probes listen on; ``0.0.0.0`` in a container."""

    worker_health_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 0
    """Port of the probes (``/health/live``, ``/health/ready``); 0 serves none."""

    worker_fetch_stale_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """Readiness fails when no fetch has reached NATS for this long."""


async def serve_queue(
    *,
    service: str,
    queue_name: str,
    provide_handler: Callable[[QueueSettings], AbstractAsyncContextManager[Handler]],
    env: Mapping[str, str],
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
) -> None:
    """Run ``queue_name``'s jobs until ``stop`` is set, then shut down gracefully.

    ``started`` is set once the service is connected and about to consume.
    """
    settings = load_settings(WorkerSettings, env)
    queue = load_queue_settings(queue_name, env)
    async with contextlib.AsyncExitStack() as stack:
        nc = await broker.connect(settings, name=f"trinity-{service}")
        stack.push_async_callback(broker.close, nc)
        js = nc.jetstream(timeout=settings.nats_timeout_s)
        await broker.ensure_streams(
            js, replicas=settings.nats_replicas, max_jobs_per_queue=settings.queue_max_jobs
        )
        await broker.ensure_work_consumer(js, queue)

        pool = await create_pool(settings)
        stack.push_async_callback(pool.close)
        await apply_migrations(pool)

        handler = await stack.enter_async_context(provide_handler(queue))
        worker = Worker(
            queue=queue,
            handler=handler,
            nc=nc,
            js=js,
            pool=pool,
            shutdown_grace_s=settings.worker_shutdown_grace_s,
            publish_timeout_s=settings.nats_timeout_s,
        )
        checks = _readiness_checks(worker, pool, stale_s=settings.worker_fetch_stale_s)
        await stack.enter_async_context(
            serving_probes(
                host=settings.worker_health_host, port=settings.worker_health_port, checks=checks
            )
        )
        logger.info("service started", extra={"queue": queue.name, "consumer": queue.durable})
        if started is not None:
            started.set()
        await worker.run(stop)
    logger.info("service stopped", extra={"queue": queue.name})


def _readiness_checks(
    worker: Worker, pool: asyncpg.Pool, *, stale_s: float
) -> dict[str, Callable[[], Awaitable[str]]]:
    async def nats_check() -> str:
        silence = asyncio.get_running_loop().time() - worker.last_fetch_at
        if silence >= stale_s:
            return f"down: no fetch reached NATS for {silence:.0f} s"
        return await broker.ping(worker.nc)

    async def database_check() -> str:
        return await ping(pool)

    return {"nats": nats_check, "database": database_check}


def run_worker_service(
    *,
    service: str,
    queue_name: str,
    provide_handler: Callable[[QueueSettings], AbstractAsyncContextManager[Handler]],
    env: Mapping[str, str],
) -> None:
    """Run a worker service in this process until SIGTERM or SIGINT.

    A malformed setting ends the process at once with status 2 and one line
    naming the variable, before anything connects anywhere.
    """
    settings = settings_or_exit(f"trinity-{service}", lambda: load_settings(WorkerSettings, env))
    settings_or_exit(f"trinity-{service}", lambda: load_all_queue_settings(env))
    configure_logging(service=service, level=settings.log_level, log_format=settings.log_format)

    async def main() -> None:
        stop, started = asyncio.Event(), asyncio.Event()
        main_task = asyncio.current_task()
        assert main_task is not None  # noqa: S101 - main() always runs as a task

        def on_signal() -> None:
            # Once consuming, stop gracefully; while still starting up (waiting
            # for a dependency, say) there is nothing to finish, so stop at once.
            if started.is_set():
                stop.set()
            else:
                main_task.cancel()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        await serve_queue(
            service=service,
            queue_name=queue_name,
            provide_handler=provide_handler,
            env=env,
            stop=stop,
            started=started,
        )

    try:
        uvloop.run(main())
    except asyncio.CancelledError:
        logger.info("service stopped while starting")
    except _UNAVAILABLE as err:
        # Most often at start-up: a wrong address, or a dependency not up yet.
        # One line says which; the orchestrator restarts the process.
        logger.error("service stopped, a dependency is unavailable", extra={"error": repr(err)})  # noqa: TRY400 - the cause is the message; a traceback adds nothing
        sys.exit(1)
