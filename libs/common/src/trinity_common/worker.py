"""The worker runtime every Trinity service runs on.

A service supplies a handler per queue; this module does everything else:
fetching from the queue's durable pull consumer, status events, heartbeats,
the per-attempt timeout, storing the result once, and the one decision of what
to do with the message afterwards (`_settle`): ack, nak with backoff, or fail
and dead-letter.

Delivery is at least once; the runtime makes it effectively once. A result is
written once (the insert ignores a second one) before the message is acked,
and a redelivered job whose result is already stored is acked without running
the handler again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import msgspec
import nats.errors

from trinity_common import broker, names
from trinity_common.database import UNAVAILABLE_ERRORS
from trinity_common.deadletter import DeadLetter, publish_dead_letter
from trinity_common.errors import PermanentJobError, RetryableJobError
from trinity_common.logs import bind_job_context
from trinity_common.messages import (
    CancelRequest,
    JobCancelled,
    JobEnvelope,
    JobFailed,
    JobHandedBack,
    JobProgressed,
    JobRetried,
    JobStarted,
    JobSucceeded,
    StatusEvent,
    utc_now,
)
from trinity_common.status import publish_status

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from trinity_common.commands import Command
    from trinity_common.queues import QueueSettings

__all__ = ["Handler", "JobContext", "JobResult", "Worker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What keeps an outcome from being recorded, for now: NATS or the database away.
_UNRECORDED_ERRORS: tuple[type[Exception], ...] = (nats.errors.Error, *UNAVAILABLE_ERRORS)

RESULT_INLINE_MAX_BYTES = 256 * 1024
"""Results larger than this (encoded) go to the object store instead of their row."""


class _JobHeader(msgspec.Struct, frozen=True):
    """What identifies a job, read from a message whose command may be unreadable."""

    job_id: str
    submission: int = 1


_envelope_decoder = msgspec.json.Decoder(JobEnvelope)
_header_decoder = msgspec.json.Decoder(_JobHeader)
_cancel_decoder = msgspec.json.Decoder(CancelRequest)
_json = msgspec.json.Encoder()


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """What a handler returns."""

    data: Any
    """The full result, stored once per job; anything msgspec can encode as JSON."""

    summary: dict[str, Any] = field(default_factory=dict)
    """A few headline figures, shown on the job's status document."""


@dataclass(kw_only=True)
class _Outcome:
    kind: str  # "succeeded" | "retry" | "failed" | "cancelled"
    result: JobResult | None = None
    error_type: str = ""
    error_message: str = ""
    delay_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class _Prior:
    summary: dict[str, Any] | None = None
    """The stored result's summary; None when there is no result yet."""
    attempt: int = 0
    state: str | None = None


