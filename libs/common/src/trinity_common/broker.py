"""NATS connections and the JetStream topology Trinity runs on.

The `ensure_*` functions create or update streams, consumers and object store
buckets. They are idempotent, so every service calls them at start-up and a
changed limit reaches a running deployment on its next rollout. The set is
fixed: one durable consumer per queue, never one per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from typing import TYPE_CHECKING, Any

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError

from trinity_common import names

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.object_store import ObjectStore

    from trinity_common.queues import QueueSettings
    from trinity_common.settings import ConnectionSettings

__all__ = [
    "close",
    "connect",
    "ensure_status_consumer",
    "ensure_streams",
    "ensure_work_consumer",
    "open_object_store",
    "ping",
    "pull_batches",
    "read_object",
    "settle",
]

logger = logging.getLogger(__name__)

_DAY_S = 86_400.0


async def connect(settings: ConnectionSettings, *, name: str) -> Client:
    """Connect to NATS and keep reconnecting for as long as the process lives.

    The first connection must succeed within five publish timeouts, so a service
    pointed at the wrong address fails at start-up; after that, an outage is
    ridden out by reconnecting, and readiness reports it meanwhile.
    """
    # The first connection gets a bounded number of tries; reconnects later are
    # unbounded. nats-py applies max_reconnect_attempts to both, so bound it here.
    deadline_s = settings.nats_timeout_s * 5
    try:
        async with asyncio.timeout(deadline_s):
            return await _connect(settings, name=name)
    except TimeoutError as err:
        raise ConnectionError(
            f"no NATS server answered at {settings.nats_url} within {deadline_s:g} s"
        ) from err


async def _connect(settings: ConnectionSettings, *, name: str) -> Client:
    client: Client | None = None

    async def on_disconnect() -> None:
        if client is not None and client.is_closed:
            logger.info("nats connection closed")  # our own doing, at shutdown
            return
        logger.warning("nats disconnected")

    async def on_reconnect() -> None:
        logger.info("nats reconnected")

    async def on_error(err: Exception) -> None:
        logger.debug("nats connection error", extra={"error_type": type(err).__name__})

    client = await nats.connect(
        servers=settings.nats_servers,
        name=name,
        connect_timeout=settings.nats_timeout_s,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        # Publishes made while disconnected fail at once instead of queueing
        # behind a reconnect the caller cannot wait for.
        pending_size=0,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
    )
    return client


async def ping(nc: Client, *, timeout_s: float = 1.0) -> str:
    """Answer ``"ok"`` if JetStream answers a request in time, else why not.

    For readiness probes. A connection can look open to this process while the
    server behind it has stopped answering; only a round trip tells. The round
    trip is a JetStream API request, not a PING: nats-py cannot give up waiting
    for a PONG without breaking the connection when that PONG arrives later.
    """
    if not nc.is_connected:
        return "down: not connected"
    try:
        await nc.jetstream(timeout=timeout_s).account_info()
    except (nats.errors.Error, TimeoutError) as err:
        return f"down: {type(err).__name__}"
    return "ok"


async def close(nc: Client, *, timeout_s: float = 5.0) -> None:
    """Drain ``nc`` (flush what is in flight, then close); just close it if NATS is away."""
    if nc.is_closed:
        return
    try:
        async with asyncio.timeout(timeout_s):
            await nc.drain()
    except (nats.errors.Error, TimeoutError) as err:
        # Nothing can be drained from a connection that is reconnecting.
        logger.debug("nats drain skipped", extra={"error_type": type(err).__name__})
        await nc.close()


def _stream_configs(*, replicas: int, max_jobs_per_queue: int) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=names.JOBS_STREAM,
            subjects=[names.JOBS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            # A full queue refuses new jobs; it never drops accepted ones. Each
            # queue is one subject, so the per-subject limit bounds each queue.
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs_per_subject=max_jobs_per_queue,
            duplicate_window=120.0,
        ),
        StreamConfig(
            name=names.STATUS_STREAM,
            subjects=[names.STATUS_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=7 * _DAY_S,
            duplicate_window=120.0,
        ),
        StreamConfig(
            # JetStream announces a job whose last attempt's worker vanished only
            # as a core-NATS advisory; this stream keeps it until it is handled.
            name=names.ADVISORY_STREAM,
            subjects=[names.MAX_DELIVERIES_ADVISORIES],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=7 * _DAY_S,
        ),
        StreamConfig(
            name=names.DEAD_STREAM,
            subjects=[names.DEAD_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=30 * _DAY_S,
            duplicate_window=120.0,
        ),
    ]


def _work_consumer(queue: QueueSettings) -> ConsumerConfig:
    return ConsumerConfig(
        name=queue.durable,
        durable_name=queue.durable,
        filter_subject=queue.subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=queue.ack_wait_s,
        # Retries are spaced by the worker's delayed naks; a consumer backoff list
        # would override ack_wait with its first value, so none is set.
        max_deliver=queue.max_attempts,
        max_ack_pending=-1,
    )


def _status_consumer() -> ConsumerConfig:
    return ConsumerConfig(
        name=names.STATUS_CONSUMER,
        durable_name=names.STATUS_CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,
        max_ack_pending=10_000,
    )


async def ensure_streams(
    js: JetStreamContext, *, replicas: int = 1, max_jobs_per_queue: int = 100_000
) -> None:
    """Create or update Trinity's streams and object store buckets."""
    for config in _stream_configs(replicas=replicas, max_jobs_per_queue=max_jobs_per_queue):
        try:
            await js.update_stream(config)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
    for bucket in (names.DATASETS_BUCKET, names.RESULTS_BUCKET):
        await open_object_store(js, bucket, replicas=replicas)


