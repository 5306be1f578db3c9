"""Starting sleepers, planning their jobs and reading what became of them, for the e2e tests."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from trinity_common.devstack import free_port

if TYPE_CHECKING:
    import asyncpg
    import httpx

    from tests.conftest import Services
    from trinity_common.devstack.services import ServiceProcess

SLEEPER = "tests.e2e.sleeper"
"""The module a sleeper service runs as."""

STARTUP_TIMEOUT_S = 30.0
"""Long enough for a sleeper to connect, migrate, bind its consumer and fetch."""


async def start_sleepers(services: Services, count: int, **env: str) -> list[ServiceProcess]:
    """Start ``count`` sleepers side by side and return once all consume the queue.

    A worker is ready once a fetch of its own has reached NATS, so waiting for
    readiness is waiting for it to consume.
    """
    ports = [free_port() for _ in range(count)]
    processes = [
        await services.start(SLEEPER, TRINITY_WORKER_HEALTH_PORT=str(port), **env) for port in ports
    ]
    for process, port in zip(processes, ports, strict=True):
        await process.wait_ready(port, timeout_s=STARTUP_TIMEOUT_S)
    return processes


async def start_sleeper(services: Services, **env: str) -> ServiceProcess:
    """Start a sleeper and return once it consumes the analysis queue."""
    (process,) = await start_sleepers(services, 1, **env)
    return process


async def plan_job(db: asyncpg.Pool, *, sleep_s: float, fail_first: int = 0) -> str:
    """Add a dataset the gateway accepts and the sleeper's plan for it; return its id.

    The ``datasets`` table is Trinity's, so a service must have migrated first.
    """
    dataset_id = secrets.token_hex(16)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO datasets (dataset_id, name, size_bytes, sha256, content_type)"
            " VALUES ($1, 'planned.csv', 0, $2, 'text/csv')",
            dataset_id,
            "0" * 64,
        )
        await conn.execute(
            "INSERT INTO sleeper_plans (dataset_id, sleep_s, fail_first) VALUES ($1, $2, $3)",
            dataset_id,
            sleep_s,
            fail_first,
        )
    return dataset_id


async def submit(client: httpx.AsyncClient, dataset_id: str) -> str:
    """Submit an analysis of ``dataset_id``, expect 202, and return the job id."""
    response = await client.post("/api/analysis", json={"dataset_id": dataset_id})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def result_counts(db: asyncpg.Pool) -> dict[str, int]:
    """Return how many ``job_results`` rows each job has."""
    rows = await db.fetch("SELECT job_id, count(*) AS n FROM job_results GROUP BY job_id")
    return {row["job_id"]: row["n"] for row in rows}
