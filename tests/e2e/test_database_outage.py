"""D7: PostgreSQL paused while jobs run and status requests arrive.

The module starts a PostgreSQL cluster of its own, because it freezes every
process of that cluster with SIGSTOP; the suite's shared server, and the
machine's, are never touched. The outage is played once (the ``outage``
fixture) and each test asserts one thing it must show, so a request that hangs
does not hide whether the jobs still completed, or the reverse.

Scaled down from the case: the pause lasts 8 s instead of 30, the database
timeout is 2 s, and jobs sleep 1.5 s each on the sleeper (`tests.e2e.sleeper`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest

from tests.conftest import Services
from tests.e2e.plans import plan_job, submit
from tests.e2e.sleeper import SLEEPER_TABLES
from tests.support import TERMINAL, eventually
from trinity_common.devstack import Database, NatsServer, PostgresServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trinity_common.devstack.services import ServiceProcess

pytestmark = pytest.mark.slow

SLEEPER = "tests.e2e.sleeper"

DATABASE_TIMEOUT_S = 2.0
POOL_MAX = 5
PAUSE_S = 8.0
JOBS = 6
JOB_SLEEP_S = 1.5
REQUESTS = 200
CONCURRENCY = 20
REQUESTS_AFTER = 20

# Half the requests are abandoned by their client this soon after they are sent.
CLIENT_GIVES_UP_S = 0.3

# `ConnectionSettings.database_timeout_s` is documented as the longest "a query,
# or the wait for a pooled connection" may take, and a status request fails at
# its first query while the database is paused: two timeouts, plus 1 s for HTTP.
ANSWER_DEADLINE_S = 2 * DATABASE_TIMEOUT_S + 1.0

# Every request of the storm has a slot and a deadline; this bounds them all.
STORM_DEADLINE_S = 60.0
JOBS_DEADLINE_S = 60.0
STARTUP_TIMEOUT_S = 30.0

# Ack wait is timeout + margin = 12 s, shorter than the pause: a worker holding a
# job through it must keep the job's ack deadline away, and spend none of its attempts.
SERVICE_ENV = {
    "TRINITY_DATABASE_TIMEOUT_S": f"{DATABASE_TIMEOUT_S:g}",
    "TRINITY_DATABASE_POOL_MAX": str(POOL_MAX),
    "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "10",
    "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "2",
    "TRINITY_QUEUE_ANALYSIS_CONCURRENCY": "2",
    "TRINITY_QUEUE_ANALYSIS_BACKOFF_BASE_S": "0.5",
}

# Trinity's pools name themselves so; the test's own pool does not.
TRINITY_APPLICATION = "trinity"

UNAVAILABLE_DETAIL = "database unavailable; retry later"


@dataclass(frozen=True, kw_only=True)
class Answer:
    """How one status request of the storm ended."""

    job_id: str
    client_gives_up: bool
    sent_while_paused: bool
    answered_while_paused: bool = False
    outcome: str  # "answered", "abandoned", "no answer", or a transport error's name
    status: int | None = None
    detail: str = ""
    elapsed_s: float = 0.0  # for failure messages only; never asserted


@dataclass(frozen=True, kw_only=True)
class Session:
    """One connection to the job database, as pg_stat_activity saw it."""

    owner: str  # the service process whose socket it is, or "unknown"
    state: str | None
    application_name: str
    query: str


@dataclass(kw_only=True)
class Outage:
    """What was observed during and after the pause."""

    answers: list[Answer]
    answers_after: list[Answer]
    jobs: dict[str, dict[str, Any]]
    results: list[asyncpg.Record]
    sessions: list[Session]
    log_paths: list[Path] = field(default_factory=list)

    def logs(self) -> str:
        """Where the services' logs are, for a failure message."""
        return "service logs: " + ", ".join(str(path) for path in self.log_paths)


class Pause:
    """Whether the cluster is paused right now, read by requests as they go."""

    def __init__(self) -> None:
        self.active = False


