"""The queue catalogue: its defaults, its environment overrides, and its backoff policy."""

from __future__ import annotations

import random

import msgspec
import pytest

from trinity_common.queues import QUEUES, load_queue_settings
from trinity_common.settings import SettingsError


class LowestDraw(random.Random):
    """A generator that always draws 0.0, so a jittered delay comes out at its least."""

    def random(self) -> float:
        return 0.0


def test_catalogue_defaults_match_the_documented_queues() -> None:
    defaults = {name: (queue.timeout_s, queue.retries) for name, queue in QUEUES.items()}

    assert defaults == {
        "analysis": (120, 3),
        "retraining": (180, 2),
        "reports": (20, 2),
        "email": (10, 5),
        "notifications": (15, 3),
    }


def test_load_queue_settings_applies_overrides_of_its_own_queue() -> None:
    env = {
        "TRINITY_QUEUE_ANALYSIS_TIMEOUT_S": "45",
        "TRINITY_QUEUE_ANALYSIS_RETRIES": "7",
        "TRINITY_QUEUE_ANALYSIS_BACKOFF_MAX_S": "60.5",
        "TRINITY_QUEUE_REPORTS_TIMEOUT_S": "99",
        "TRINITY_NATS_URL": "nats://127.0.0.1:4222",
    }

    settings = load_queue_settings("analysis", env)

    expected = msgspec.structs.replace(
        QUEUES["analysis"], timeout_s=45.0, retries=7, backoff_max_s=60.5
    )
    assert settings == expected


@pytest.mark.parametrize(
    "variable", ["TRINITY_QUEUE_NOPE_RETRIES", "TRINITY_QUEUE_ANALYSES_TIMEOUT_S"]
)
def test_load_queue_settings_refuses_an_override_naming_no_queue(variable: str) -> None:
    with pytest.raises(
        SettingsError, match=rf"^{variable} names no queue; the queues are analysis"
    ):
        load_queue_settings("analysis", {variable: "1"})


def test_load_queue_settings_leaves_settings_that_merely_start_with_queue_alone() -> None:
    settings = load_queue_settings("analysis", {"TRINITY_QUEUE_MAX_JOBS": "3"})

    assert settings == QUEUES["analysis"]


def test_load_queue_settings_returns_defaults_without_overrides() -> None:
    settings = load_queue_settings("email", {"TRINITY_QUEUE_ANALYSIS_RETRIES": "9"})

    assert settings == QUEUES["email"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRINITY_QUEUE_ANALYSIS_TIMEOUT_S", "soon"),
        ("TRINITY_QUEUE_ANALYSIS_RETRIES", "-1"),
        ("TRINITY_QUEUE_ANALYSIS_TIMEOUT", "45"),
    ],
    ids=["not-a-number", "out-of-range", "unknown-field"],
)
def test_load_queue_settings_rejects_malformed_override_naming_its_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_queue_settings("analysis", {variable: value})

    assert variable in str(caught.value)


def test_load_queue_settings_refuses_to_rename_the_queue() -> None:
    """The name is the queue's identity: its subjects and its durable consumer derive from it."""
    env = {"TRINITY_QUEUE_ANALYSIS_NAME": "reports"}

    with pytest.raises(SettingsError) as caught:
        load_queue_settings("analysis", env)

    assert "TRINITY_QUEUE_ANALYSIS_NAME" in str(caught.value)


def test_load_queue_settings_rejects_unknown_queue() -> None:
    with pytest.raises(KeyError, match="billing"):
        load_queue_settings("billing", {})


def test_backoff_doubles_with_each_attempt_until_capped() -> None:
    queue = msgspec.structs.replace(QUEUES["analysis"], backoff_base_s=2.0, backoff_max_s=300.0)

    least = [queue.backoff_s(attempt, rng=LowestDraw()) for attempt in range(1, 11)]

    assert least == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 150.0, 150.0]


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 2.0), (4, 16.0), (9, 300.0), (101, 300.0)])
def test_backoff_draws_from_upper_half_of_its_ceiling(attempt: int, ceiling: float) -> None:
    queue = msgspec.structs.replace(QUEUES["analysis"], backoff_base_s=2.0, backoff_max_s=300.0)
    rng = random.Random(attempt)  # noqa: S311 - a seeded draw to test jitter, not a secret

    delays = [queue.backoff_s(attempt, rng=rng) for _ in range(1000)]

    assert ceiling / 2 <= min(delays) < ceiling * 0.55
    assert ceiling * 0.95 < max(delays) <= ceiling
