"""Fixtures the end-to-end tests share."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
import pytest

from tests.e2e.sleeper import SLEEPER_TABLES

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trinity_common.devstack import Database


@pytest.fixture
async def db(database: Database) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's database, with the sleeper's tables created."""
    pool = await asyncpg.create_pool(database.url, min_size=1, max_size=2)
    await pool.execute(SLEEPER_TABLES)
    yield pool
    await pool.close()