@pytest.fixture(scope="module")
async def outage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outage]:
    """Run the gateway and a sleeper on a cluster of their own, pause it, and record it all."""
    async with contextlib.AsyncExitStack() as stack:
        postgres = await PostgresServer.start()
        stack.push_async_callback(postgres.stop)
        database = await Database.create(server=postgres, name_prefix="trinity_outage")
        stack.push_async_callback(database.drop)
        nats_server = await NatsServer.start()
        stack.push_async_callback(nats_server.close)

        db = await asyncpg.create_pool(
            database.url, min_size=1, max_size=2, server_settings={"application_name": "test"}
        )
        stack.push_async_callback(db.close)
        await db.execute(SLEEPER_TABLES)
        services = Services(
            env=_service_env(nats_server.url, database.url),
            logs=tmp_path_factory.mktemp("outage"),
        )
        stack.push_async_callback(_stop_all, services)

        yield await _play_outage(services, db, postgres, database.name)


def _service_env(nats_url: str, database_url: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "TRINITY_NATS_URL": nats_url,
        "TRINITY_DATABASE_URL": database_url,
        "TRINITY_LOG_FORMAT": "json",
        "TRINITY_LOG_LEVEL": "DEBUG",
        **SERVICE_ENV,
    }


async def _stop_all(services: Services) -> None:
    for process in reversed(services.processes):
        await process.stop(grace_s=15)


async def _play_outage(
    services: Services, db: asyncpg.Pool, postgres: PostgresServer, database: str
) -> Outage:
    await services.start_gateway()
    await start_sleeper(services)
    async with services.client() as client:
        job_ids = [
            await submit(client, await plan_job(db, sleep_s=JOB_SLEEP_S)) for _ in range(JOBS)
        ]
        await wait_for_a_run(db)

        answers = await storm_through_pause(services.gateway_url, job_ids, postgres)
        answers_after = await storm(
            services.gateway_url, job_ids, count=REQUESTS_AFTER, pause=Pause(), give_up=False
        )
        jobs = await final_documents(client, job_ids)

    return Outage(
        answers=answers,
        answers_after=answers_after,
        jobs=jobs,
        results=await db.fetch(
            "SELECT job_id, (summary->>'attempt')::int AS attempt FROM job_results"
        ),
        sessions=await sessions_of(db, database, services.processes, port_of(postgres)),
        log_paths=[process.log_path for process in services.processes],
    )


async def start_sleeper(services: Services) -> ServiceProcess:
    """Start a sleeper and return once it consumes the analysis queue."""
    process = await services.start(SLEEPER)

    async def consuming() -> bool | None:
        if process.returncode is not None:
            raise AssertionError(f"sleeper exited with {process.returncode}:\n{process.output()}")
        return '"event":"service started"' in process.output() or None

    await eventually(consuming, timeout_s=STARTUP_TIMEOUT_S, what="the sleeper to consume")
    return process


async def wait_for_a_run(db: asyncpg.Pool) -> None:
    """Return once the sleeper is in the middle of a job."""

    async def running() -> bool | None:
        found: bool | None = await db.fetchval(
            "SELECT true FROM sleeper_runs WHERE outcome IS NULL LIMIT 1"
        )
        return found

    await eventually(running, timeout_s=STARTUP_TIMEOUT_S, what="a job to be running")


async def storm_through_pause(
    gateway_url: str, job_ids: list[str], postgres: PostgresServer
) -> list[Answer]:
    """Send the status requests while the cluster is paused for up to ``PAUSE_S``.

    The cluster resumes once the pause is over, even if requests are still being
    sent; those that went out while it was paused are marked so.
    """
    assert postgres.pid is not None, "the test must own the cluster it pauses"
    pause = Pause()
    async with paused(postgres.pid):
        pause.active = True
        requests = asyncio.ensure_future(
            storm(gateway_url, job_ids, count=REQUESTS, pause=pause, give_up=True)
        )
        # The pause lasts PAUSE_S, or less if every request is answered sooner.
        await asyncio.wait({requests}, timeout=PAUSE_S)
        pause.active = False
    async with asyncio.timeout(STORM_DEADLINE_S):
        return await requests


