"""PostgreSQL access: the connection pool and versioned schema migrations.

Migrations are the numbered ``migrations/NNNN_*.sql`` files of this package,
applied in order at start-up. A transaction-scoped advisory lock serialises
them, so any number of replicas may start at once: the first applies what is
missing, the others find nothing left to do.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

if TYPE_CHECKING:
    from typing import TypeAlias

    from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

    from trinity_common.settings import ConnectionSettings

__all__ = ["UNAVAILABLE_ERRORS", "apply_migrations", "create_pool", "ping"]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    """A connection, whether held directly or borrowed from a pool."""

UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # statement timeout, shutdown, not accepting yet
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
)
"""What a database that is down, slow, paused or overloaded raises.

Worth waiting out and retrying. Any other database error is about the statement
or its data, and retrying it would only repeat it.
"""


async def ping(pool: asyncpg.Pool, *, timeout_s: float = 1.0) -> str:
    """Answer ``"ok"`` if the database runs a trivial query in time, else why not.

    For readiness probes: whatever goes wrong means "not ready", and the reason
    names only the error's type, never connection details. The answer comes in
    ``timeout_s`` even from a server that stopped answering: the abandoned query
    cleans up after itself in the background, which can take several seconds.
    """
    query = asyncio.ensure_future(pool.fetchval("SELECT 1"))
    try:
        done, _ = await asyncio.wait({query}, timeout=timeout_s)
    except asyncio.CancelledError:
        query.cancel()
        raise
    if not done:
        query.cancel()
        query.add_done_callback(_forget)
        return "down: TimeoutError"
    if (err := query.exception()) is not None:
        return f"down: {type(err).__name__}"
    return "ok"


def _forget(task: asyncio.Future[Any]) -> None:
    # Retrieve the outcome of an abandoned query, so it is not reported as lost.
    if not task.cancelled():
        task.exception()


# An arbitrary constant: the key of the advisory lock migrations hold.
_MIGRATION_LOCK = 0x7472696E


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: msgspec.json.encode(value).decode(),
        decoder=msgspec.json.decode,
        schema="pg_catalog",
    )


class _BoundedPool(asyncpg.Pool):
    """A pool whose every borrow of a connection gives up after ``acquire_timeout_s``.

    asyncpg bounds a query, and the opening of a connection, but its shortcut
    methods (``pool.fetchrow`` and friends) wait for a free connection forever.
    With the database paused, requests would queue behind the pool for the whole
    outage instead of failing fast; with this bound they raise TimeoutError.
    """

    def __init__(self, *args: Any, acquire_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout_s = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[Any]:
        return super().acquire(timeout=self._acquire_timeout_s if timeout is None else timeout)


async def create_pool(settings: ConnectionSettings) -> asyncpg.Pool:
    """Open a pool sized and timed by ``settings``, with jsonb mapped to Python values.

    A query that outlasts ``database_timeout_s`` is cancelled by the server, and
    waiting that long for a free connection gives up too, so a slow or paused
    database makes requests fail fast instead of piling up.
    """
    timeout_ms = int(settings.database_timeout_s * 1000)
    pool = _BoundedPool(
        settings.database_url,
        acquire_timeout_s=settings.database_timeout_s,
        # The keywords asyncpg.create_pool fills in, with its defaults.
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        min_size=1,
        max_size=settings.database_pool_max,
        timeout=settings.database_timeout_s,
        command_timeout=settings.database_timeout_s,
        init=_init_connection,
        server_settings={
            "statement_timeout": str(timeout_ms),
            "idle_in_transaction_session_timeout": str(timeout_ms * 2),
            "application_name": "trinity",
        },
    )
    return await pool


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("trinity_common") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def apply_migrations(pool: asyncpg.Pool) -> list[str]:
    """Apply every migration not yet applied; return the names of those applied."""
    applied: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in _migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(name)
    if applied:
        logger.info("migrations applied", extra={"migrations": applied})
    return applied
