"""Soak: push many analysis jobs through while services die and NATS restarts.

``make soak`` (not part of ``make test``). Starts NATS, PostgreSQL, a gateway and
two analysis services; submits ``--jobs`` analysis jobs over HTTP; meanwhile kills
a random analysis process with SIGKILL every few seconds and starts a new one,
and restarts nats-server once. Then waits for every accepted job to end and
prints the accepted, terminal, duplicated and lost counts. The right answer:
N accepted, N terminal, 0 lost, 0 duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from trinity_common.devstack import DevStack, dev_stack, free_port
from trinity_common.devstack.services import ServiceProcess

CSV = b"city,temp,rain\nOslo,3.5,12\nRome,17.25,3\nLima,19.0,0\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


class Soak:
    def __init__(self, stack: DevStack, args: argparse.Namespace, logs: Path) -> None:
        self.stack = stack
        self.args = args
        self.logs = logs
        self.rng = random.Random(args.seed)  # noqa: S311 - reproducible chaos, not secrets
        self.port = free_port()
        self.env = {
            **os.environ,
            "TRINITY_NATS_URL": stack.nats.url,
            "TRINITY_DATABASE_URL": stack.database.url,
            "TRINITY_GATEWAY_PORT": str(self.port),
            "TRINITY_LOG_FORMAT": "json",
            "TRINITY_LOG_LEVEL": "WARNING",
            # Short ack waits, so jobs a killed process held come back quickly.
            "TRINITY_QUEUE_ANALYSIS_ACK_MARGIN_S": "5",
            "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "30",
            "TRINITY_QUEUE_ANALYSIS_BACKOFF_BASE_S": "0.5",
        }
        self.workers: list[ServiceProcess] = []
        self.accepted: list[str] = []
        self.kills = 0
        self.spawned = 0

    async def start_worker(self) -> None:
        self.spawned += 1
        log = self.logs / f"analysis-{self.spawned}.log"
        self.workers.append(
            await ServiceProcess.start("trinity_analysis", env=self.env, log_path=log)
        )

    async def chaos(self, done: asyncio.Event) -> None:
        restarted_nats = False
        while not done.is_set():
            await asyncio.sleep(self.args.kill_every_s)
            victim = self.rng.choice(self.workers)
            victim.signal(signal.SIGKILL)
            await victim.wait(10)
            self.workers.remove(victim)
            self.kills += 1
            await self.start_worker()
            if not restarted_nats and len(self.accepted) > self.args.jobs // 2:
                restarted_nats = True
                print("restarting nats-server", flush=True)
                await self.stack.nats.restart()

    async def submit(self, client: httpx.AsyncClient, dataset_id: str) -> None:
        remaining = iter(range(self.args.jobs))

        async def lane() -> None:
            for _ in remaining:
                while True:
                    try:
                        response = await client.post(
                            "/api/analysis", json={"dataset_id": dataset_id}
                        )
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 202:
                        self.accepted.append(response.json()["job_id"])
                        break
                    await asyncio.sleep(0.2)  # 503 while NATS restarts: try again

        await asyncio.gather(*(lane() for _ in range(16)))

    async def terminal_count(self, conn: asyncpg.Connection) -> int:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE job_id = ANY($1)"
            " AND state IN ('succeeded', 'failed', 'cancelled')",
            self.accepted,
        )
        return count


async def run(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="trinity-soak-"))
    async with dev_stack(env=os.environ) as stack:
        soak = Soak(stack, args, logs)
        gateway = await ServiceProcess.start(
            "trinity_gateway", env=soak.env, log_path=logs / "gateway.log"
        )
        for _ in range(2):
            await soak.start_worker()
        base = f"http://127.0.0.1:{soak.port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await gateway.wait_ready(soak.port)
            upload = await client.post("/api/upload", files={"data": ("soak.csv", CSV)})
            dataset_id = upload.json()["dataset_id"]
            done = asyncio.Event()
            chaos = asyncio.create_task(soak.chaos(done))
            started = time.monotonic()
            await soak.submit(client, dataset_id)
            print(f"{len(soak.accepted)} accepted in {time.monotonic() - started:.0f} s")
            conn = await asyncpg.connect(stack.database.url)
            deadline = time.monotonic() + args.timeout_s
            terminal = 0
            while time.monotonic() < deadline:
                terminal = await soak.terminal_count(conn)
                if terminal == len(soak.accepted):
                    break
                await asyncio.sleep(2)
            done.set()
            await chaos
            summary = await conn.fetchrow(
                "SELECT"
                " count(*) FILTER (WHERE state = 'succeeded') AS succeeded,"
                " count(*) FILTER (WHERE state = 'failed') AS failed,"
                " (SELECT count(*) FROM job_results WHERE job_id = ANY($1)) AS results,"
                " (SELECT count(*) FROM (SELECT job_id FROM job_attempts"
                "   WHERE outcome = 'succeeded' AND job_id = ANY($1)"
                "   GROUP BY job_id HAVING count(*) > 1) AS twice) AS duplicated"
                " FROM jobs WHERE job_id = ANY($1)",
                soak.accepted,
            )
            await conn.close()
            assert summary is not None  # noqa: S101 - an aggregate always returns a row
        elapsed = time.monotonic() - started
        for worker in soak.workers:
            await worker.stop()
        await gateway.stop()
    accepted, lost = len(soak.accepted), len(soak.accepted) - terminal
    print(
        f"accepted {accepted}  terminal {terminal}  succeeded {summary['succeeded']}"
        f"  failed {summary['failed']}  results {summary['results']}"
        f"  duplicated {summary['duplicated']}  lost {lost}"
    )
    print(f"{soak.kills} SIGKILLs, 1 NATS restart, {elapsed:.0f} s; logs in {logs}")
    return 0 if lost == 0 and summary["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(run(parse_args())))
