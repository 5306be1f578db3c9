"""Settings shared by every Trinity service, and the loader all settings use.

A settings struct is built once at start-up from an environment mapping passed
in by the caller; nothing else in Trinity reads ``os.environ``. Field ``foo_bar``
is read from ``TRINITY_FOO_BAR``. A malformed value stops start-up with an error
naming the variable.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import msgspec

from trinity_common.errors import TrinityError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["ConnectionSettings", "SettingsError", "load_settings", "settings_or_exit"]

ENV_PREFIX = "TRINITY_"

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


class SettingsError(TrinityError):
    """A configuration variable is missing or malformed."""


class ConnectionSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Where the shared servers are, and how the process logs."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server(s) to connect to; a comma-separated list for a cluster."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/trinity"
    """PostgreSQL connection URL."""

    database_pool_max: Annotated[int, msgspec.Meta(ge=1, le=200)] = 10
    """Most connections one process holds open to PostgreSQL."""

    database_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    """Longest a query, or the wait for a pooled connection, may take."""

    nats_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """Longest a JetStream request (such as waiting for a publish ack) may take."""

    nats_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Copies JetStream keeps of each stream; 3 on a production cluster."""

    queue_max_jobs: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """Jobs one queue holds before new submissions are refused with 503."""

    log_format: Literal["auto", "json", "text"] = "auto"
    """``json`` lines for containers, ``text`` for people; ``auto`` picks by terminal."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe level that is logged."""

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs as a list."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


def load_settings(cls: type[S], env: Mapping[str, str]) -> S:
    """Build settings of type ``cls`` from ``TRINITY_*`` variables in ``env``.

    Raises:
        SettingsError: a variable is malformed; the message names it.
    """
    fields = {f.name for f in msgspec.structs.fields(cls)}
    values = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields
    }
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as err:
        raise SettingsError(f"invalid configuration: {_name_variable(str(err))}") from err


def settings_or_exit(program: str, load: Callable[[], T]) -> T:
    """Return ``load()``; if a setting is malformed, end the process at once.

    The process exits with status 2 and one line on stderr naming the variable,
    before anything connects anywhere and before logging is set up.
    """
    try:
        return load()
    except SettingsError as err:
        print(f"{program}: {err}", file=sys.stderr)  # noqa: T201 - logging is not set up yet
        sys.exit(2)


def _name_variable(message: str) -> str:
    # msgspec says "... - at `$.nats_timeout_s`"; say which variable that is.
    head, sep, path = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{head} - in {ENV_PREFIX}{path.rstrip('`').split('.')[0].split('[')[0].upper()}"