async def ensure_work_consumer(js: JetStreamContext, queue: QueueSettings) -> None:
    """Create or update the durable pull consumer of ``queue``."""
    await js.add_consumer(names.JOBS_STREAM, _work_consumer(queue))


async def ensure_status_consumer(js: JetStreamContext) -> None:
    """Create or update the durable consumers of the status projector and the reaper."""
    await js.add_consumer(names.STATUS_STREAM, _status_consumer())
    await js.add_consumer(
        names.ADVISORY_STREAM,
        ConsumerConfig(
            name=names.REAPER_CONSUMER,
            durable_name=names.REAPER_CONSUMER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=-1,
        ),
    )


async def pull_batches(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    batch: int,
    stop: asyncio.Event,
    idle_s: float = 1.0,
) -> AsyncIterator[list[Msg]]:
    """Yield batches from a durable pull consumer until ``stop`` is set.

    An empty poll and a passing connection error both just mean "nothing yet":
    nats-py reconnects underneath, and the loop resumes where the consumer is.
    """
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=idle_s)
            except TimeoutError:  # nats-py raises its own subclass, or a bare one from fetch
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
                raise
            except nats.errors.Error as err:
                logger.debug("fetch failed", extra={"consumer": durable, "error": repr(err)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=idle_s)
                continue
            yield msgs
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()


async def open_object_store(js: JetStreamContext, bucket: str, *, replicas: int = 1) -> ObjectStore:
    """Return the Object Store ``bucket``, creating it when it does not exist yet."""
    try:
        return await js.object_store(bucket)
    except BucketNotFoundError:
        return await js.create_object_store(
            bucket,
            config=nats.js.api.ObjectStoreConfig(storage=StorageType.FILE, replicas=replicas),
        )


async def read_object(store: ObjectStore, name: str) -> bytes:
    """Return the bytes of object ``name``, checked against its digest.

    Raises:
        ObjectNotFoundError: there is no such object.
    """
    # Collected in a buffer: without one, nats-py joins the chunks by repeated
    # bytes concatenation, which takes 25 s for a 100 MiB object instead of 2.
    sink = io.BytesIO()
    await store.get(name, writeinto=sink)
    return sink.getvalue()


async def settle(operation: Awaitable[Any], *, what: str = "settle") -> None:
    """Await an ack, nak or term whose loss only means a later redelivery.

    JetStream delivers an unsettled message again after its ack deadline, and
    every consumer in Trinity absorbs a repeat, so a disconnect here is logged
    and otherwise ignored.
    """
    try:
        await operation
    except nats.errors.Error as err:
        logger.debug("%s lost", what, extra={"error_type": type(err).__name__})
