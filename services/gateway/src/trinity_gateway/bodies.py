"""JSON request bodies: what a route that reads one insists on before it runs.

A job request is a few hundred bytes, so JSON routes take far less than the
upload limit, and they refuse a body of any other media type by name instead
of guessing at what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar.exceptions import ClientException
from litestar.openapi.spec import Operation, RequestBody
from litestar.status_codes import HTTP_415_UNSUPPORTED_MEDIA_TYPE

if TYPE_CHECKING:
    from litestar import Request

__all__ = ["MAX_JSON_BODY_BYTES", "OptionalBodyOperation", "UnsupportedMediaTypeError", "json_only"]

MAX_JSON_BODY_BYTES = 64 * 1024
"""Largest JSON body any route accepts; more is refused with 413 before it is read."""


class UnsupportedMediaTypeError(ClientException):
    """The body is not of a media type the route reads."""

    status_code = HTTP_415_UNSUPPORTED_MEDIA_TYPE


def _has_body(request: Request[Any, Any, Any]) -> bool:
    length = request.headers.get("content-length")
    if length is not None:
        return length.strip() != "0"
    return "transfer-encoding" in request.headers


async def json_only(request: Request[Any, Any, Any]) -> None:
    """Refuse a request whose body is not JSON, naming the media type it had.

    A ``before_request`` hook. A request without a body passes: whether one is
    required is the route's to say.
    """
    if not _has_body(request):
        return
    media_type, _ = request.content_type
    if media_type == "application/json" or media_type.endswith("+json"):
        return
    raise UnsupportedMediaTypeError(
        f"send the body as application/json, not {media_type or 'a body without a Content-Type'}"
    )


@dataclass
class OptionalBodyOperation(Operation):
    """An operation whose JSON body may be left out.

    Litestar marks the body of every route as required, even where the handler
    gives it a default.
    """

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False
