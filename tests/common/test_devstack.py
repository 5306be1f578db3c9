"""The throwaway servers of `trinity_common.devstack`, started for real."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import TYPE_CHECKING

import asyncpg
import nats
import pytest

from trinity_common.devstack import (
    Database,
    DevStackError,
    NatsServer,
    PostgresServer,
    dev_stack,
    free_port,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

STREAM = "DEVSTACK_TEST"
SUBJECT = "devstack.test"
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    server = await NatsServer.start()
    yield server
    await server.close()


@pytest.fixture
async def cluster() -> AsyncIterator[PostgresServer]:
    """A throwaway cluster of the test's own, started even if port 5432 answers."""
    server = await PostgresServer.start()
    yield server
    await server.stop()


@pytest.fixture
async def postgres() -> AsyncIterator[PostgresServer]:
    """The server the suite runs against: TRINITY_DATABASE_URL's, 5432's, or a new one."""
    server = await PostgresServer.find_or_start(env=os.environ)
    yield server
    await server.stop()


async def publish_one(url: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        ack = await js.publish(SUBJECT, b"kept")
    finally:
        await nc.close()
    return ack.seq


async def read_first(url: str) -> bytes | None:
    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_msg(STREAM, seq=1)
    finally:
        await nc.close()
    return msg.data


def has_text(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(encoding="utf-8")


async def wait_for_text(path: Path, text: str) -> None:
    async with asyncio.timeout(10):
        while True:
            if has_text(path, text):
                return
            await asyncio.sleep(0.01)


async def is_answering(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except OSError:
        return False
    await conn.close()
    return True


def test_free_port_returns_a_port_that_can_be_bound() -> None:
    port = free_port()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))

    assert 0 < port < 65536


async def test_nats_server_acks_jetstream_publishes_on_the_url_it_reports(
    nats_server: NatsServer,
) -> None:
    seq = await publish_one(nats_server.url)

    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert seq == 1


async def test_nats_server_keeps_stream_messages_across_restart(nats_server: NatsServer) -> None:
    await publish_one(nats_server.url)

    await nats_server.restart()

    assert await read_first(nats_server.url) == b"kept"


async def test_nats_server_restart_reuses_the_same_ports(nats_server: NatsServer) -> None:
    ports = (nats_server.port, nats_server.monitor_port)

    await nats_server.restart()

    assert (nats_server.port, nats_server.monitor_port) == ports


async def test_nats_server_restart_waits_for_its_port_to_be_released(
    nats_server: NatsServer,
) -> None:
    await nats_server.stop()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", nats_server.port))
        blocker.listen()
        restarting = asyncio.create_task(nats_server.restart())
        await wait_for_text(nats_server.log_path, "address already in use")

    await restarting

    assert nats_server.pid is not None


async def test_nats_server_restart_after_kill_keeps_acked_messages(
    nats_server: NatsServer,
) -> None:
    await publish_one(nats_server.url)
    await nats_server.kill()

    await nats_server.restart()

    assert await read_first(nats_server.url) == b"kept"


async def test_nats_server_kill_ends_the_process(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None

    await nats_server.kill()

    assert nats_server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_nats_server_stop_does_nothing_when_already_stopped(
    nats_server: NatsServer,
) -> None:
    await nats_server.stop()

    await nats_server.stop()

    assert nats_server.pid is None


async def test_nats_server_close_removes_the_store_dir_it_created() -> None:
    server = await NatsServer.start()
    await publish_one(server.url)

    await server.close()

    assert not server.store_dir.exists()


async def test_nats_server_close_keeps_a_store_dir_it_was_given(tmp_path: Path) -> None:
    server = await NatsServer.start(store_dir=tmp_path / "store")
    await publish_one(server.url)

    await server.close()

    assert (tmp_path / "store" / "jetstream").is_dir()


async def test_nats_server_refuses_a_binary_older_than_2_12(tmp_path: Path) -> None:
    old = tmp_path / "nats-server"
    old.write_text("#!/bin/sh\necho 'nats-server: v2.9.10'\n", encoding="utf-8")
    old.chmod(0o755)

    with pytest.raises(DevStackError, match=r"nats-server v2\.9\.10, .* run `uv sync`"):
        await NatsServer.start(binary=str(old))


async def test_nats_server_start_fails_naming_a_port_that_stays_taken() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]

        with pytest.raises(DevStackError, match=rf"127\.0\.0\.1:{port}.*address already in use"):
            await NatsServer.start(port=port, timeout_s=3)


async def test_postgres_server_start_runs_a_cluster_that_accepts_connections(
    cluster: PostgresServer,
) -> None:
    conn = await asyncpg.connect(cluster.url)
    try:
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()

    assert cluster.pid is not None
    assert fsync == "off"


async def test_postgres_server_stop_ends_the_cluster_and_removes_its_files() -> None:
    server = await PostgresServer.start()
    data_dir = server.data_dir
    assert data_dir is not None

    await server.stop()

    assert not data_dir.exists()
    assert not await is_answering(server.url)


async def test_postgres_server_stop_ends_a_cluster_left_paused() -> None:
    server = await PostgresServer.start()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)

    await server.stop()

    assert not await is_answering(server.url)


