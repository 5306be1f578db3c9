"""Analysis results: the full profile of a finished analysis job."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import nats.errors
from litestar import Controller, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import PathParameter

from trinity_common import broker, names
from trinity_common.client import BrokerUnavailableError
from trinity_gateway.problems import problem_spec
from trinity_gateway.schemas import AnalysisResponse

__all__ = ["AnalysisController"]

JobId = Annotated[str, PathParameter(pattern=r"^[0-9a-f]{32}$", description="The job's id.")]


async def _read_stored(state: State, object_name: str) -> dict[str, Any]:
    try:
        store = await state.js.object_store(names.RESULTS_BUCKET)
        data = await broker.read_object(store, object_name)
    except nats.errors.Error as err:
        raise BrokerUnavailableError("the result store did not answer") from err
    profile: dict[str, Any] = msgspec.json.decode(data or b"{}")
    return profile


class AnalysisController(Controller):
    """The results of analysis jobs."""

    path = "/api/analyses"
    tags = ["jobs"]  # noqa: RUF012 - Litestar reads it as a class attribute

    @get("/{job_id:str}", responses={404: problem_spec("no finished analysis with that job id")})
    async def get_analysis(self, state: State, job_id: JobId) -> AnalysisResponse:
        """Return the full profile an analysis job produced."""
        row = await state.pool.fetchrow(
            "SELECT r.result, r.object_name, j.command FROM job_results r"
            " JOIN jobs j USING (job_id) WHERE r.job_id = $1 AND r.queue = 'analysis'",
            job_id,
        )
        if row is None:
            raise NotFoundException(f"no finished analysis for job {job_id}")
        profile = row["result"]
        if row["object_name"] is not None:
            profile = await _read_stored(state, row["object_name"])
        dataset_id = str(row["command"].get("dataset_id", ""))
        return AnalysisResponse(job_id=job_id, dataset_id=dataset_id, profile=profile)
