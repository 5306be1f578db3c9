"""Logging set-up: JSON lines in containers, readable text in a terminal.

Job fields (``job_id``, ``queue``, ``attempt``...) are bound once per message with
`bind_job_context` and stamped on every record logged while it runs, so handlers
log plain events and still say which job they were about.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["bind_job_context", "configure_logging"]

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "trinity_log_context", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


@contextlib.contextmanager
def bind_job_context(**fields: Any) -> Iterator[None]:
    """Stamp ``fields`` on every record logged in this context (and its tasks)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
    return {**(_context.get() or {}), **extra}


class _JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "event": record.getMessage(),
            **_fields_of(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(line).decode()


class _TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields_of(record)
        if not fields:
            return text
        return text + " " + " ".join(f"{key}={value}" for key, value in fields.items())


def configure_logging(
    *,
    service: str,
    level: str = "INFO",
    log_format: Literal["auto", "json", "text"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Send every log record to ``stream`` (stdout by default) in the chosen format."""
    stream = stream or sys.stdout
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    formatter = _JsonFormatter if log_format == "json" else _TextFormatter
    handler.setFormatter(formatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs every reconnect attempt at ERROR; our own lines say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
