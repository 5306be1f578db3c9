"""The exceptions every Trinity component raises and catches.

They are branched by what the catcher must do, not by where they come from:

- `InvalidJobError`: the client sent something wrong; the gateway answers 4xx.
- `PermanentJobError`: the job cannot succeed however often it runs; the worker
  fails it at once, with no further attempts.
- `RetryableJobError`: the attempt failed for a passing reason; the worker retries
  it, after `delay_s` when given, else after the queue's backoff.

Any other exception escaping a handler is treated as retryable.
"""

from __future__ import annotations

__all__ = [
    "InvalidJobError",
    "PermanentJobError",
    "RetryableJobError",
    "TrinityError",
]


class TrinityError(Exception):
    """Root of every error Trinity raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJobError(TrinityError):
    """The request names something that does not exist or cannot be accepted."""


class PermanentJobError(TrinityError):
    """The job cannot succeed; retrying it would only repeat the failure.

    Args:
        message: What was wrong, in words a user can act on.
        error_type: A short stable code for the kind of failure, such as
            ``encoding`` or ``empty_file``; clients may branch on it.
    """

    def __init__(self, message: str, *, error_type: str = "permanent") -> None:
        super().__init__(message)
        self.error_type = error_type


class RetryableJobError(TrinityError):
    """The attempt failed for a reason that may pass.

    Args:
        message: What went wrong.
        delay_s: Seconds to wait before the next attempt; the queue's backoff
            applies when this is None.
    """

    def __init__(self, message: str, *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s
