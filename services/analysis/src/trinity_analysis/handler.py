"""The analysis queue's handler: fetch the dataset, profile it off the loop."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nats.js.errors import ObjectNotFoundError

from trinity_analysis.profile import profile_dataset
from trinity_common import broker, names
from trinity_common.commands import RunAnalysis
from trinity_common.errors import PermanentJobError
from trinity_common.offload import ProcessOffloader
from trinity_common.worker import JobContext, JobResult

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from trinity_analysis.settings import AnalysisSettings
    from trinity_common.queues import QueueSettings
    from trinity_common.worker import Handler

__all__ = ["provide_handler"]


@contextlib.asynccontextmanager
async def provide_handler(
    queue: QueueSettings, *, settings: AnalysisSettings
) -> AsyncIterator[Handler]:
    """Yield the analysis handler, with one profiling process per concurrent job."""
    offloader = ProcessOffloader(workers=queue.concurrency)
    try:
        yield lambda context: run_analysis(context, offloader, settings=settings)
    finally:
        offloader.close()


async def run_analysis(
    context: JobContext, offloader: ProcessOffloader, *, settings: AnalysisSettings
) -> JobResult:
    """Profile the dataset the job names and return the profile."""
    command = context.command
    if not isinstance(command, RunAnalysis):
        raise PermanentJobError(
            f"the analysis queue cannot run {type(command).__name__}", error_type="bad_command"
        )
    dataset = await context.patiently(
        context.pool.fetchrow,
        "SELECT name, content_type, size_bytes FROM datasets WHERE dataset_id = $1",
        command.dataset_id,
    )
    if dataset is None:
        raise PermanentJobError(
            f"dataset {command.dataset_id} does not exist", error_type="dataset_not_found"
        )
    data = await _read_dataset(context, command.dataset_id)
    await context.report_progress(5, "dataset loaded")

    profile = await offloader.run(
        profile_dataset,
        data,
        filename=dataset["name"],
        content_type=dataset["content_type"],
        options=command.options,
        max_columns=settings.analysis_max_columns,
        progress=context.report_progress,
    )
    summary = {
        "dataset_id": command.dataset_id,
        "row_count": profile["row_count"],
        "column_count": profile["column_count"],
    }
    return JobResult(data=profile, summary=summary)


async def _read_dataset(context: JobContext, dataset_id: str) -> bytes:
    store = await context.js.object_store(names.DATASETS_BUCKET)
    try:
        return await broker.read_object(store, dataset_id)
    except ObjectNotFoundError as err:
        raise PermanentJobError(
            f"the bytes of dataset {dataset_id} are missing from storage",
            error_type="dataset_not_found",
        ) from err
