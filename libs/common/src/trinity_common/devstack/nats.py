"""A throwaway nats-server with JetStream, on loopback, for the demo, tests and benchmarks."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trinity_common.devstack._process import (
    DevStackError,
    answers_ok,
    is_accepting,
    kill_process,
    poll_until,
    read_tail,
    run_command,
    stop_process,
    wait_until,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["NatsServer"]

logger = logging.getLogger(__name__)

# Trinity relies on 2.11+ features (consumer filter_subjects, per-message TTL,
# consumer pause) that older servers silently ignore, so an old binary would
# pass some tests for the wrong reason. 2.12 is the version the lock pins.
_MIN_VERSION = (2, 12)
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_CLIENT_PORT = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
_MONITOR_PORT = re.compile(r"Starting http monitor on 127\.0\.0\.1:(\d+)")
_PORT_BUSY = "address already in use"

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_VERSION_TIMEOUT_S = 10.0
# Between attempts to bind a port a previous server has not released yet.
_RETRY_INTERVAL_S = 0.1
# However little of the start deadline is left, a spawned server gets this long
# to report its ports or exit: on a loaded machine the last try would otherwise
# be cut off before it could say the port was busy.
_SPAWN_GRACE_S = 5.0


class NatsServer:
    """A nats-server subprocess on 127.0.0.1 with JetStream stored in a directory.

    Create one with `start`; release it with `close`. It can also be used as an
    async context manager: ``async with await NatsServer.start() as server``.

    Attributes:
        port: The client port, picked by the server unless given to `start`.
        monitor_port: The HTTP monitoring port, picked by the server.
        store_dir: Where JetStream keeps its data; it survives `restart`.
        log_path: The server's log since it was last (re)started.
    """

    def __init__(
        self, *, binary: Path, work_dir: Path, store_dir: Path | None, timeout_s: float
    ) -> None:
        """Prepare a server; use `start`, which also launches it."""
        self._binary = binary
        self._work_dir = work_dir
        self.log_path = work_dir / "nats-server.log"
        self.store_dir = store_dir if store_dir is not None else work_dir / "store"
        # Zero until the first launch reads the real ports back from the log.
        self.port = 0
        self.monitor_port = 0
        self._timeout_s = timeout_s
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    async def start(
        cls,
        *,
        store_dir: Path | None = None,
        port: int | None = None,
        binary: str | None = None,
        timeout_s: float = _START_TIMEOUT_S,
    ) -> NatsServer:
        """Start nats-server and wait until JetStream answers.

        Args:
            store_dir: JetStream's directory; left in place by `close`. By
                default a temporary one, removed by `close`.
            port: The client port; by default the server picks a free one.
            binary: The nats-server executable; by default the one installed in
                this virtual environment, else the first on PATH.
            timeout_s: Deadline for each start or restart, in seconds.

        Raises:
            DevStackError: No suitable binary, or the server did not become
                ready in time (its log is quoted).
        """
        found = await _find_binary(binary)
        work_dir = Path(tempfile.mkdtemp(prefix="trinity-nats-"))
        server = cls(binary=found, work_dir=work_dir, store_dir=store_dir, timeout_s=timeout_s)
        try:
            await server._launch(port=port, monitor_port=None)
        except BaseException:
            await server.close()
            raise
        return server

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id, or None while it is not running."""
        if self._process is None or self._process.returncode is not None:
            return None
        return self._process.pid

    async def stop(self) -> None:
        """Stop the server with SIGTERM, or SIGKILL if it lingers; do nothing if stopped."""
        if self._process is None:
            return
        await stop_process(self._process, timeout_s=_STOP_TIMEOUT_S, name="nats-server")
        self._process = None
        logger.info("nats server stopped", extra={"port": self.port})

    async def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; do nothing if stopped."""
        if self._process is None:
            return
        await kill_process(self._process)
        self._process = None
        logger.info("nats server killed", extra={"port": self.port})

    async def restart(self) -> None:
        """Stop the server, then start it on the same ports with the same store.

        JetStream data written before the stop is there afterwards. If the old
        process still holds a port, binding is retried until the deadline.
        """
        await self.stop()
        await self._launch(port=self.port, monitor_port=self.monitor_port)

    async def close(self) -> None:
        """Stop the server and remove the temporary files it created."""
        try:
            await self.stop()
        finally:
            if self._work_dir.exists():
                await asyncio.to_thread(shutil.rmtree, self._work_dir)

    def __repr__(self) -> str:
        return f"<NatsServer port={self.port} pid={self.pid}>"

    async def __aenter__(self) -> NatsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _launch(self, *, port: int | None, monitor_port: int | None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self._timeout_s
        while (ports := await self._spawn_and_read_ports(port, monitor_port, deadline)) is None:
            if loop.time() + _RETRY_INTERVAL_S >= deadline:
                wanted = f"127.0.0.1:{port}" + (f" and :{monitor_port}" if monitor_port else "")
                raise DevStackError(
                    f"nats-server cannot bind {wanted}: {_PORT_BUSY}; stop whatever "
                    "holds it or start on another port"
                )
            await asyncio.sleep(_RETRY_INTERVAL_S)
        self.port, self.monitor_port = ports

        # Readiness in two steps: a client connecting before the port accepts
        # waits out nats-py's whole reconnect delay, and JetStream may still be
        # recovering its streams when the port opens.
        await wait_until(
            self._is_accepting,
            deadline=deadline,
            what=f"nats-server to accept connections on port {self.port}",
            log_path=self.log_path,
        )
        await wait_until(
            self._is_jetstream_healthy,
            deadline=deadline,
            what=f"nats-server /healthz on port {self.monitor_port}",
            log_path=self.log_path,
        )
        logger.info(
            "nats server started",
            extra={"port": self.port, "pid": self.pid, "duration_s": loop.time() - started},
        )

    async def _spawn_and_read_ports(
        self, port: int | None, monitor_port: int | None, deadline: float
    ) -> tuple[int, int] | None:
        """Spawn the server and return its ports, or None if a port was still busy."""
        args: list[str | Path] = [
            self._binary,
            *("-js", "-sd", self.store_dir),
            *("-a", "127.0.0.1", "-n", "trinity-dev"),
            *("-p", str(port or -1), "-m", str(monitor_port or -1)),
        ]
        # Its log goes to a file rather than a pipe: a pipe nobody drains
        # would eventually block the server.
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Keep a terminal's Ctrl-C from the server, so teardown stops it in order.
                start_new_session=True,
            )
        process = self._process
        try:
            return await poll_until(
                lambda: self._read_ports(process),
                deadline=max(deadline, asyncio.get_running_loop().time() + _SPAWN_GRACE_S),
                what="nats-server to report its ports",
                log_path=self.log_path,
            )
        except _PortBusyError:
            self._process = None
            return None

    async def _read_ports(self, process: asyncio.subprocess.Process) -> tuple[int, int] | None:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        client = _CLIENT_PORT.search(text)
        monitor = _MONITOR_PORT.search(text)
        if client is not None and monitor is not None:
            return int(client[1]), int(monitor[1])
        if process.returncode is None:
            return None

        if _PORT_BUSY in text:
            raise _PortBusyError
        raise self._exited_error(process.returncode)

    async def _is_accepting(self) -> bool:
        self._check_running()
        return await is_accepting(self.port)

    async def _is_jetstream_healthy(self) -> bool:
        self._check_running()
        return await _is_jetstream_healthy(self.monitor_port)

    def _check_running(self) -> None:
        if self._process is not None and self._process.returncode is not None:
            raise self._exited_error(self._process.returncode)

    def _exited_error(self, returncode: int) -> DevStackError:
        return DevStackError(
            f"nats-server exited with status {returncode} while starting; "
            f"its log ends:\n{read_tail(self.log_path)}"
        )


class _PortBusyError(Exception):
    """The server exited because a port it was told to use is taken."""


async def _find_binary(explicit: str | None) -> Path:
    """Return the nats-server to run, refusing one older than `_MIN_VERSION`."""
    if explicit is not None:
        binary = Path(explicit)
    else:
        # Not resolved: sys.executable is the venv's symlink to the real Python.
        beside_python = Path(sys.executable).parent / "nats-server"
        on_path = shutil.which("nats-server")
        if beside_python.is_file():
            binary = beside_python
        elif on_path is not None:
            binary = Path(on_path)
        else:
            raise DevStackError(
                "nats-server not found in the virtual environment or on PATH; run `uv sync`"
            )

    result = await run_command([binary, "--version"], timeout_s=_VERSION_TIMEOUT_S)
    match = _VERSION.search(result.output)
    if result.returncode != 0 or match is None:
        raise DevStackError(f"cannot tell the version of {binary}: {result.output.strip()!r}")
    version = tuple(int(part) for part in match.groups())
    if version[:2] < _MIN_VERSION:
        raise DevStackError(
            f"{binary} is nats-server {match[0]}, Trinity needs "
            f"{'.'.join(map(str, _MIN_VERSION))} or newer; run `uv sync` to install "
            "the pinned one into the virtual environment"
        )
    return binary


async def _is_jetstream_healthy(monitor_port: int) -> bool:
    """Return whether ``/healthz?js-enabled-only=true`` answers 200."""
    return await answers_ok(monitor_port, "/healthz?js-enabled-only=true")
