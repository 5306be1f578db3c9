"""PostgreSQL for the demo, tests and benchmarks: a server to use, and fresh databases on it."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from trinity_common.devstack._cluster import CONNECT_ERRORS, LocalCluster, is_answering
from trinity_common.devstack._process import DevStackError, deadline_in

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from types import TracebackType

__all__ = ["DATABASE_URL_VARIABLE", "Database", "PostgresServer"]

logger = logging.getLogger(__name__)

DATABASE_URL_VARIABLE = "TRINITY_DATABASE_URL"
"""Names a running server to use instead of looking for or starting one."""

_LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_MAINTENANCE_DB = "postgres"
_PROBE_TIMEOUT_S = 2.0
_CONNECT_TIMEOUT_S = 10.0
_START_TIMEOUT_S = 60.0

# PostgreSQL folds unquoted names to lower case and truncates them at 63 bytes;
# 50 leaves room for the random suffix.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,49}")


class PostgresServer:
    """A PostgreSQL server: one already running, or a throwaway cluster started here.

    Attributes:
        url: The maintenance URL, on database ``postgres``.
    """

    def __init__(self, *, url: str, cluster: LocalCluster | None = None) -> None:
        """Wrap a server; use `find_or_start` or `start` to get one."""
        self.url = url
        self._cluster = cluster

    @classmethod
    async def find_or_start(cls, *, env: Mapping[str, str]) -> PostgresServer:
        """Use the server named in ``env``, else the local one, else start a cluster.

        In order: the server of ``TRINITY_DATABASE_URL`` when set; the one on
        127.0.0.1:5432 if it lets user ``postgres`` in; a throwaway cluster
        from the local PostgreSQL binaries otherwise.

        Raises:
            DevStackError: ``TRINITY_DATABASE_URL`` names a server that does not
                answer, or no cluster could be started.
        """
        named = env.get(DATABASE_URL_VARIABLE)
        if named:
            server = cls(url=_with_database(named, _MAINTENANCE_DB))
            try:
                conn = await asyncpg.connect(server.url, timeout=_CONNECT_TIMEOUT_S)
            except CONNECT_ERRORS as err:
                raise DevStackError(
                    f"the PostgreSQL server of {DATABASE_URL_VARIABLE} does not answer "
                    f"({err}); start it, fix the URL or unset the variable"
                ) from err
            await conn.close()
            logger.info("postgres server named by the environment", extra=_where(server.url))
            return server

        if await is_answering(_LOCAL_URL, timeout_s=_PROBE_TIMEOUT_S):
            logger.info("postgres server found running", extra=_where(_LOCAL_URL))
            return cls(url=_LOCAL_URL)
        return await cls.start()

    @classmethod
    async def start(
        cls, *, bindir: Path | None = None, timeout_s: float = _START_TIMEOUT_S
    ) -> PostgresServer:
        """Start a throwaway cluster on a free loopback port, whatever else is running.

        Its data live in a temporary directory that `stop` removes. As root, the
        cluster runs as OS user ``postgres``, since PostgreSQL refuses root.

        Args:
            bindir: Where ``initdb`` and ``pg_ctl`` are; by default the highest
                version under /usr/lib/postgresql, else ``pg_config --bindir``.
            timeout_s: Deadline for the cluster to accept connections, in seconds.

        Raises:
            DevStackError: No binaries, or the cluster did not start (its log is
                quoted).
        """
        started = asyncio.get_running_loop().time()
        cluster = await LocalCluster.start(bindir=bindir, deadline=deadline_in(timeout_s))
        logger.info(
            "postgres cluster started",
            extra={
                "port": cluster.port,
                "pid": cluster.pid,
                "duration_s": asyncio.get_running_loop().time() - started,
            },
        )
        return cls(url=cluster.url, cluster=cluster)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id if this started it, else None."""
        return self._cluster.pid if self._cluster is not None else None

    @property
    def data_dir(self) -> Path | None:
        """The cluster's data directory if this started it, else None."""
        return self._cluster.data_dir if self._cluster is not None else None

    async def stop(self) -> None:
        """Stop the cluster this started and remove its files; leave others running."""
        if self._cluster is None:
            return
        await self._cluster.shut_down()
        self._cluster = None

    def __repr__(self) -> str:
        where = _where(self.url)
        return f"<PostgresServer {where['host']}:{where['port']} pid={self.pid}>"

    async def __aenter__(self) -> PostgresServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


class Database:
    """A freshly created, uniquely named database, dropped by `drop`.

    Attributes:
        name: The database's name, ``<name_prefix>_<12 hex digits>``.
        url: Its connection URL.
    """

    def __init__(self, *, name: str, server: PostgresServer, owns_server: bool) -> None:
        """Wrap a database; use `create` to get one."""
        self.name = name
        self.url = _with_database(server.url, name)
        self._server = server
        self._owns_server = owns_server
        self._dropped = False

    @classmethod
    async def create(
        cls, *, server: PostgresServer | None = None, name_prefix: str = "trinity_test"
    ) -> Database:
        """Create an empty database with a name no one else uses.

        Args:
            server: Where to create it. By default the local server on port
                5432, or else a throwaway cluster that `drop` stops.
            name_prefix: Start of the name: lower-case letters, digits and
                underscores, at most 50 characters.

        Raises:
            ValueError: ``name_prefix`` is not such a name.
            DevStackError: No server could be found or started.
        """
        if not _IDENTIFIER.fullmatch(name_prefix):
            raise ValueError(
                f"name_prefix {name_prefix!r} must be 1-50 lower-case letters, digits or "
                "underscores, not starting with a digit"
            )
        owns_server = server is None
        if server is None:
            server = await PostgresServer.find_or_start(env={})

        name = f"{name_prefix}_{secrets.token_hex(6)}"
        conn = await asyncpg.connect(server.url, timeout=_CONNECT_TIMEOUT_S)
        try:
            # A validated identifier: CREATE DATABASE takes no bind parameters.
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        logger.info("database created", extra={"database": name, **_where(server.url)})
        return cls(name=name, server=server, owns_server=owns_server)

    async def drop(self) -> None:
        """Drop the database, closing any connections still open to it; idempotent."""
        if self._dropped:
            return
        conn = await asyncpg.connect(self._server.url, timeout=_CONNECT_TIMEOUT_S)
        try:
            # FORCE (PostgreSQL 13+) ends the sessions a test left open.
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()
        self._dropped = True
        logger.info("database dropped", extra={"database": self.name})
        if self._owns_server:
            await self._server.stop()

    def __repr__(self) -> str:
        return f"<Database {self.name} on {self._server!r}>"

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.drop()


def _with_database(url: str, database: str) -> str:
    """Return ``url`` with its database replaced by ``database``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _where(url: str) -> dict[str, object]:
    """Return a server's host and port for logging, leaving out any password."""
    parts = urlsplit(url)
    return {"host": parts.hostname, "port": parts.port}
