"""How fast datasets move through the Object Store, as the gateway and workers move them.

Stores one object of ``--mib`` MiB of random bytes the way the gateway stores an
upload, reads it back the way the analysis service reads a dataset
(`trinity_common.broker.read_object`), and prints both rates next to a read by
nats-py's own ``get``, which joins chunks by repeated concatenation. Run it with
``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import nats

from trinity_common import broker
from trinity_common.devstack import NatsServer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="size of the object, in MiB")
    return parser.parse_args()


def show(name: str, mib: int, seconds: float) -> None:
    print(f"{name:<34} {mib / seconds:>9,.0f} MiB/s   {seconds:6.2f} s for {mib} MiB")


async def main(args: argparse.Namespace) -> None:
    data = os.urandom(args.mib * 1024 * 1024)
    async with await NatsServer.start() as server:
        nc = await nats.connect(server.url)
        try:
            store = await broker.open_object_store(nc.jetstream(), "bench-objects")
            started = time.perf_counter()
            await store.put("dataset", data)
            show("object store put", args.mib, time.perf_counter() - started)

            started = time.perf_counter()
            read = await broker.read_object(store, "dataset")
            show("read_object (Trinity)", args.mib, time.perf_counter() - started)

            started = time.perf_counter()
            found = await store.get("dataset")
            show("ObjectStore.get (nats-py)", args.mib, time.perf_counter() - started)
        finally:
            await nc.close()
    if read != data or found.data != data:
        raise SystemExit("an object read back differs from what was stored")


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
