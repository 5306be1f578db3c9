"""How fast Trinity accepts work, next to how fast JetStream itself stores it.

Measures, in one run on loopback:

1. the raw nats-py JetStream publish-with-ack rate: ``--concurrency`` publishers,
   each awaiting its ack, on the stream and subject the gateway publishes to;
2. the gateway's ``POST /api/analysis`` accept rate and p50/p99 latency with the
   same number of connections, driven by wrk (a Python HTTP client would be the
   bottleneck, not the gateway); no worker runs, so nothing else competes;

and prints both with their ratio. Run it with ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats

from trinity_common import broker, names
from trinity_common.devstack import dev_stack, free_port
from trinity_common.devstack.services import ServiceProcess

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"dataset_id": "%s"}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local failed = summary.errors.status + summary.errors.connect + summary.errors.timeout
  io.write(string.format("RESULT %%d %%d %%d %%f %%f\\n", summary.requests, failed,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_s: float
    p99_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def show(self, name: str) -> None:
        print(
            f"{name:<34} {self.rate:>9,.0f} /s   p50 {self.p50_s * 1000:6.2f} ms"
            f"   p99 {self.p99_s * 1000:6.2f} ms"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=20_000, help="raw publishes to time")
    parser.add_argument("--seconds", type=int, default=10, help="length of the HTTP load")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    return parser.parse_args()


async def measure_raw(url: str, count: int, concurrency: int) -> Load:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await broker.ensure_streams(js)
    payload = b'{"job_id":"0","queue":"analysis","command":{"type":"run_analysis"}}'
    subject = names.job_subject("analysis")
    latencies: list[float] = []
    remaining = iter(range(count))

    async def lane() -> None:
        for _ in remaining:
            started = time.perf_counter()
            await js.publish(subject, payload, stream=names.JOBS_STREAM)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await js.purge_stream(names.JOBS_STREAM)
    await nc.close()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Load(requests=count, seconds=elapsed, p50_s=cuts[49], p99_s=cuts[98])


async def measure_gateway(base: str, seconds: int, concurrency: int, workdir: Path) -> Load:
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
        upload = await client.post("/api/upload", files={"data": ("b.csv", b"a,b\n1,2\n")})
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % upload.json()["dataset_id"], encoding="utf-8")
    wrk = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "-s",
        str(script),
        f"{base}/api/analysis",
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await wrk.communicate()
    line = next(x for x in output.decode().splitlines() if x.startswith("RESULT"))
    requests, failed, duration_us, p50_us, p99_us = (float(v) for v in line.split()[1:])
    if failed:
        raise SystemExit(f"{failed:.0f} of {requests:.0f} requests were not accepted")
    return Load(
        requests=int(requests),
        seconds=duration_us / 1e6,
        p50_s=p50_us / 1e6,
        p99_s=p99_us / 1e6,
    )


async def main(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the HTTP load: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="trinity-bench-"))
    async with dev_stack(env=os.environ) as stack:
        raw = await measure_raw(stack.nats.url, args.publishes, args.concurrency)
        port = free_port()
        env = {
            **os.environ,
            "TRINITY_NATS_URL": stack.nats.url,
            "TRINITY_DATABASE_URL": stack.database.url,
            "TRINITY_GATEWAY_PORT": str(port),
            "TRINITY_LOG_LEVEL": "WARNING",
            "TRINITY_LOG_FORMAT": "json",
        }
        gateway = await ServiceProcess.start(
            "trinity_gateway", env=env, log_path=workdir / "gateway.log"
        )
        base = f"http://127.0.0.1:{port}"
        try:
            await gateway.wait_ready(port)
            accepted = await measure_gateway(base, args.seconds, args.concurrency, workdir)
        finally:
            await gateway.stop()
    print(f"loopback, {args.concurrency} in flight, {os.cpu_count()} cores")
    raw.show("nats-py JetStream publish+ack")
    accepted.show("gateway POST /api/analysis -> 202")
    print(f"{'accept rate / raw publish rate':<34} {accepted.rate / raw.rate:>9.3f}")


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
