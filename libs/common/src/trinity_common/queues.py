"""The queue catalogue: the one place that says how each queue behaves.

Every limit a worker, a consumer or the gateway applies to a queue comes from a
`QueueSettings` built here. A deployment overrides any field through
``TRINITY_QUEUE_<QUEUE>_<FIELD>`` variables, validated when the service starts.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from trinity_common.names import dead_subject, job_subject, status_subject
from trinity_common.settings import ConnectionSettings, SettingsError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["QUEUES", "QueueName", "QueueSettings", "load_all_queue_settings", "load_queue_settings"]

QueueName = Literal["analysis", "retraining", "reports", "email", "notifications"]
"""The name of a queue in the catalogue."""

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class QueueSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Limits and timings of one work queue."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,24}$")]
    """Queue name; also the durable consumer's name."""

    timeout_s: PositiveSeconds
    """Longest one attempt may run before it is cancelled and counted as failed."""

    retries: Annotated[int, msgspec.Meta(ge=0, le=100)]
    """Attempts after the first; the consumer's max deliveries is ``retries + 1``."""

    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 2
    """Jobs one service process runs at once; it fetches no more than it can start."""

    backoff_base_s: PositiveSeconds = 2.0
    """Delay before the second attempt; each later one doubles it."""

    backoff_max_s: PositiveSeconds = 300.0
    """Cap on the delay between attempts."""

    ack_margin_s: PositiveSeconds = 30.0
    """Time beyond ``timeout_s`` before JetStream redelivers an unacknowledged job."""

    @property
    def subject(self) -> str:
        """The work subject jobs of this queue are published on."""
        return job_subject(self.name)

    @property
    def status_subject(self) -> str:
        """The subject this queue's status events are published on."""
        return status_subject(self.name)

    @property
    def dead_subject(self) -> str:
        """The subject this queue's dead letters are published on."""
        return dead_subject(self.name)

    @property
    def durable(self) -> str:
        """The durable pull consumer's name."""
        return self.name

    @property
    def max_attempts(self) -> int:
        """Deliveries before the job is failed and dead-lettered."""
        return self.retries + 1

    @property
    def ack_wait_s(self) -> float:
        """How long JetStream waits for an ack or a heartbeat before redelivering."""
        return self.timeout_s + self.ack_margin_s

    @property
    def heartbeat_s(self) -> float:
        """How often a running job tells JetStream and the status stream it is alive."""
        return max(0.5, min(5.0, self.ack_wait_s / 6))

    def backoff_s(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Return the delay before the attempt after ``attempt``, with jitter.

        The delay grows as ``base * 2**(attempt-1)``, capped at ``backoff_max_s``;
        the jitter draws uniformly from the upper half of that, so attempts are
        never back to back yet do not stampede together.
        """
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, attempt - 1))
        return (rng or random).uniform(ceiling / 2, ceiling)


QUEUES: Mapping[str, QueueSettings] = {
    q.name: q
    for q in (
        QueueSettings(name="analysis", timeout_s=120, retries=3),
        QueueSettings(name="retraining", timeout_s=180, retries=2, concurrency=1),
        QueueSettings(name="reports", timeout_s=20, retries=2),
        QueueSettings(name="email", timeout_s=10, retries=5, concurrency=8),
        QueueSettings(name="notifications", timeout_s=15, retries=3, concurrency=8),
    )
}
"""Default settings of every queue, by name."""


def load_queue_settings(name: str, env: Mapping[str, str]) -> QueueSettings:
    """Return the settings of queue ``name`` with overrides from ``env`` applied.

    Raises:
        KeyError: ``name`` is not a known queue.
        SettingsError: an override is malformed or unknown; the message names it.
    """
    _refuse_unknown_queues(env)
    defaults = msgspec.structs.asdict(QUEUES[name])
    prefix = f"TRINITY_QUEUE_{name.upper()}_"
    overrides = {
        key[len(prefix) :].lower(): value for key, value in env.items() if key.startswith(prefix)
    }
    for field in overrides:
        if field == "name" or field not in defaults:
            # The name ties a queue to its subject and consumer; it is not a limit.
            raise SettingsError(f"{prefix}{field.upper()} is not a setting of a queue")
    try:
        return msgspec.convert({**defaults, **overrides}, QueueSettings, strict=False)
    except msgspec.ValidationError as err:
        field = str(err).rpartition("$.")[2].rstrip("`")
        raise SettingsError(f"invalid {prefix}{field.upper()}: {err}") from err


def load_all_queue_settings(env: Mapping[str, str]) -> dict[str, QueueSettings]:
    """Return the settings of every queue in the catalogue, by name.

    Every process validates them all, not only its own queue's: deployments
    share one configuration, and a mistake in it should stop whatever reads it.

    Raises:
        SettingsError: an override is malformed or unknown; the message names it.
    """
    return {name: load_queue_settings(name, env) for name in QUEUES}


def _refuse_unknown_queues(env: Mapping[str, str]) -> None:
    # A misspelt queue name would otherwise leave the intended queue on its
    # defaults without a word. Settings of their own that merely start with
    # "queue_" (such as TRINITY_QUEUE_MAX_JOBS) are not overrides.
    own = {f"TRINITY_{f.name.upper()}" for f in msgspec.structs.fields(ConnectionSettings)}
    known = tuple(f"TRINITY_QUEUE_{queue.upper()}_" for queue in QUEUES)
    for key in sorted(env):
        if key.startswith("TRINITY_QUEUE_") and key not in own and not key.startswith(known):
            raise SettingsError(f"{key} names no queue; the queues are {', '.join(QUEUES)}")