async def storm(
    gateway_url: str, job_ids: list[str], *, count: int, pause: Pause, give_up: bool
) -> list[Answer]:
    """Send ``count`` status requests, ``CONCURRENCY`` at a time.

    With ``give_up``, every other request is abandoned by its client early.
    """
    slots = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    # httpx's own timeout is longer than every deadline here, so hangs show as such.
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60.0, limits=limits) as client:

        async def ask(index: int) -> Answer:
            async with slots:
                job_id = job_ids[index % len(job_ids)]
                return await ask_status(
                    client, job_id, pause=pause, gives_up=give_up and index % 2 == 1
                )

        return await asyncio.gather(*(ask(index) for index in range(count)))


async def ask_status(
    client: httpx.AsyncClient, job_id: str, *, pause: Pause, gives_up: bool
) -> Answer:
    """Ask for a job's status within a deadline, or give up early as a hasty client does."""
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    sent = Answer(
        job_id=job_id, client_gives_up=gives_up, sent_while_paused=pause.active, outcome=""
    )
    try:
        async with asyncio.timeout(CLIENT_GIVES_UP_S if gives_up else ANSWER_DEADLINE_S):
            response = await client.get(f"/api/jobs/{job_id}")
    except TimeoutError:
        outcome = "abandoned" if gives_up else "no answer"
        return replace(sent, outcome=outcome, elapsed_s=loop.time() - sent_at)
    except httpx.TransportError as err:
        return replace(sent, outcome=type(err).__name__, elapsed_s=loop.time() - sent_at)
    return replace(
        sent,
        answered_while_paused=pause.active,
        outcome="answered",
        status=response.status_code,
        detail=response.json().get("detail", "") if response.status_code != 200 else "",
        elapsed_s=loop.time() - sent_at,
    )