async def test_postgres_server_uses_the_server_named_by_trinity_database_url(
    cluster: PostgresServer,
) -> None:
    named = cluster.url.rsplit("/", 1)[0] + "/any_database"

    found = await PostgresServer.find_or_start(env={"TRINITY_DATABASE_URL": named})

    assert found.url == cluster.url
    assert found.pid is None


async def test_postgres_server_refuses_a_trinity_database_url_that_does_not_answer() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/trinity"

    with pytest.raises(DevStackError, match="TRINITY_DATABASE_URL does not answer"):
        await PostgresServer.find_or_start(env={"TRINITY_DATABASE_URL": url})


async def test_postgres_server_uses_the_local_server_when_port_5432_answers() -> None:
    if not await is_answering(LOCAL_URL):
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 lets user postgres in")

    found = await PostgresServer.find_or_start(env={})

    assert found.url == LOCAL_URL
    assert found.pid is None


async def test_postgres_server_stop_leaves_a_server_it_did_not_start_running(
    cluster: PostgresServer,
) -> None:
    found = await PostgresServer.find_or_start(env={"TRINITY_DATABASE_URL": cluster.url})

    await found.stop()

    assert await is_answering(cluster.url)


async def test_database_create_makes_an_empty_database_named_with_the_prefix(
    postgres: PostgresServer,
) -> None:
    database = await Database.create(server=postgres, name_prefix="devstack_test")
    try:
        conn = await asyncpg.connect(database.url)
        try:
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            current = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()
    finally:
        await database.drop()

    assert database.name.startswith("devstack_test_")
    assert current == database.name
    assert tables == 0


async def test_database_drop_removes_the_database_despite_an_open_connection(
    postgres: PostgresServer,
) -> None:
    database = await Database.create(server=postgres)
    conn = await asyncpg.connect(database.url)

    try:
        await database.drop()
    finally:
        conn.terminate()

    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(database.url)


async def test_database_create_finds_a_server_when_none_is_given() -> None:
    database = await Database.create()
    try:
        conn = await asyncpg.connect(database.url)
        try:
            current = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()
    finally:
        await database.drop()

    assert current == database.name


async def test_database_create_rejects_a_prefix_that_is_not_an_identifier(
    postgres: PostgresServer,
) -> None:
    with pytest.raises(ValueError, match="name_prefix 'Trinity-Test' must be"):
        await Database.create(server=postgres, name_prefix="Trinity-Test")


async def test_dev_stack_provides_working_nats_and_database() -> None:
    async with dev_stack(env=os.environ) as stack:
        seq = await publish_one(stack.nats.url)
        conn = await asyncpg.connect(stack.database.url)
        try:
            current = await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()

    assert seq == 1
    assert current == stack.database.name


async def test_dev_stack_tears_everything_down_on_exit(cluster: PostgresServer) -> None:
    async with dev_stack(env={"TRINITY_DATABASE_URL": cluster.url}) as stack:
        await publish_one(stack.nats.url)

    assert stack.nats.pid is None
    assert not stack.nats.store_dir.exists()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(stack.database.url)
