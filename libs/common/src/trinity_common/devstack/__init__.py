"""Throwaway servers for the demo, tests and benchmarks: NATS and PostgreSQL.

`dev_stack` is the one-stop entry point: a JetStream-enabled nats-server in a
temporary directory, a PostgreSQL server (the one ``TRINITY_DATABASE_URL``
names, the local one on port 5432, or a throwaway cluster), and a fresh
database on it, all torn down in reverse order on exit::

    async with dev_stack(env=os.environ) as stack:
        nc = await nats.connect(stack.nats.url)
        conn = await asyncpg.connect(stack.database.url)

Every wait is bounded; a server that does not come up in time raises
`DevStackError` quoting the end of its log. Nothing here reads ``os.environ``:
the caller passes the environment in.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trinity_common.devstack._process import DevStackError, free_port
from trinity_common.devstack.nats import NatsServer
from trinity_common.devstack.postgres import Database, PostgresServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

__all__ = [
    "Database",
    "DevStack",
    "DevStackError",
    "NatsServer",
    "PostgresServer",
    "dev_stack",
    "free_port",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DevStack:
    """The servers `dev_stack` runs, ready to connect to."""

    nats: NatsServer
    """A JetStream-enabled nats-server of this process's own."""

    postgres: PostgresServer
    """The PostgreSQL server the database is on."""

    database: Database
    """A fresh, empty database, dropped on exit."""


@contextlib.asynccontextmanager
async def dev_stack(*, env: Mapping[str, str]) -> AsyncIterator[DevStack]:
    """Run NATS and PostgreSQL with a fresh database for the duration of the block.

    Args:
        env: The environment, such as ``os.environ``; only
            ``TRINITY_DATABASE_URL`` is read, to pick the PostgreSQL server.

    Raises:
        DevStackError: A server could not be found or started.
    """
    async with contextlib.AsyncExitStack() as stack:
        nats_server = await NatsServer.start()
        stack.push_async_callback(nats_server.close)
        postgres = await PostgresServer.find_or_start(env=env)
        stack.push_async_callback(postgres.stop)
        database = await Database.create(server=postgres)
        stack.push_async_callback(database.drop)

        logger.info(
            "dev stack ready",
            extra={"nats_port": nats_server.port, "database": database.name},
        )
        yield DevStack(nats=nats_server, postgres=postgres, database=database)
