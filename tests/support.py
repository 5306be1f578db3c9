"""Helpers the tests share: waiting with a deadline, reading jobs over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import httpx

T = TypeVar("T")

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str, every_s: float = 0.1
) -> T:
    """Return the first non-None result of ``check``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last is not None:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def wait_for_job(
    client: httpx.AsyncClient, job_id: str, *, states: frozenset[str] = TERMINAL, timeout_s: float
) -> dict[str, Any]:
    """Poll a job's status document until its state is one of ``states``."""

    async def check() -> dict[str, Any] | None:
        response = await client.get(f"/api/jobs/{job_id}")
        if response.status_code != 200:
            return None
        job: dict[str, Any] = response.json()
        return job if job["state"] in states else None

    return await eventually(check, timeout_s=timeout_s, what=f"job {job_id} to reach {set(states)}")
