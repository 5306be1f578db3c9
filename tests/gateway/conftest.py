"""The gateway in this process, with a dataset to submit and a NATS client beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import nats
import pytest
from litestar.testing import AsyncTestClient

from trinity_common.settings import load_settings
from trinity_gateway.app import create_app
from trinity_gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from litestar import Litestar
    from nats.aio.client import Client
    from nats.js import JetStreamContext

    from trinity_common.devstack import NatsServer

CSV = b"city,temp\nOslo,3.5\nRome,17.25\n"


@pytest.fixture
def env(service_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    """The gateway's environment; parametrize ``env`` indirectly to add variables."""
    extra: dict[str, str] = getattr(request, "param", {})
    return {**service_env, "TRINITY_GATEWAY_MAX_UPLOAD_BYTES": "4096", **extra}


@pytest.fixture
async def client(env: dict[str, str]) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(load_settings(GatewaySettings, env), env=env)
    async with AsyncTestClient(app) as test_client:
        yield test_client


@pytest.fixture
async def dataset_id(client: AsyncTestClient[Litestar]) -> str:
    """The id of a small CSV uploaded through the API."""
    response = await client.post("/api/upload", files={"data": ("temps.csv", CSV)})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return str(body["dataset_id"])


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A connection of the test's own, for what a worker or an operator would do."""
    connection = await nats.connect(nats_server.url, name="trinity-test", connect_timeout=5)
    yield connection
    await connection.drain()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream(timeout=5.0)
