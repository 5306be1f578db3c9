"""A throwaway PostgreSQL cluster made from the local binaries with initdb and pg_ctl."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from trinity_common.devstack._process import (
    DevStackError,
    free_port,
    read_tail,
    run_command,
    wait_until,
)

if TYPE_CHECKING:
    from trinity_common.devstack._process import CommandResult

__all__ = ["CONNECT_ERRORS", "SUPERUSER", "LocalCluster", "is_answering"]

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"

# What a connection attempt raises when the server is down, slow, or says no.
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

_PACKAGED_BINARIES = Path("/usr/lib/postgresql")
_PROBE_TIMEOUT_S = 2.0
_INITDB_TIMEOUT_S = 120.0
# pg_ctl's own wait for a fast shutdown, and ours for pg_ctl, a little longer.
_PG_CTL_STOP_WAIT_S = 20
_STOP_TIMEOUT_S = 30.0

# Appended to the cluster's postgresql.conf rather than passed on pg_ctl's
# command line, which pg_ctl hands to a shell. Durability is traded for speed:
# the cluster is thrown away after the run, crash or not.
_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
"""


@dataclass(kw_only=True)
class LocalCluster:
    """A throwaway cluster's files and postmaster, all under ``root_dir``."""

    bindir: Path
    root_dir: Path
    run_as: tuple[str, ...]
    port: int
    pid: int | None = None

    @classmethod
    async def start(cls, *, bindir: Path | None, deadline: float) -> LocalCluster:
        """Create a cluster in a new temporary directory and start it by ``deadline``."""
        cluster = cls(
            bindir=bindir if bindir is not None else await _find_bindir(),
            root_dir=Path(tempfile.mkdtemp(prefix="trinity-pg-")),
            run_as=_run_as_prefix(),
            port=free_port(),
        )
        try:
            await cluster._initialise()
            await cluster._launch(deadline)
        except BaseException:
            await cluster.shut_down()
            raise
        return cluster

    @property
    def url(self) -> str:
        """The maintenance URL, as the superuser on database ``postgres``."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.root_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server log, written by the postmaster."""
        return self.root_dir / "postgres.log"

    async def shut_down(self) -> None:
        """Stop the postmaster if it runs, then remove every file of the cluster."""
        if self.pid is not None:
            await self._stop_postmaster(self.pid)
            self.pid = None
        if self.root_dir.exists():
            await asyncio.to_thread(shutil.rmtree, self.root_dir)

    async def _initialise(self) -> None:
        if self.run_as:
            shutil.chown(self.root_dir, user=SUPERUSER)
        initdb = await self._run(
            "initdb",
            *("-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust"),
            *("-E", "UTF8", "--no-locale", "--no-sync"),
            timeout_s=_INITDB_TIMEOUT_S,
        )
        if initdb.returncode != 0:
            raise DevStackError(f"initdb failed:\n{initdb.output.strip()}")
        settings = _SETTINGS.format(port=self.port, socket_dir=self.root_dir)
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(settings)

    async def _launch(self, deadline: float) -> None:
        remaining_s = max(deadline - asyncio.get_running_loop().time(), 1.0)
        pg_ctl = await self._run(
            "pg_ctl",
            *("start", "-D", str(self.data_dir), "-l", str(self.log_path)),
            *("-w", "-t", str(int(remaining_s)), "-s"),
            timeout_s=remaining_s + 5.0,
        )
        if pg_ctl.returncode != 0:
            raise DevStackError(
                f"pg_ctl could not start PostgreSQL on port {self.port}; "
                f"its log ends:\n{read_tail(self.log_path)}"
            )
        # The first line of postmaster.pid is the postmaster's pid: pg_ctl (and
        # runuser) were only its launchers and have exited.
        pid_line = (self.data_dir / "postmaster.pid").read_text(encoding="ascii").split()[0]
        self.pid = int(pid_line)
        await wait_until(
            lambda: is_answering(self.url, timeout_s=_PROBE_TIMEOUT_S),
            deadline=deadline,
            what=f"PostgreSQL to accept connections on port {self.port}",
            log_path=self.log_path,
        )

    async def _stop_postmaster(self, pid: int) -> None:
        # A test may have paused it with SIGSTOP; a paused postmaster would
        # never act on pg_ctl's shutdown request.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        try:
            result = await self._run(
                "pg_ctl",
                *("stop", "-D", str(self.data_dir), "-m", "fast"),
                *("-w", "-t", str(_PG_CTL_STOP_WAIT_S), "-s"),
                timeout_s=_STOP_TIMEOUT_S,
            )
            failure = result.output.strip() if result.returncode != 0 else None
        except DevStackError as err:
            failure = str(err)
        if failure is None:
            logger.info("postgres cluster stopped", extra={"port": self.port})
            return

        logger.warning(
            "postgres cluster did not stop, killing it",
            extra={"port": self.port, "pid": pid, "output": failure},
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def _run(self, program: str, *args: str, timeout_s: float) -> CommandResult:
        return await run_command(
            [*self.run_as, self.bindir / program, *args], timeout_s=timeout_s, cwd=self.root_dir
        )


async def is_answering(url: str, *, timeout_s: float) -> bool:
    """Return whether the server at ``url`` lets us connect."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout_s)
    except CONNECT_ERRORS:
        return False
    await conn.close()
    return True


async def _find_bindir() -> Path:
    """Return the directory of the highest installed PostgreSQL's server binaries."""
    installed = _packaged_bindirs()
    if installed:
        return max(installed, key=lambda bindir: _version_key(bindir.parent.name))

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = await run_command([pg_config, "--bindir"], timeout_s=_PROBE_TIMEOUT_S)
        bindir = Path(result.output.strip())
        if result.returncode == 0 and (bindir / "initdb").is_file():
            return bindir
    raise DevStackError(
        "no PostgreSQL server binaries (initdb) found; install PostgreSQL, or set "
        "TRINITY_DATABASE_URL to a running server"
    )


def _packaged_bindirs() -> list[Path]:
    """Return Debian's per-version binary directories, /usr/lib/postgresql/<ver>/bin."""
    return [
        initdb.parent
        for initdb in _PACKAGED_BINARIES.glob("*/bin/initdb")
        if initdb.parent.parent.name.replace(".", "").isdigit()
    ]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _run_as_prefix() -> tuple[str, ...]:
    """Return the command prefix that runs PostgreSQL's binaries as a non-root user."""
    if os.geteuid() != 0:
        return ()
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    if not Path(runuser).is_file():
        raise DevStackError("running as root, but runuser is missing to drop to user postgres")
    return (runuser, "-u", SUPERUSER, "--")
