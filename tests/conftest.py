"""Real servers for the whole suite: NATS and PostgreSQL, owned by the run.

PostgreSQL is found or started once per run (``TRINITY_DATABASE_URL`` may name
one); every test gets a fresh database on it and its own nats-server with an
empty store, so no test sees another's streams or rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from trinity_common.devstack import Database, NatsServer, PostgresServer, free_port
from trinity_common.devstack.services import ServiceProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CASES = Path(__file__).resolve().parent / "cases"


@pytest.fixture(scope="session")
def cases_dir() -> Path:
    """The input files of the failure cases Trinity must survive, kept with the tests."""
    return CASES


@pytest.fixture(scope="session")
async def postgres_server() -> AsyncIterator[PostgresServer]:
    server = await PostgresServer.find_or_start(env=os.environ)
    yield server
    await server.stop()


@pytest.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[Database]:
    db = await Database.create(server=postgres_server)
    yield db
    await db.drop()


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    server = await NatsServer.start()
    yield server
    await server.close()


@pytest.fixture
def service_env(nats_server: NatsServer, database: Database) -> dict[str, str]:
    """The environment a Trinity service of this test runs with."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "TRINITY_NATS_URL": nats_server.url,
        "TRINITY_DATABASE_URL": database.url,
        "TRINITY_LOG_FORMAT": "json",
        "TRINITY_LOG_LEVEL": "DEBUG",
    }


@dataclass
class Services:
    """Trinity processes a test started; all are stopped when it ends."""

    env: dict[str, str]
    logs: Path
    processes: list[ServiceProcess] = field(default_factory=list)
    gateway_url: str = ""

    async def start(self, module: str, **env: str) -> ServiceProcess:
        name = f"{module}-{len(self.processes)}.log"
        process = await ServiceProcess.start(
            module, env={**self.env, **env}, log_path=self.logs / name
        )
        self.processes.append(process)
        return process

    async def start_gateway(self, **env: str) -> ServiceProcess:
        port = free_port()
        process = await self.start("trinity_gateway", TRINITY_GATEWAY_PORT=str(port), **env)
        self.gateway_url = f"http://127.0.0.1:{port}"
        await process.wait_ready(port, timeout_s=30)
        return process

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.gateway_url, timeout=10.0)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.module} ({p.pid})\n{p.output()}" for p in self.processes)


@pytest.fixture
async def services(
    service_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Services]:
    running = Services(env=service_env, logs=tmp_path)
    yield running
    for process in reversed(running.processes):
        await process.stop(grace_s=15)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(running.dump_logs())  # noqa: T201 - shown by pytest for a failed test only


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