async def final_documents(
    client: httpx.AsyncClient, job_ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Wait for every job to end, all against one deadline; return the last documents seen."""
    documents: dict[str, dict[str, Any]] = {}

    async def all_ended() -> bool | None:
        for job_id in job_ids:
            response = await client.get(f"/api/jobs/{job_id}")
            if response.status_code == 200:
                documents[job_id] = response.json()
        ended = [doc for doc in documents.values() if doc["state"] in TERMINAL]
        return len(ended) == len(job_ids) or None

    # A job that never ends shows in its test as its last state, not as a timeout here.
    with contextlib.suppress(AssertionError):
        await eventually(all_ended, timeout_s=JOBS_DEADLINE_S, what="every job to end")
    return documents


@contextlib.asynccontextmanager
async def paused(postmaster: int) -> AsyncIterator[list[int]]:
    """Stop the postmaster and all its children with SIGSTOP; continue them all on exit.

    The postmaster is stopped first, so it cannot start a backend that escapes
    the pause. Only the postmaster given and processes whose parent it is are
    ever signalled.
    """
    stopped: list[int] = []
    try:
        os.kill(postmaster, signal.SIGSTOP)
        stopped.append(postmaster)
        for child in children_of(postmaster):
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(child, signal.SIGSTOP)
                stopped.append(child)
        await wait_stopped(stopped)
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def children_of(parent: int) -> list[int]:
    """Return the pids of ``parent``'s children, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _stat_fields(stat: Path) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name: state, ppid, ..."""
    try:
        text = stat.read_text(encoding="ascii", errors="replace")
    except OSError:  # the process exited meanwhile
        return None
    return text.rpartition(")")[2].split()


async def wait_stopped(pids: list[int]) -> None:
    """Return once every process in ``pids`` is stopped."""

    async def all_stopped() -> bool | None:
        states = [_stat_fields(Path(f"/proc/{pid}/stat")) for pid in pids]
        return all(fields is None or fields[0] == "T" for fields in states) or None

    await eventually(all_stopped, timeout_s=5, what="the cluster to stop", every_s=0.01)


def port_of(postgres: PostgresServer) -> int:
    """Return the TCP port of a cluster the test started."""
    port = httpx.URL(postgres.url).port
    assert port is not None
    return port


async def sessions_of(
    db: asyncpg.Pool, database: str, processes: list[ServiceProcess], server_port: int
) -> list[Session]:
    """Return the database's client sessions, each attributed to the process it serves."""
    owners = {
        port: f"{process.module} ({process.pid})"
        for process in processes
        for port in client_ports(process.pid, server_port)
    }
    rows = await db.fetch(
        "SELECT client_port, state, application_name, query FROM pg_stat_activity"
        " WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        database,
    )
    return [
        Session(
            owner=owners.get(row["client_port"], "unknown"),
            state=row["state"],
            application_name=row["application_name"],
            query=row["query"],
        )
        for row in rows
    ]


def client_ports(pid: int, server_port: int) -> set[int]:
    """Return the local ports of process ``pid``'s TCP connections to ``server_port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text(encoding="ascii").splitlines()[1:]:
            local, remote, inode = (line.split()[i] for i in (1, 2, 9))
            if inode in inodes and int(remote.rpartition(":")[2], 16) == server_port:
                ports.add(int(local.rpartition(":")[2], 16))
    return ports


def describe(answers: list[Answer]) -> str:
    """Summarise answers for a failure message: how each ended, and the slowest."""
    counts = Counter((a.outcome, a.status, a.detail) for a in answers)
    slowest = max((a.elapsed_s for a in answers), default=0.0)
    return f"{len(answers)} answers: {dict(counts)}; slowest {slowest:.2f} s"


async def test_status_requests_never_hang_while_database_paused(outage: Outage) -> None:
    """Every request the client waits for ends within the deadline, abandoned ones or not."""
    waited_for = [a for a in outage.answers if not a.client_gives_up]

    hung = [a for a in waited_for if a.outcome != "answered"]

    assert len(waited_for) == REQUESTS // 2
    assert hung == [], f"{describe(waited_for)}\n{outage.logs()}"


async def test_status_requests_answer_503_while_database_paused(outage: Outage) -> None:
    """An answer given while the database is paused is a 503 saying so; none is a 500."""
    answered = [a for a in outage.answers if a.outcome == "answered"]
    in_pause = [a for a in answered if a.sent_while_paused and a.answered_while_paused]

    unexpected = [
        a
        for a in answered
        if (a.status, a.detail) not in {(200, ""), (503, UNAVAILABLE_DETAIL)}
        or (a.sent_while_paused and a.answered_while_paused and a.status != 503)
    ]

    assert in_pause, f"no request was answered during the pause: {describe(answered)}"
    assert unexpected == [], f"{describe(unexpected)}\n{outage.logs()}"


async def test_status_requests_succeed_after_database_resumes(outage: Outage) -> None:
    failed = [a for a in outage.answers_after if a.status != 200]

    assert len(outage.answers_after) == REQUESTS_AFTER
    assert failed == [], f"{describe(failed)}\n{outage.logs()}"


async def test_every_job_succeeds_after_database_resumes(outage: Outage) -> None:
    states = {job_id: doc["state"] for job_id, doc in outage.jobs.items()}

    assert len(states) == JOBS
    assert set(states.values()) == {"succeeded"}, f"{states}\n{outage.logs()}"


async def test_every_job_has_one_result_of_its_reported_attempt_after_database_pause(
    outage: Outage,
) -> None:
    """No result is lost or written twice: one row per job, from the attempt that succeeded."""
    rows = Counter(row["job_id"] for row in outage.results)
    stored_attempt = {row["job_id"]: row["attempt"] for row in outage.results}
    reported_attempt = {job_id: doc["attempt"] for job_id, doc in outage.jobs.items()}

    assert rows == dict.fromkeys(outage.jobs, 1)
    assert stored_attempt == reported_attempt


async def test_each_process_holds_at_most_its_pool_size_after_database_pause(
    outage: Outage,
) -> None:
    per_owner = Counter(
        s.owner for s in outage.sessions if s.application_name == TRINITY_APPLICATION
    )

    assert "unknown" not in per_owner, outage.sessions
    assert len(per_owner) == 2, per_owner  # the gateway and the sleeper both reconnected
    assert max(per_owner.values()) <= POOL_MAX, per_owner


async def test_no_connection_stays_idle_in_transaction_after_database_pause(
    outage: Outage,
) -> None:
    idle_in_transaction = [
        s for s in outage.sessions if (s.state or "").startswith("idle in transaction")
    ]

    assert idle_in_transaction == []
