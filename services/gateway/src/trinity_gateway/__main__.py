"""Run the gateway: ``python -m trinity_gateway`` or ``trinity-gateway``."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import TYPE_CHECKING

import uvicorn

from trinity_common.logs import configure_logging
from trinity_common.settings import load_settings, settings_or_exit
from trinity_gateway.app import create_app
from trinity_gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from types import FrameType

    from litestar import Litestar


class _Server(uvicorn.Server):
    """Turns not-ready first on SIGTERM, then stops like uvicorn does.

    Between the two, for ``gateway_shutdown_delay_s``, requests are still
    served while load balancers see readiness fail and stop sending new ones;
    uvicorn then finishes the requests in flight and the app drains NATS.
    """

    def __init__(self, config: uvicorn.Config, *, app: Litestar, delay_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._delay_s = delay_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._app.state.shutting_down or self._delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        self._app.state.shutting_down = True
        asyncio.get_running_loop().call_later(self._delay_s, super().handle_exit, sig, frame)


def main() -> None:
    """Serve the HTTP API until SIGTERM, then finish requests in flight and exit 0."""
    settings = settings_or_exit(
        "trinity-gateway", lambda: load_settings(GatewaySettings, os.environ)
    )
    app = settings_or_exit("trinity-gateway", lambda: create_app(settings, env=os.environ))
    configure_logging(service="gateway", level=settings.log_level, log_format=settings.log_format)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = _Server(config, app=app, delay_s=settings.gateway_shutdown_delay_s)
    # uvicorn re-raises the signal that stopped it once it has shut down; by
    # then the shutdown was graceful, so the process ends with status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    server.run()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
