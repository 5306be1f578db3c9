"""The gateway's settings, read from ``TRINITY_*`` variables at start-up."""

from __future__ import annotations

from typing import Annotated

import msgspec

from trinity_common.settings import ConnectionSettings

__all__ = ["GatewaySettings"]


class GatewaySettings(ConnectionSettings, kw_only=True, frozen=True):
    """Where the gateway listens and what it accepts."""

    gateway_host: str = "127.0.0.1"
    """Address to listen on; ``0.0.0.0`` in a container."""

    gateway_port: Annotated[int, msgspec.Meta(ge=0, le=65_535)] = 8000
    """TCP port to listen on."""

    gateway_max_upload_bytes: Annotated[int, msgspec.Meta(ge=1)] = 100 * 1024 * 1024
    """Largest dataset file accepted; a larger upload gets 413 before anything is stored."""

    gateway_max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    """Largest JSON request body accepted."""

    gateway_shutdown_delay_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0
    """On SIGTERM, how long to keep serving while readiness fails, before stopping."""

    gateway_retry_after_s: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Seconds a client is told to wait (``Retry-After``) when a dependency is down."""

    gateway_run_projector: bool = True
    """Whether this process folds status events into the job table and reaps exhausted jobs."""

    gateway_idempotency_ttl_s: Annotated[int, msgspec.Meta(ge=60)] = 86_400
    """How long an ``Idempotency-Key`` keeps returning the job it first created."""