class JobContext:
    """What a handler knows of the job it runs, and how it reports progress."""

    def __init__(
        self, *, envelope: JobEnvelope, queue: QueueSettings, attempt: int, worker: Worker
    ) -> None:
        self.job_id = envelope.job_id
        self.command: Command = envelope.command
        self.queue = queue
        self.attempt = attempt
        self.envelope = envelope
        self.js = worker.js
        self.pool = worker.pool
        self.percent = 0.0
        self.message = "started"
        self.cancel_requested = False
        self.cancel_reason = ""
        self._worker = worker
        self._published_at = 0.0

    async def patiently(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Return ``await operation(*args)``, retried for as long as the database is away.

        For a handler's own queries: an outage then waits, rather than failing the
        attempt and spending a retry. The attempt's heartbeats keep the job
        meanwhile, and its timeout bounds the wait.
        """
        return await self._worker._patiently(None, operation, *args)

    async def report_progress(self, percent: float, message: str = "") -> None:
        """Record progress; it reaches the status stream at most twice a second.

        Progress never goes backwards within an attempt: a lower figure is ignored.
        """
        if percent < self.percent:
            return
        self.percent, self.message = min(percent, 100.0), message
        now = asyncio.get_running_loop().time()
        if now - self._published_at >= 0.5:
            self._published_at = now
            await self._worker.publish_progress(self)


Handler: TypeAlias = Callable[[JobContext], Coroutine[Any, Any, JobResult]]
"""A queue's job function: runs one attempt and returns its result, or raises."""


class Worker:
    """Runs one queue's jobs with one handler, ``queue.concurrency`` at a time."""

    def __init__(
        self,
        *,
        queue: QueueSettings,
        handler: Handler,
        nc: Client,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        shutdown_grace_s: float = 10.0,
        publish_timeout_s: float = 2.0,
    ) -> None:
        self.queue = queue
        self.nc = nc
        self.js = js
        self.pool = pool
        self._handler = handler
        self._grace_s = shutdown_grace_s
        self._publish_timeout_s = publish_timeout_s
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self._running: set[asyncio.Task[None]] = set()
        self._active: dict[str, tuple[asyncio.Task[JobResult], JobContext]] = {}
        self.last_fetch_at = 0.0
        """Event-loop time of the last fetch that reached the server; for readiness."""
        self._stopping = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop`` is set, then shut down gracefully."""
        sub = await self.js.pull_subscribe_bind(
            durable=self.queue.durable, stream=names.JOBS_STREAM
        )
        cancels = await self.nc.subscribe(
            names.cancel_subject(self.queue.name), cb=self._on_cancel_request
        )
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if len(self._running) >= self.queue.concurrency:
                    await asyncio.wait({stopped, *self._running}, return_when="FIRST_COMPLETED")
                    continue
                for msg in await self._fetch_one(sub, stop):
                    task = asyncio.create_task(self._process(msg))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
        finally:
            stopped.cancel()
            self._stopping.set()
            await self._drain()
            await sub.unsubscribe()
            await cancels.unsubscribe()

    async def _fetch_one(self, sub: Any, stop: asyncio.Event) -> list[Msg]:
        # Fetch only what can start now: a message waiting in this process's
        # hands would burn its ack deadline while another process sits idle.
        # One at a time, because nats-py's fetch of n > 1 may leave two pull
        # requests open and so be handed up to 2n messages.
        try:
            msgs: list[Msg] = await sub.fetch(1, timeout=1.0)
        except TimeoutError:  # nats-py raises its own subclass, or a bare one from fetch
            self.last_fetch_at = asyncio.get_running_loop().time()
            return []  # nothing queued yet
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
            raise
        except nats.errors.Error as err:
            logger.debug("fetch failed", extra={"error_type": type(err).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            return []
        self.last_fetch_at = asyncio.get_running_loop().time()
        return msgs

    async def _drain(self) -> None:
        if not self._running:
            return
        logger.info("waiting for running jobs", extra={"jobs": len(self._running)})
        _, pending = await asyncio.wait(set(self._running), timeout=self._grace_s)
        if pending:
            logger.warning("shutdown grace over, handing jobs back", extra={"jobs": len(pending)})
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=self._publish_timeout_s * 2)

    async def _process(self, msg: Msg) -> None:
        attempt = msg.metadata.num_delivered
        try:
            envelope = _envelope_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            await self._reject_undecodable(msg, err, attempt)
            return
        with bind_job_context(
            job_id=envelope.job_id,
            queue=self.queue.name,
            attempt=attempt,
            max_attempts=self.queue.max_attempts,
        ):
            try:
                await self._process_envelope(msg, envelope, attempt)
            except asyncio.CancelledError:
                # Shutdown outlasted its grace: hand the job back at once.
                await broker.settle(msg.nak())
                raise
            except _UNRECORDED_ERRORS as err:
                # The outcome could not be recorded; JetStream redelivers the job
                # after its ack deadline and the stored result, if any, is reused.
                logger.warning("job outcome not recorded", extra={"error_type": type(err).__name__})
                # At shutdown the job goes back at once, for a process that can reach it all.
                delay = 0 if self._stopping.is_set() else self.queue.backoff_s(attempt)
                await broker.settle(msg.nak(delay=delay))
            except Exception:
                # A fault of the runtime itself: say so loudly, and hand the job
                # back after a backoff rather than leave it to its ack deadline.
                logger.exception("job processing failed")
                await broker.settle(msg.nak(delay=self.queue.backoff_s(attempt)))

    async def _process_envelope(self, msg: Msg, envelope: JobEnvelope, attempt: int) -> None:
        prior = await self._patiently(msg, self._prior_state, envelope.job_id)
        if prior.state == "cancelled":
            logger.info("cancelled job skipped")
            await msg.term()
            return
        if prior.summary is not None:
            # The result was stored but the ack was lost: say so again, as the
            # attempt that produced it, and acknowledge without running anything.
            logger.info("job already done, acknowledging redelivery")
            done = self._event(JobSucceeded, envelope, prior.attempt, summary=prior.summary)
            await self._publish(done)
            await msg.ack_sync(timeout=self._publish_timeout_s)
            return
        await self._publish(
            self._event(
                JobStarted,
                envelope,
                attempt,
                max_attempts=self.queue.max_attempts,
                worker=self._name,
            )
        )
        context = JobContext(envelope=envelope, queue=self.queue, attempt=attempt, worker=self)
        try:
            outcome = await self._attempt(msg, context)
        except asyncio.CancelledError:
            await self._announce_hand_back(context)
            raise  # the caller naks, after the announcement, so it precedes the next start
        await self._settle(msg, context, outcome)

    async def _announce_hand_back(self, context: JobContext) -> None:
        """Say that shutdown stopped the attempt, so the job shows as queued, not running.

        A lost announcement leaves the job shown running until the next attempt
        starts, which closes this one as lost: late, but not wrong.
        """
        event = self._event(JobHandedBack, context.envelope, context.attempt)
        try:
            await self._publish(event)
        except nats.errors.Error as err:
            logger.warning("job hand-back not announced", extra={"error_type": type(err).__name__})
            return
        logger.info("job handed back")

    async def _attempt(self, msg: Msg, context: JobContext) -> _Outcome:
        started = asyncio.get_running_loop().time()
        heartbeat = asyncio.create_task(self._heartbeat(msg, context))
        deadline = asyncio.timeout(self.queue.timeout_s)
        # The handler runs in a task of its own, so a cancel request can stop it
        # without cancelling this one, which still has to settle the message.
        handler = asyncio.create_task(self._handler(context))
        self._active[context.job_id] = (handler, context)
        try:
            async with deadline:
                result = await handler
            return _Outcome(kind="succeeded", result=result)
        except asyncio.CancelledError:
            if not context.cancel_requested:
                handler.cancel()
                raise  # shutdown: the caller hands the job back
            return _Outcome(kind="cancelled", error_message=context.cancel_reason)
        except PermanentJobError as err:
            return _Outcome(kind="failed", error_type=err.error_type, error_message=err.message)
        except RetryableJobError as err:
            return _Outcome(
                kind="retry", error_type="retryable", error_message=err.message, delay_s=err.delay_s
            )
        except TimeoutError as err:
            if not deadline.expired():
                return _Outcome(kind="retry", error_type="TimeoutError", error_message=str(err))
            message = (
                f"attempt exceeded the {self.queue.name} queue's {self.queue.timeout_s:g} s timeout"
            )
            return _Outcome(kind="retry", error_type="timeout", error_message=message)
        except Exception as err:
            logger.debug("handler raised", exc_info=True)
            return _Outcome(kind="retry", error_type=type(err).__name__, error_message=str(err))
        finally:
            heartbeat.cancel()
            self._active.pop(context.job_id, None)
            logger.debug(
                "attempt finished",
                extra={"duration_s": round(asyncio.get_running_loop().time() - started, 3)},
            )

    async def _heartbeat(self, msg: Msg, context: JobContext) -> None:
        # Tells JetStream the job is alive (resetting its ack deadline) and tells
        # the status stream too, so a stalled job shows when it was last seen.
        while True:
            await asyncio.sleep(self.queue.heartbeat_s)
            try:
                await msg.in_progress()
                await self.publish_progress(context)
            except nats.errors.Error as err:
                logger.debug("heartbeat lost", extra={"error_type": type(err).__name__})
            # A cancel request broadcast while this process was disconnected is
            # missed; the job's record is the fallback, read once a beat.
            try:
                prior = await self._prior_state(context.job_id)
            except UNAVAILABLE_ERRORS:
                continue  # the next beat asks again
            if prior.state == "cancelled":
                self.cancel_job(context.job_id, reason="cancelled while running")

    async def publish_progress(self, context: JobContext) -> None:
        """Publish the context's latest progress; a lost one is not worth a retry."""
        event = self._event(
            JobProgressed,
            context.envelope,
            context.attempt,
            percent=context.percent,
            message=context.message,
        )
        try:
            await publish_status(self.js, event, ack_timeout_s=self._publish_timeout_s)
        except nats.errors.Error as err:
            logger.debug("progress not published", extra={"error_type": type(err).__name__})

    async def _settle(self, msg: Msg, context: JobContext, outcome: _Outcome) -> None:
        attempt, envelope = context.attempt, context.envelope
        if outcome.kind == "succeeded" and outcome.result is not None:
            try:
                await self._patiently(msg, self._store_result, envelope, attempt, outcome.result)
            except asyncpg.PostgresError as err:
                if isinstance(err, UNAVAILABLE_ERRORS):
                    raise
                # The database refuses this result itself; storing it again would too.
                refused = _Outcome(
                    kind="failed",
                    error_type="result_refused",
                    error_message=f"the result could not be stored: {err}",
                )
                await self._fail(msg, envelope, attempt, refused)
                return
            await self._publish(
                self._event(JobSucceeded, envelope, attempt, summary=outcome.result.summary)
            )
            await msg.ack_sync(timeout=self._publish_timeout_s)
            logger.info("job succeeded")
            return
        if outcome.kind == "cancelled":
            await self._publish(
                self._event(JobCancelled, envelope, attempt, reason=outcome.error_message)
            )
            await msg.term()
            logger.info("job cancelled while running")
            return
        if outcome.kind == "retry" and attempt < self.queue.max_attempts:
            delay = (
                outcome.delay_s if outcome.delay_s is not None else self.queue.backoff_s(attempt)
            )
            await self._publish(
                self._event(
                    JobRetried,
                    envelope,
                    attempt,
                    error_type=outcome.error_type,
                    error_message=outcome.error_message,
                    retry_in_s=round(delay, 3),
                )
            )
            await msg.nak(delay=delay)
            logger.warning(
                "job attempt failed, will retry",
                extra={"error_type": outcome.error_type, "retry_in_s": round(delay, 3)},
            )
            return
        await self._fail(msg, envelope, attempt, outcome)

    async def _fail(self, msg: Msg, envelope: JobEnvelope, attempt: int, outcome: _Outcome) -> None:
        exhausted = outcome.kind == "retry"
        message = outcome.error_message
        if exhausted:
            tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
            message = f"gave up after {tries}; last error: {message}"
        await publish_dead_letter(
            self.js,
            self.pool,
            DeadLetter(
                envelope=envelope,
                attempts=attempt,
                error_type=outcome.error_type,
                error_message=message,
                at=utc_now(),
            ),
            ack_timeout_s=self._publish_timeout_s,
        )
        await self._publish(
            self._event(
                JobFailed,
                envelope,
                attempt,
                error_type=outcome.error_type,
                error_message=message,
                dead_lettered=True,
            )
        )
        await msg.term()
        log = logger.error if exhausted else logger.info
        log("job failed", extra={"error_type": outcome.error_type, "dead_lettered": True})

    async def _reject_undecodable(self, msg: Msg, err: Exception, attempt: int) -> None:
        # Nothing can be learnt from running it again; keep it for a person. A
        # command this service cannot read (one from a newer or older submitter,
        # say) still names its job, which must then end failed, not wait forever.
        logger.error(
            "undecodable job dead-lettered", extra={"subject": msg.subject, "error": str(err)}
        )
        try:
            header = _header_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            header = None
        if header is not None:
            failed = self._event(
                JobFailed,
                header,
                attempt,
                error_type="bad_payload",
                error_message=f"the {self.queue.name} service cannot read this job: {err}",
                dead_lettered=True,
            )
            try:
                await self._publish(failed)
            except nats.errors.Error:
                # Unrecorded, the job would show queued for ever: try again later.
                await broker.settle(msg.nak(delay=self.queue.backoff_s(attempt)))
                return
        await broker.settle(
            self.js.publish(
                self.queue.dead_subject,
                msg.data,
                timeout=self._publish_timeout_s,
                stream=names.DEAD_STREAM,
            )
        )
        await broker.settle(msg.term())

    async def _patiently(
        self, msg: Msg | None, operation: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """Run a database ``operation``, riding out an outage for as long as it lasts.

        Naking on a database outage would spend the job's attempts on trouble that
        is not the job's, and dead-letter healthy jobs after a long enough one.
        Instead the job is held, its ack deadline kept fresh (through ``msg``, or
        by the attempt's heartbeats when None), and the operation retried until
        the database answers. Only shutdown ends the wait: the error is raised
        then, and the job handed back for another process.
        """
        delay = 0.25
        while True:
            try:
                return await operation(*args)
            except UNAVAILABLE_ERRORS as err:
                if self._stopping.is_set():
                    raise
                logger.warning("database unavailable, holding job", extra={"error": repr(err)})
            if msg is not None:
                await broker.settle(msg.in_progress())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            # Often enough that the in-progress acks keep the ack deadline away.
            delay = min(delay * 2, 5.0, self.queue.ack_wait_s / 4)

    async def _prior_state(self, job_id: str) -> _Prior:
        """Return what is already known of the job: its stored result and recorded state."""
        row = await self.pool.fetchrow(
            "SELECT r.summary, r.attempt, (SELECT state FROM jobs WHERE job_id = $1) AS state"
            " FROM (SELECT 1) AS one LEFT JOIN job_results r ON r.job_id = $1",
            job_id,
        )
        if row is None:
            return _Prior()
        return _Prior(summary=row["summary"], attempt=row["attempt"] or 0, state=row["state"])

    def cancel_job(self, job_id: str, *, reason: str) -> bool:
        """Cancel the job's running handler in this process; return whether one ran here."""
        running = self._active.get(job_id)
        if running is None:
            return False
        handler, context = running
        context.cancel_requested, context.cancel_reason = True, reason
        handler.cancel()
        return True

    async def _on_cancel_request(self, msg: Msg) -> None:
        try:
            request = _cancel_decoder.decode(msg.data)
        except msgspec.DecodeError:
            logger.warning("undecodable cancel request ignored", extra={"subject": msg.subject})
            return
        if self.cancel_job(request.job_id, reason=request.reason):
            logger.info("cancel request received", extra={"job_id": request.job_id})

    async def _store_result(self, envelope: JobEnvelope, attempt: int, result: JobResult) -> None:
        data = _json.encode(result.data)
        inline: str | None = data.decode()
        object_name: str | None = None
        if len(data) > RESULT_INLINE_MAX_BYTES:
            # Big results live beside big uploads, in the object store; the row
            # keeps the reference. A redelivery overwrites the object with equal bytes.
            store = await self.js.object_store(names.RESULTS_BUCKET)
            await store.put(envelope.job_id, data)
            inline, object_name = None, envelope.job_id
        await self.pool.execute(
            "INSERT INTO job_results"
            " (job_id, queue, result, object_name, summary, size_bytes, attempt)"
            " VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7) ON CONFLICT (job_id) DO NOTHING",
            envelope.job_id,
            self.queue.name,
            inline,
            object_name,
            result.summary,
            len(data),
            attempt,
        )

    async def _publish(self, event: StatusEvent) -> None:
        await publish_status(self.js, event, ack_timeout_s=self._publish_timeout_s)

    def _event(
        self, kind: type[Any], envelope: JobEnvelope | _JobHeader, attempt: int, **fields: Any
    ) -> Any:
        return kind(
            job_id=envelope.job_id,
            queue=self.queue.name,
            at=utc_now(),
            submission=envelope.submission,
            attempt=attempt,
            **fields,
        )
