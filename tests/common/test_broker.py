"""Broker helpers against a real nats-server: objects read back whole and checked."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import nats
import pytest
from nats.js.errors import ObjectNotFoundError

from trinity_common import broker

if TYPE_CHECKING:
    from trinity_common.devstack import NatsServer

# Several of nats-py's 128 KiB chunks, and a last one that is not full.
OBJECT_BYTES = 5 * 128 * 1024 + 17


async def test_read_object_returns_every_chunk_in_order(nats_server: NatsServer) -> None:
    data = os.urandom(OBJECT_BYTES)
    nc = await nats.connect(nats_server.url)
    try:
        store = await broker.open_object_store(nc.jetstream(), "objects")
        await store.put("upload", data)

        read = await broker.read_object(store, "upload")
    finally:
        await nc.close()

    assert read == data


async def test_read_object_of_an_empty_object_is_empty(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        store = await broker.open_object_store(nc.jetstream(), "objects")
        await store.put("empty", b"")

        read = await broker.read_object(store, "empty")
    finally:
        await nc.close()

    assert read == b""


async def test_read_object_of_a_missing_object_says_so(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        store = await broker.open_object_store(nc.jetstream(), "objects")

        with pytest.raises(ObjectNotFoundError):
            await broker.read_object(store, "nowhere")
    finally:
        await nc.close()
