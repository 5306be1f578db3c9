"""Run the gateway: ``python -m trinity_gateway`` or ``trinity-gateway``."""

from __future__ import annotations

import os

import uvicorn

from trinity_common.logs import configure_logging
from trinity_common.settings import load_settings
from trinity_gateway.app import create_app
from trinity_gateway.settings import GatewaySettings


def main() -> None:
    """Serve the HTTP API until SIGTERM, then finish requests in flight and exit."""
    settings = load_settings(GatewaySettings, os.environ)
    configure_logging(service="gateway", level=settings.log_level, log_format=settings.log_format)
    app = create_app(settings, env=os.environ)
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
