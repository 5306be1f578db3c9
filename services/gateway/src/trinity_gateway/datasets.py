"""Uploading datasets and reading their records."""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import nats.errors
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State, UploadFile
from litestar.exceptions import ClientException, NotFoundException
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import PathParameter, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from trinity_common import names
from trinity_common.client import BrokerUnavailableError
from trinity_common.commands import AnalysisOptions, RunAnalysis
from trinity_gateway.bodies import UnsupportedMediaTypeError
from trinity_gateway.problems import problem_spec
from trinity_gateway.schemas import DatasetResponse, UploadResponse
from trinity_gateway.submission import accept_job

if TYPE_CHECKING:
    import asyncpg

__all__ = ["DatasetController"]

logger = logging.getLogger(__name__)

UPLOAD_FIELD = "data"
"""The multipart form field that carries the file."""

DatasetId = Annotated[str, PathParameter(pattern=r"^[0-9a-f]{32}$", description="A dataset id.")]


class UploadTooLargeError(ClientException):
    """The file is larger than the gateway accepts."""

    status_code = HTTP_413_REQUEST_ENTITY_TOO_LARGE


def _dataset_response(row: asyncpg.Record) -> DatasetResponse:
    return DatasetResponse(
        dataset_id=row["dataset_id"],
        name=row["name"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        content_type=row["content_type"],
        created_at=row["created_at"],
        url=f"/api/datasets/{row['dataset_id']}",
    )


def _display_name(upload: UploadFile) -> str:
    # The name is shown back to people and stored as text: keep what is printable.
    name = "".join(ch for ch in (upload.filename or "") if ch.isprintable()).strip()
    return name[:255] or "upload"


def _content_type(upload: UploadFile) -> str:
    given = (upload.content_type or "").split(";")[0].strip()
    if given and given != "application/octet-stream":
        return given
    guessed, _ = mimetypes.guess_type(upload.filename or "")
    return guessed or "application/octet-stream"


async def _store_bytes(state: State, dataset_id: str, data: bytes) -> None:
    if not state.nc.is_connected:
        raise BrokerUnavailableError("NATS is not connected; nothing was stored")
    try:
        store = await state.js.object_store(names.DATASETS_BUCKET)
        await store.put(dataset_id, data)
    except (nats.errors.Error, OSError) as err:
        raise BrokerUnavailableError("the dataset store did not confirm the upload") from err


async def _forget_bytes(state: State, dataset_id: str) -> None:
    try:
        store = await state.js.object_store(names.DATASETS_BUCKET)
        await store.delete(dataset_id)
    except (nats.errors.Error, OSError):
        logger.warning("orphaned dataset bytes left in store", extra={"dataset_id": dataset_id})


async def _file_of(request: Request[Any, Any, Any]) -> UploadFile:
    media_type, _ = request.content_type
    if media_type != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"send the file as multipart/form-data in a field named {UPLOAD_FIELD!r},"
            f" not {media_type or 'an empty body'}"
        )
    form = await request.form()
    if len(form.getall(UPLOAD_FIELD, [])) > 1:
        raise ClientException(
            f"the form has more than one file in field {UPLOAD_FIELD!r}; send one per upload",
            extra=[{"key": UPLOAD_FIELD, "message": "more than one file", "source": "body"}],
        )
    upload = form.get(UPLOAD_FIELD)
    if not isinstance(upload, UploadFile):
        raise ClientException(
            f"the form has no file in a field named {UPLOAD_FIELD!r}",
            extra=[{"key": UPLOAD_FIELD, "message": "missing file", "source": "body"}],
        )
    return upload


@dataclass
class _UploadOperation(Operation):
    # The handler reads the form itself, to bound what it reads, so Litestar
    # cannot see the body to describe it.
    def __post_init__(self) -> None:
        file = Schema(
            type=OpenAPIType.STRING,
            format=OpenAPIFormat.BINARY,
            description="The dataset: CSV, TSV, JSON lines or Parquet.",
        )
        form = Schema(
            type=OpenAPIType.OBJECT, properties={UPLOAD_FIELD: file}, required=[UPLOAD_FIELD]
        )
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=form)}, required=True
        )


class DatasetController(Controller):
    """Datasets: upload a file, read its record."""

    path = "/api"
    tags = ["datasets"]  # noqa: RUF012 - Litestar reads it as a class attribute

    @post(
        "/upload",
        status_code=HTTP_201_CREATED,
        operation_class=_UploadOperation,
        responses={
            400: problem_spec("the form has no file in field `data`"),
            413: problem_spec("the file is larger than the upload limit, stated in the body"),
            415: problem_spec("the body is not a multipart form"),
            503: problem_spec("storage or the job queue is unavailable; retry later"),
        },
    )
    async def upload_dataset(
        self,
        state: State,
        request: Request[Any, Any, Any],
        analyze: Annotated[
            bool, QueryParameter(description="Also queue an analysis of the file.")
        ] = False,
    ) -> Response[UploadResponse]:
        """Store a dataset file (CSV, TSV, JSON lines, Parquet); ``?analyze=true`` profiles it.

        Send the file as ``multipart/form-data``, in a field named ``data``.
        """
        data = await _file_of(request)
        limit = state.settings.gateway_max_upload_bytes
        content = await data.read(limit + 1)
        if len(content) > limit:
            raise UploadTooLargeError(f"the file is larger than the upload limit of {limit} bytes")
        dataset_id = uuid.uuid4().hex
        await _store_bytes(state, dataset_id, content)
        try:
            row = await state.pool.fetchrow(
                "INSERT INTO datasets (dataset_id, name, size_bytes, sha256, content_type)"
                " VALUES ($1, $2, $3, $4, $5) RETURNING *",
                dataset_id,
                _display_name(data),
                len(content),
                hashlib.sha256(content).hexdigest(),
                _content_type(data),
            )
        except BaseException:
            await _forget_bytes(state, dataset_id)
            raise
        dataset = _dataset_response(row)
        job = None
        if analyze:
            command = RunAnalysis(dataset_id=dataset_id, options=AnalysisOptions())
            try:
                job = await accept_job(state, "analysis", command)
            except BrokerUnavailableError as err:
                raise BrokerUnavailableError(
                    f"the dataset was stored as {dataset_id}, but its analysis was not queued"
                    f" ({err.message}); POST /api/analysis with that dataset_id later"
                ) from err
        body = UploadResponse(dataset_id=dataset_id, dataset=dataset, job=job)
        return Response(body, headers={"Location": dataset.url})

    @get("/datasets/{dataset_id:str}", responses={404: problem_spec("no dataset with that id")})
    async def get_dataset(self, state: State, dataset_id: DatasetId) -> DatasetResponse:
        """Return a dataset's record: name, size, checksum, content type."""
        row = await state.pool.fetchrow("SELECT * FROM datasets WHERE dataset_id = $1", dataset_id)
        if row is None:
            raise NotFoundException(f"no dataset with id {dataset_id}")
        return _dataset_response(row)
