"""Error bodies: every 4xx and 5xx the gateway sends has the same shape.

``{"status": 422, "detail": "...", "problems": [{"field": "...", "message": "..."}]}``;
``problems`` lists every bad field, each with its path in the request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from trinity_common.client import BrokerUnavailableError, QueueFullError
from trinity_common.database import UNAVAILABLE_ERRORS

if TYPE_CHECKING:
    from litestar.types import ExceptionHandlersMap

__all__ = ["Problem", "ProblemResponse", "exception_handlers", "problem", "problem_spec"]

logger = logging.getLogger(__name__)


class Problem(msgspec.Struct, kw_only=True, frozen=True):
    """One thing wrong with a request."""

    field: str
    message: str


class ProblemResponse(msgspec.Struct, kw_only=True, frozen=True):
    """The body of every error response."""

    status: int
    detail: str
    problems: list[Problem] = msgspec.field(default_factory=list)


def problem(
    status: int,
    detail: str,
    problems: list[Problem] | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> Response[ProblemResponse]:
    """Build an error response."""
    return Response(
        ProblemResponse(status=status, detail=detail, problems=problems or []),
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def problem_spec(description: str) -> ResponseSpec:
    """Describe an error response in the OpenAPI document."""
    return ResponseSpec(data_container=ProblemResponse, description=description)


# Handler parameters whose Python name differs from the name a client sends.
_CLIENT_NAMES = {"job_state": "state", "idempotency_key": "Idempotency-Key"}


def _field_of(item: dict[str, Any]) -> str:
    key = str(item.get("key") or "")
    key = _CLIENT_NAMES.get(key, key)
    source = item.get("source") or "body"
    source = str(getattr(source, "value", source)).lower()
    return key.removeprefix("$.") if source == "body" else f"{source}.{key}"


def _message_of(item: dict[str, Any]) -> str:
    message = str(item.get("message", ""))
    # Litestar reports a missing body or parameter as the bare repr of its name.
    if message == f"'{item.get('key')}'":
        return "required, and missing"
    return message


def _problems_of(exc: HTTPException) -> list[Problem]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    return [
        Problem(field=_field_of(item), message=_message_of(item))
        for item in extra
        if isinstance(item, dict)
    ]


def _on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    problems = _problems_of(exc)
    return problem(exc.status_code, _validation_detail(exc, problems), problems)


def _validation_detail(exc: ValidationException, problems: list[Problem]) -> str:
    # Litestar's own detail only names the route; the first problem says more.
    if problems and str(exc.detail).startswith("Validation failed"):
        first = problems[0]
        where = f" in {first.field}" if first.field else ""
        return f"invalid request{where}: {first.message}"
    return str(exc.detail)


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return problem(exc.status_code, str(exc.detail), _problems_of(exc), headers=exc.headers)


def _on_too_large(request: Request[Any, Any, Any], exc: RequestEntityTooLarge) -> Response[Any]:
    # Litestar refuses an oversized body before any handler runs; say the limit.
    limit = request.app.state.settings.gateway_max_upload_bytes
    detail = str(exc.detail)
    if detail == "Request Entity Too Large":
        detail = f"the request body is larger than the upload limit of {limit} bytes"
    return problem(exc.status_code, detail)


def _unavailable(request: Request[Any, Any, Any], detail: str) -> Response[Any]:
    retry_after = str(request.app.state.settings.gateway_retry_after_s)
    return problem(HTTP_503_SERVICE_UNAVAILABLE, detail, headers={"Retry-After": retry_after})


def _on_broker(request: Request[Any, Any, Any], exc: BrokerUnavailableError) -> Response[Any]:
    if isinstance(exc, QueueFullError):
        return _unavailable(request, f"{exc.message}; retry later")
    return _unavailable(request, f"job queue unavailable: {exc.message}")


def _on_database(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.warning("database unavailable", extra={"error_type": type(exc).__name__})
    return _unavailable(request, "database unavailable; retry later")


def _on_refused_value(_: Request[Any, Any, Any], exc: asyncpg.DataError) -> Response[Any]:
    # Input the database cannot store (a NUL character, say) is the client's to fix.
    return problem(
        HTTP_400_BAD_REQUEST,
        "the request holds a value that cannot be stored, such as a NUL character",
    )


def _on_too_deep(_: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    return problem(HTTP_400_BAD_REQUEST, "the JSON body is nested too deeply")


def _on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.error("request failed", exc_info=exc)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "internal error")


exception_handlers: ExceptionHandlersMap = {
    ValidationException: _on_validation,
    RequestEntityTooLarge: _on_too_large,
    HTTPException: _on_http,
    BrokerUnavailableError: _on_broker,
    asyncpg.DataError: _on_refused_value,
    RecursionError: _on_too_deep,
    **dict.fromkeys(UNAVAILABLE_ERRORS, _on_database),
    HTTP_500_INTERNAL_SERVER_ERROR: _on_unexpected,
}
