"""Error bodies: every 4xx and 5xx the gateway sends has the same shape.

``{"status": 422, "detail": "...", "problems": [{"field": "...", "message": "..."}]}``;
``problems`` lists every bad field, each with its path in the request.
"""

from __future__ import annotations

import logging
import re
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


# msgspec names a missing or unknown field in its message, against the object
# that holds it; the problem names the field itself.
_OBJECT_FIELD = re.compile(r"^Object (missing required|contains unknown) field `(.*)`$")
_OBJECT_FIELD_MESSAGES = {
    "missing required": "required, and missing",
    "contains unknown": "no such field",
}
# Litestar's name for the request body as a whole.
_BODY = "data"


def _problem_of(item: dict[str, Any]) -> Problem:
    key = str(item.get("key") or "")
    message = str(item.get("message", ""))
    source = item.get("source") or "body"
    source = str(getattr(source, "value", source)).lower()
    if source != "body":
        return Problem(field=f"{source}.{_CLIENT_NAMES.get(key, key)}", message=_bare(key, message))
    path = key.removeprefix("$.")
    if key == _BODY and _is_missing(key, message):
        return Problem(field="body", message="required, and missing")
    if found := _OBJECT_FIELD.match(message):
        holder = "" if path in (_BODY, "$") else path
        field = ".".join(part for part in (holder, found[2]) if part) or "body"
        return Problem(field=field, message=_OBJECT_FIELD_MESSAGES[found[1]])
    if path == _BODY and message.startswith("Expected"):
        return Problem(field="body", message=message)
    if found := re.match(rf"{re.escape(path)}\.(\w+) ", message):
        # A check across a struct's fields (its __post_init__) is reported
        # against the struct; its message starts with the field it is about.
        return Problem(field=f"{path}.{found[1]}", message=message)
    return Problem(field=path, message=_bare(key, message))


def _is_missing(key: str, message: str) -> bool:
    # Litestar reports a missing parameter or body as the bare repr of its name.
    return message == f"'{key}'"


def _bare(key: str, message: str) -> str:
    return "required, and missing" if _is_missing(key, message) else message


def _problems_of(
    exc: HTTPException, request: Request[Any, Any, Any] | None = None
) -> list[Problem]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    items = [item for item in extra if isinstance(item, dict)]
    if request is not None and _body_is_optional(request):
        # Litestar lists an optional body left out beside any other problem.
        items = [
            i
            for i in items
            if not (i.get("key") == _BODY and _is_missing(_BODY, str(i.get("message"))))
        ]
    return [_problem_of(item) for item in items]


def _body_is_optional(request: Request[Any, Any, Any]) -> bool:
    body = request.route_handler.parsed_fn_signature.parameters.get(_BODY)
    return body is not None and body.has_default


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    problems = _problems_of(exc, request)
    detail = _validation_detail(exc, problems)
    return problem(exc.status_code, detail, _or_malformed_body(detail, problems))


def _validation_detail(exc: ValidationException, problems: list[Problem]) -> str:
    # Litestar's own detail only names the route; the first problem says more.
    if problems and str(exc.detail).startswith("Validation failed"):
        first = problems[0]
        named = not first.field or first.message.startswith(f"{first.field} ")
        where = "" if named else f" in {first.field}"
        return f"invalid request{where}: {first.message}"
    return _plain(str(exc.detail))


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    detail = _plain(str(exc.detail))
    problems = _or_malformed_body(detail, _problems_of(exc))
    return problem(exc.status_code, detail, problems, headers=exc.headers)


def _or_malformed_body(detail: str, problems: list[Problem]) -> list[Problem]:
    # JSON that does not parse has no field to blame: the body as a whole is it.
    if not problems and detail.startswith(_MALFORMED):
        return [Problem(field="body", message=detail.removeprefix(_MALFORMED))]
    return problems


# What msgspec says of JSON it cannot decode, where it does not say it is JSON.
_TERSE_DECODE_ERRORS = {"Input data was truncated": "the body ends before the JSON does"}
_MALFORMED = "JSON is malformed: "


def _plain(detail: str) -> str:
    if detail in _TERSE_DECODE_ERRORS:
        return f"{_MALFORMED}{_TERSE_DECODE_ERRORS[detail]}"
    return detail


def _on_too_large(request: Request[Any, Any, Any], exc: RequestEntityTooLarge) -> Response[Any]:
    # Litestar refuses an oversized body before any handler runs; say the limit.
    detail = str(exc.detail)
    if detail == "Request Entity Too Large":
        route_limit = request.route_handler.request_max_body_size
        if isinstance(route_limit, int):
            detail = f"the request body is larger than this route's limit of {route_limit} bytes"
        else:
            limit = request.app.state.settings.gateway_max_upload_bytes
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
