"""Running CPU-heavy work in killable worker processes.

A handler that crunches numbers on the event loop would starve its own
heartbeats, and JetStream would hand the job to another process while the first
still works on it. `ProcessOffloader` runs such work in a pool of separate
processes instead. Cancelling the await (the attempt's timeout, a cancel request
or shutdown) terminates the process doing the work, so a runaway computation
never outlives its attempt. Progress the function reports in the child reaches
the caller's async callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
from multiprocessing.managers import SyncManager
from typing import TYPE_CHECKING, Any, TypeVar

import pebble

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["ProcessOffloader"]

T = TypeVar("T")

# Children are spawned, never forked: a fork of a process that runs threads
# (polars, numpy and asyncpg all do) can deadlock in the child.
_SPAWN = multiprocessing.get_context("spawn")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _run_reporting(
    fn: Callable[..., T], progress_queue: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    def report(percent: float, message: str) -> None:
        progress_queue.put_nowait((percent, message))

    return fn(*args, progress=report, **kwargs)


def _bind_to_parent() -> None:
    """Make a child process answer to its parent alone, and never outlive it.

    A signal to the whole process group (a terminal's Ctrl-C, ``kill -- -pgid``,
    a supervisor stopping the group) is the parent's to act on: running work
    finishes within its shutdown grace or is handed back. So the child leaves
    the group, and ignores SIGINT besides. It still stops at once when the parent
    terminates it directly, at an attempt's deadline. If the parent is killed
    outright, the kernel kills the child too (PR_SET_PDEATHSIG, Linux), instead
    of leaving it to compute for no one.
    """
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessOffloader:
    """A pool of ``workers`` processes for synchronous, CPU-bound functions."""

    def __init__(self, *, workers: int) -> None:
        self._pool = pebble.ProcessPool(
            max_workers=workers, context=_SPAWN, initializer=_bind_to_parent
        )
        self._manager = SyncManager(ctx=_SPAWN)
        self._manager.start(_bind_to_parent)

    async def run(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        progress: Callable[[float, str], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> T:
        """Return ``fn(*args, progress=report, **kwargs)`` computed in a worker process.

        ``fn`` and its arguments must be picklable. Exceptions raised in the child
        are raised here.
        """
        progress_queue = self._manager.Queue()
        future = self._pool.schedule(_run_reporting, args=(fn, progress_queue, args, kwargs))
        relay = asyncio.create_task(_relay(progress_queue, progress))
        try:
            return await asyncio.wrap_future(future)
        finally:
            # On cancellation pebble terminates the process running the task.
            future.cancel()
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    def close(self) -> None:
        """Stop the worker processes, abandoning any work still running."""
        self._pool.stop()
        self._pool.join(timeout=5)
        self._manager.shutdown()


async def _relay(
    progress_queue: Any, progress: Callable[[float, str], Awaitable[None]] | None
) -> None:
    while True:
        try:
            percent, message = await asyncio.to_thread(progress_queue.get, True, 0.25)
        except queue.Empty:
            continue
        if progress is not None:
            await progress(percent, message)
