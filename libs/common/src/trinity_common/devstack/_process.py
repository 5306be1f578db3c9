"""Running server subprocesses and waiting on them, always against a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from trinity_common.errors import TrinityError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from pathlib import Path

__all__ = [
    "POLL_INTERVAL_S",
    "CommandResult",
    "DevStackError",
    "deadline_in",
    "free_port",
    "is_accepting",
    "kill_process",
    "poll_until",
    "read_tail",
    "run_command",
    "stop_process",
    "wait_until",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Readiness is usually a matter of milliseconds, so poll often; the deadline,
# not the interval, bounds the wait.
POLL_INTERVAL_S = 0.01


class DevStackError(TrinityError):
    """A development server could not be found, started or stopped."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process may take it in
    between; callers that can should let the server pick its own port instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def deadline_in(timeout_s: float) -> float:
    """Return the event loop time ``timeout_s`` seconds from now."""
    return asyncio.get_running_loop().time() + timeout_s


async def poll_until(
    check: Callable[[], Awaitable[_T | None]],
    *,
    deadline: float,
    what: str,
    log_path: Path | None = None,
) -> _T:
    """Call ``check`` until it returns something other than None, or fail at ``deadline``.

    Args:
        check: Returns None for "not yet"; may raise to give up early.
        deadline: Event loop time by which ``check`` must succeed.
        what: What is awaited, for the error message.
        log_path: A server log to quote the end of if the deadline passes.

    Raises:
        DevStackError: ``deadline`` passed first.
    """
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                result = await check()
                if result is not None:
                    return result
                await asyncio.sleep(POLL_INTERVAL_S)
    except TimeoutError as err:
        log = f"; its log ends:\n{read_tail(log_path)}" if log_path is not None else ""
        raise DevStackError(f"timed out waiting for {what}{log}") from err


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    *,
    deadline: float,
    what: str,
    log_path: Path | None = None,
) -> None:
    """Call ``predicate`` until it returns True, or fail at ``deadline``, as `poll_until`."""

    async def check() -> bool | None:
        return await predicate() or None

    await poll_until(check, deadline=deadline, what=what, log_path=log_path)


async def is_accepting(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def answers_ok(port: int, path: str) -> bool:
    """Return whether ``GET path`` on 127.0.0.1:``port`` answers 200.

    A bare HTTP/1.0 exchange: enough for a readiness check, and it keeps an
    HTTP client library out of the runtime package.
    """
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
    except OSError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server may close first; nothing to flush
            await writer.wait_closed()
    return status_line.split()[1:2] == [b"200"]


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """How a short-lived command ended."""

    returncode: int
    output: str


async def run_command(
    args: Sequence[str | Path], *, timeout_s: float, cwd: Path | None = None
) -> CommandResult:
    """Run a short-lived command to completion, its stdout and stderr merged.

    Raises:
        DevStackError: The command could not be run, or outlived ``timeout_s``
            (it is killed first).
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as err:
        raise DevStackError(f"cannot run {args[0]}: {err}") from err
    try:
        async with asyncio.timeout(timeout_s):
            output, _ = await process.communicate()
    except TimeoutError as err:
        await kill_process(process)
        raise DevStackError(f"{args[0]} did not finish within {timeout_s:g} s") from err
    returncode = await process.wait()  # already exited: communicate() saw its pipes close
    return CommandResult(returncode=returncode, output=output.decode("utf-8", errors="replace"))


async def kill_process(process: asyncio.subprocess.Process, *, timeout_s: float = 10.0) -> None:
    """Send SIGKILL to ``process`` unless it has ended, and wait for it to be reaped."""
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        process.kill()
    try:
        async with asyncio.timeout(timeout_s):
            await process.wait()
    except TimeoutError as err:
        raise DevStackError(f"process {process.pid} survived SIGKILL for {timeout_s:g} s") from err


async def stop_process(process: asyncio.subprocess.Process, *, timeout_s: float, name: str) -> None:
    """Stop ``process`` with SIGTERM; send SIGKILL if it outlives ``timeout_s``."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        async with asyncio.timeout(timeout_s):
            await process.wait()
    except TimeoutError:
        logger.warning(
            "server slow to stop, killing it",
            extra={"server": name, "pid": process.pid, "timeout_s": timeout_s},
        )
        await kill_process(process)


def read_tail(path: Path, *, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
