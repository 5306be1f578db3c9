"""Analysis options a job could never run with are refused when it is submitted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.testing import AsyncTestClient


@pytest.mark.parametrize(
    ("encoding", "reason"),
    [
        ("idna", "decoding with 'idna' codec failed (UnicodeError: Unsupported error handling"),
        ("undefined", "decoding with 'undefined' codec failed (UnicodeError: undefined encoding)"),
    ],
    ids=["idna", "undefined"],
)
async def test_submit_refuses_encoding_that_cannot_decode_a_file(
    client: AsyncTestClient[Litestar], dataset_id: str, encoding: str, reason: str
) -> None:
    """Python knows these codecs, but every attempt would fail; a 202 would mean a dead letter."""
    body = {"dataset_id": dataset_id, "options": {"encoding": encoding}}

    response = await client.post("/api/analysis", json=body)
    jobs = (await client.get("/api/jobs")).json()

    assert response.status_code == 400
    problem = response.json()
    assert problem["status"] == 400
    assert [p["field"] for p in problem["problems"]] == ["options.encoding"]
    message = problem["problems"][0]["message"]
    assert message.startswith(f"options.encoding '{encoding}' cannot decode a file ({reason}")
    assert message.endswith("; use a text encoding such as 'utf-8', 'cp1252' or 'latin-1'")
    assert message in problem["detail"]
    assert jobs["items"] == []
