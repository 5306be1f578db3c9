"""Trinity's main job, end to end, on real data: ``make demo``.

Starts NATS, PostgreSQL (or uses one that answers), the gateway and the analysis
service as separate processes; uploads a dataset (Palmer penguins unless
``--dataset`` names another file); queues its analysis, with the analysis options
``--options`` gives as a JSON object; follows the job live to its end; prints the
profile; then stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import palmerpenguins

from trinity_common.commands import AnalysisOptions
from trinity_common.devstack import dev_stack, free_port
from trinity_common.devstack.services import ServiceProcess

PENGUINS = Path(palmerpenguins.__file__).parent / "data" / "penguins.csv"
TERMINAL = {"succeeded", "failed", "cancelled"}
OPTIONS_HINT = (
    """set analysis options with make demo OPTIONS='{"encoding": "cp1252"}' (or --options)"""
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # `make demo DATASET=... OPTIONS=...` passes them in the environment.
    parser.add_argument(
        "--dataset",
        type=Path,
        default=os.environ.get("TRINITY_DEMO_DATASET") or PENGUINS,
        help="file to profile (default: $TRINITY_DEMO_DATASET, else the Palmer penguins)",
    )
    parser.add_argument(
        "--options",
        type=analysis_options,
        default=os.environ.get("TRINITY_DEMO_OPTIONS") or "{}",
        help='analysis options as a JSON object, such as \'{"encoding": "cp1252"}\''
        " (default: $TRINITY_DEMO_OPTIONS)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job")
    parser.add_argument(
        "--keep", action="store_true", help="keep everything running until Ctrl-C, to explore"
    )
    return parser.parse_args()


def analysis_options(text: str) -> dict[str, Any]:
    """Return ``text`` as a JSON object of analysis options, checked as the gateway checks it.

    Checked here so a typo stops the demo at once, before any server starts.
    """
    try:
        options = msgspec.json.decode(text, type=dict[str, Any])
    except msgspec.DecodeError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object ({err}); write one such as "
            """'{"encoding": "cp1252"}', in single quotes for the shell"""
        ) from err
    try:
        msgspec.convert(options, AnalysisOptions)
    except msgspec.ValidationError as err:
        raise argparse.ArgumentTypeError(f"{err} (README.md lists the options)") from err
    return options


def draw_progress(job: dict[str, Any]) -> None:
    percent = job["progress"]["percent"]
    filled = int(percent / 100 * 30)
    bar = "#" * filled + "-" * (30 - filled)
    line = (
        f"\r  [{bar}] {percent:5.1f}%  {job['state']:<9} attempt {job['attempt']}/"
        f"{job['max_attempts']}  {job['progress']['message'][:40]:<40}"
    )
    sys.stdout.write(line)
    sys.stdout.flush()


async def follow(client: httpx.AsyncClient, status_url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(status_url)).json()
        draw_progress(job)
        if job["state"] in TERMINAL:
            sys.stdout.write("\n")
            return job
        await asyncio.sleep(0.2)
    sys.stdout.write("\n")
    raise SystemExit(f"the job did not finish within {timeout_s:g} s; last status: {job}")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_profile(profile: dict[str, Any]) -> None:
    print(
        f"\n  {profile['row_count']} rows x {profile['column_count']} columns"
        f"  ({profile.get('format', '?')}, {profile.get('encoding', '?')},"
        f" delimiter {profile.get('delimiter')!r}, header {profile.get('has_header')})\n"
    )
    print(f"  {'column':<22} {'kind':<9} {'missing':>7} {'distinct':>8}  summary")
    for column in profile["columns"]:
        numeric = column.get("numeric")
        if numeric:
            summary = (
                f"min {fmt(numeric['min'])}  mean {fmt(numeric['mean'])}"
                f"  max {fmt(numeric['max'])}  std {fmt(numeric['std'])}"
            )
        else:
            top = column.get("top_values") or []
            summary = ", ".join(f"{t['value']} ({t['count']})" for t in top[:3])
        print(
            f"  {column['name'][:22]:<22} {column['kind']:<9} {column['missing']:>7}"
            f" {column['distinct']:>8}  {summary}"
        )
    print_correlations(profile.get("correlations"))


def print_correlations(correlations: dict[str, Any] | None) -> None:
    if not correlations or len(correlations["columns"]) < 2:
        return
    names, matrix = correlations["columns"], correlations["matrix"]
    pairs = [
        (abs(matrix[i][j]), matrix[i][j], names[i], names[j])
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if matrix[i][j] is not None
    ]
    if not pairs:
        return  # fewer than two numeric columns, or too few rows to correlate
    print("\n  strongest correlations (Pearson):")
    for _, r, a, b in sorted(pairs, reverse=True)[:5]:
        print(f"    {a} ~ {b}: {r:+.3f}")


async def run(args: argparse.Namespace) -> int:
    dataset: Path = args.dataset
    workdir = Path(tempfile.mkdtemp(prefix="trinity-demo-"))
    async with dev_stack(env=os.environ) as stack:
        port = free_port()
        env = {
            **os.environ,
            "TRINITY_NATS_URL": stack.nats.url,
            "TRINITY_DATABASE_URL": stack.database.url,
            "TRINITY_GATEWAY_PORT": str(port),
            "TRINITY_LOG_FORMAT": "json",
        }
        print(f"NATS {stack.nats.url}  PostgreSQL {stack.database.url}")
        gateway = await ServiceProcess.start(
            "trinity_gateway", env=env, log_path=workdir / "gateway.log"
        )
        analysis = await ServiceProcess.start(
            "trinity_analysis", env=env, log_path=workdir / "analysis.log"
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
                await gateway.wait_ready(port)
                status = await profile_file(
                    client, base, dataset, args.timeout, options=args.options, keep=args.keep
                )
                if args.keep:
                    print("\nrunning until Ctrl-C ...")
                    await wait_for_interrupt()
                return status
        finally:
            for service in (analysis, gateway):
                await service.stop()
            print(f"\nservice logs: {workdir}")


async def wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def profile_file(
    client: httpx.AsyncClient,
    base: str,
    dataset: Path,
    timeout_s: float,
    *,
    options: dict[str, Any],
    keep: bool,
) -> int:
    upload = await upload_file(client, base, dataset)
    if upload is None:
        return 1
    response = await client.post(
        "/api/analysis", json={"dataset_id": upload["dataset_id"], "options": options}
    )
    if response.status_code != 202:
        print(f"analysis refused: {response.status_code} {response.text}", file=sys.stderr)
        return 1
    job_url = response.json()["status_url"]
    with_options = f" with options {json.dumps(options)}" if options else ""
    print(f"job {response.json()['job_id']} queued{with_options}")
    job = await follow(client, job_url, timeout_s)
    if job["state"] != "succeeded":
        print(f"job {job['state']}: {job['error']}", file=sys.stderr)
        if "options." in str(job["error"]):
            print(OPTIONS_HINT, file=sys.stderr)
        return 1
    profile = (await client.get(job["result"]["url"])).json()["profile"]
    print_profile(profile)
    print("\nlook at:" if keep else "\nlook at (with KEEP=1 they stay up until Ctrl-C):")
    for path in (job_url, job["result"]["url"], upload["dataset"]["url"], "/schema"):
        print(f"  {base}{path}")
    return 0


async def upload_file(client: httpx.AsyncClient, base: str, dataset: Path) -> dict[str, Any] | None:
    content = await asyncio.to_thread(dataset.read_bytes)
    print(f"uploading {dataset.name} ({len(content):,} bytes) to {base}")
    response = await client.post("/api/upload", files={"data": (dataset.name, content)})
    if response.status_code != 201:
        print(f"upload refused: {response.status_code} {response.text}", file=sys.stderr)
        return None
    upload: dict[str, Any] = response.json()
    print(f"dataset {upload['dataset_id']} stored")
    return upload


def main() -> None:
    args = parse_args()
    if not args.dataset.is_file():
        sys.exit(f"no such file: {args.dataset}")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
