"""Trinity's own services as child processes, for the demo, tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from trinity_common.devstack._process import DevStackError, answers_ok, deadline_in, wait_until

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["ServiceProcess"]

logger = logging.getLogger(__name__)


class ServiceProcess:
    """One Trinity service (``python -m <module>``) running as a child process.

    Its output goes to ``log_path``, so a failing test or demo can show it.
    """

    def __init__(self, module: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.module = module
        self.log_path = log_path
        self._process = process

    @classmethod
    async def start(cls, module: str, *, env: Mapping[str, str], log_path: Path) -> ServiceProcess:
        """Start ``python -m module`` with exactly ``env`` as its environment."""
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        logger.debug("service started", extra={"service_module": module, "pid": process.pid})
        return cls(module, process, log_path)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self._process.returncode

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child, if it still runs."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signum)

    async def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the child to exit; return its status."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), timeout=timeout_s)
        return self._process.returncode

    async def stop(self, *, grace_s: float = 20.0) -> int | None:
        """Ask the child to stop (SIGTERM); kill it if it outlasts ``grace_s``."""
        self.signal(signal.SIGTERM)
        if await self.wait(grace_s) is None:
            logger.warning(
                "service ignored SIGTERM, killing it", extra={"service_module": self.module}
            )
            await self.kill()
        return self._process.returncode

    async def kill(self) -> None:
        """Kill the child at once (SIGKILL) and reap it."""
        self.signal(signal.SIGKILL)
        await self.wait(10.0)

    async def wait_ready(
        self, port: int, *, path: str = "/health/ready", timeout_s: float = 60
    ) -> None:
        """Wait until ``GET path`` on ``port`` answers 200.

        Raises:
            DevStackError: the child exited, or was not ready in time; the
                message carries what it printed.
        """

        async def ready() -> bool:
            if self.returncode is not None:
                raise DevStackError(
                    f"{self.module} exited with {self.returncode}:\n{self.output()}"
                )
            return await answers_ok(port, path)

        try:
            await wait_until(ready, deadline=deadline_in(timeout_s), what=f"{self.module} ready")
        except DevStackError as err:
            raise DevStackError(f"{err}\n{self.output()}") from err

    def output(self) -> str:
        """Return everything the child printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")
