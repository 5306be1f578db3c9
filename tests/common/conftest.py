"""Trinity's runtime on real servers, shared by the worker and status tests.

`platform` gives each test what a Trinity deployment has before any service
starts: the streams and consumers, a migrated database, and the status
projector running in the background. A test adds workers with the handler it
needs, and the exhausted-job reaper if it needs one, submits jobs, and reads the
outcome from the tables and streams.

Every background task is stopped and awaited when the test ends. One that
stopped on its own with an exception fails the test: at the next wait, or at
teardown if the test had no wait left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import nats
import pytest
from nats.js.client import JetStreamContext

from tests.support import eventually
from trinity_common import broker, names
from trinity_common.database import apply_migrations, create_pool
from trinity_common.deadletter import DeadLetter
from trinity_common.queues import QueueSettings
from trinity_common.reaper import ExhaustedJobReaper
from trinity_common.settings import ConnectionSettings
from trinity_common.status import StatusProjector
from trinity_common.worker import Worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection

    import asyncpg
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerInfo

    from trinity_common.devstack import Database, NatsServer
    from trinity_common.worker import Handler

T = TypeVar("T")

ANALYSIS = QueueSettings(
    name="analysis", timeout_s=2, retries=2, backoff_base_s=0.3, ack_margin_s=1
)
"""The analysis queue with timings short enough for a test; subjects derive from its name."""

STOP_TIMEOUT_S = 10.0
"""Longest a background task may take to stop once asked; fetches poll once a second."""

_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


@dataclass(eq=False, kw_only=True)
class Background:
    """A coroutine the platform runs until it is stopped, or until the test ends."""

    name: str
    task: asyncio.Task[None]
    stop: asyncio.Event


@dataclass(eq=False, kw_only=True)
class RunningWorker:
    """A worker the platform runs, and its background task."""

    worker: Worker
    background: Background


class Platform:
    """NATS and PostgreSQL with Trinity's topology and its status projector running."""

    def __init__(self, *, nc: Client, pool: asyncpg.Pool, nats_url: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.pool = pool
        self.nats_url = nats_url
        self._background: list[Background] = []
        self._reported: set[Background] = set()
        self._connections: list[Client] = []

    def run_in_background(
        self, name: str, run: Callable[[asyncio.Event], Awaitable[None]]
    ) -> Background:
        """Run ``run(stop)`` as a task until the test ends."""
        stop = asyncio.Event()

        async def main() -> None:
            await run(stop)

        background = Background(name=name, task=asyncio.create_task(main(), name=name), stop=stop)
        self._background.append(background)
        return background

    async def start_worker(
        self,
        handler: Handler,
        *,
        queue: QueueSettings = ANALYSIS,
        nc: Client | None = None,
        shutdown_grace_s: float = 2.0,
    ) -> RunningWorker:
        """Create the queue's consumer and run a worker on it; on ``nc`` if given."""
        await broker.ensure_work_consumer(self.js, queue)
        connection = nc or self.nc
        worker = Worker(
            queue=queue,
            handler=handler,
            nc=connection,
            js=connection.jetstream(),
            pool=self.pool,
            shutdown_grace_s=shutdown_grace_s,
        )
        background = self.run_in_background(f"worker:{queue.name}", worker.run)
        return RunningWorker(worker=worker, background=background)

    def start_reaper(self) -> Background:
        """Run the reaper that fails jobs whose last attempt's worker vanished."""
        return self.run_in_background("reaper", ExhaustedJobReaper(js=self.js, pool=self.pool).run)

    async def connect(self) -> Client:
        """Open another NATS connection, closed when the test ends if still open."""
        nc = await nats.connect(self.nats_url, connect_timeout=5, allow_reconnect=False)
        self._connections.append(nc)
        return nc

    async def abandon(self, background: Background) -> None:
        """Cancel a task that is meant to die, wait for its end, and forget its outcome."""
        self._background.remove(background)
        background.task.cancel()
        done, _ = await asyncio.wait({background.task}, timeout=STOP_TIMEOUT_S)
        if not done:
            raise AssertionError(f"{background.name} did not end within {STOP_TIMEOUT_S:g} s")
        if not background.task.cancelled():
            # Retrieved so asyncio does not report it; dying is what was asked of it.
            background.task.exception()

    def check_background(self) -> None:
        """Raise the exception of any background task that ended on its own."""
        for background in self._background:
            if background.task.done() and not background.task.cancelled():
                self._reported.add(background)
                error = background.task.exception()
                if error is not None:
                    raise AssertionError(f"{background.name} failed") from error
                raise AssertionError(f"{background.name} stopped before it was asked to")

    async def wait_until(
        self, check: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str
    ) -> T:
        """Return ``check``'s first non-None result, failing at once if a background task did."""

        async def checked() -> T | None:
            self.check_background()
            return await check()

        return await eventually(checked, timeout_s=timeout_s, what=what)

    async def wait_for_job(
        self, job_id: str, *, states: Collection[str], timeout_s: float = 10.0
    ) -> asyncpg.Record:
        """Poll the job's row until its state is one of ``states``."""

        async def check() -> asyncpg.Record | None:
            row = await self.job(job_id)
            return row if row is not None and row["state"] in states else None

        return await self.wait_until(
            check, timeout_s=timeout_s, what=f"job {job_id} to reach {sorted(states)}"
        )

    async def wait_for_settled(
        self, queue: QueueSettings = ANALYSIS, *, deliveries: int, timeout_s: float = 10.0
    ) -> ConsumerInfo:
        """Wait until the queue's consumer made ``deliveries`` and none awaits an ack."""

        async def check() -> ConsumerInfo | None:
            info = await self.js.consumer_info(names.JOBS_STREAM, queue.durable)
            settled = info.delivered is not None and info.num_ack_pending == 0
            return info if settled and info.delivered.consumer_seq == deliveries else None

        return await self.wait_until(
            check, timeout_s=timeout_s, what=f"{deliveries} deliveries of {queue.name} settled"
        )

    async def wait_for_empty_work_stream(self, *, timeout_s: float = 10.0) -> None:
        """Wait until no job message is left in the work stream."""

        async def check() -> bool | None:
            return await self.work_stream_messages() == 0 or None

        await self.wait_until(check, timeout_s=timeout_s, what="the work stream to be empty")

    async def job(self, job_id: str) -> asyncpg.Record | None:
        """Return the job's row."""
        return await self.pool.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)

    async def attempts(self, job_id: str) -> list[tuple[Any, ...]]:
        """Return ``(attempt, outcome, error_type, error_message)`` of each attempt, in order."""
        rows = await self.pool.fetch(
            "SELECT attempt, outcome, error_type, error_message FROM job_attempts"
            " WHERE job_id = $1 ORDER BY submission, attempt",
            job_id,
        )
        return [tuple(row) for row in rows]

    async def results(self, job_id: str) -> list[asyncpg.Record]:
        """Return the job's stored result rows."""
        return await self.pool.fetch("SELECT * FROM job_results WHERE job_id = $1", job_id)

    async def work_stream_messages(self) -> int:
        """Return how many job messages the work stream holds."""
        info = await self.js.stream_info(names.JOBS_STREAM)
        return info.state.messages

    async def dead_letters(self) -> list[tuple[str, DeadLetter]]:
        """Return ``(subject, letter)`` of every message in the dead-letter stream."""
        info = await self.js.stream_info(names.DEAD_STREAM)
        if info.state.messages == 0:
            return []
        letters = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(names.DEAD_STREAM, seq)
            letters.append((msg.subject or "", _dead_letter_decoder.decode(msg.data or b"")))
        return letters

    async def close(self) -> None:
        """Stop every background task, close extra connections, raise what any task raised."""
        late = await self._stop_background()
        for nc in self._connections:
            if not nc.is_closed:
                await nc.close()
        errors: list[BaseException] = [
            AssertionError(f"{background.name} did not stop within {STOP_TIMEOUT_S:g} s")
            for background in late
        ]
        for background in self._background:
            if background in late or background in self._reported:
                continue  # reported already, or by the test it failed
            if (error := background.task.exception()) is not None:
                errors.append(error)
        if errors:
            raise BaseExceptionGroup("background tasks failed", errors)

    async def _stop_background(self) -> list[Background]:
        """Ask every background task to stop; cancel and return those that did not in time."""
        for background in self._background:
            background.stop.set()
        if not self._background:
            return []
        _, pending = await asyncio.wait(
            {background.task for background in self._background}, timeout=STOP_TIMEOUT_S
        )
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
        return [background for background in self._background if background.task in pending]


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh, migrated database."""
    opened = await create_pool(ConnectionSettings(database_url=database.url))
    try:
        await apply_migrations(opened)
        yield opened
    finally:
        await asyncio.wait_for(opened.close(), timeout=STOP_TIMEOUT_S)


@pytest.fixture
async def platform(nats_server: NatsServer, pool: asyncpg.Pool) -> AsyncIterator[Platform]:
    """Streams, consumers, database and projector, on this test's own servers."""
    settings = ConnectionSettings(nats_url=nats_server.url)
    nc = await broker.connect(settings, name="trinity-tests")
    running = Platform(nc=nc, pool=pool, nats_url=nats_server.url)
    try:
        await broker.ensure_streams(running.js)
        await broker.ensure_status_consumer(running.js)
        running.run_in_background("status-projector", StatusProjector(js=running.js, pool=pool).run)
        yield running
    finally:
        try:
            await running.close()
        finally:
            await broker.close(nc)


@pytest.fixture
def time_out_next_fetch(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], asyncio.Event]:
    """Make a durable consumer's next fetch time out the way nats-py sometimes does.

    An idle ``fetch`` with a batch above one ends in a bare ``asyncio.TimeoutError``,
    not ``nats.errors.TimeoutError``, when the server's "request timeout" status
    for the pull arrives within the last 0.1 ms before the client's own deadline
    (``raise asyncio.TimeoutError`` in ``_fetch_n``, nats-py 2.16). That happens at
    random, more often on a busy CPU; this fixture makes it happen on cue. The
    returned event is set once the timeout was raised.
    """
    original = JetStreamContext.PullSubscription.fetch
    armed: dict[str, asyncio.Event] = {}

    async def fetch(sub: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any) -> list[Msg]:
        raised = armed.get(sub._consumer)
        if raised is None or raised.is_set():
            return await original(sub, *args, **kwargs)
        raised.set()
        raise asyncio.TimeoutError  # noqa: UP041 - the very class nats-py raises

    def arm(durable: str) -> asyncio.Event:
        armed[durable] = asyncio.Event()
        return armed[durable]

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    return arm
