"""RFC 9457 problem documents: how every 4xx and 5xx answer is built, and the schema that describes it.

And the size limits on a request (SizeLimitMiddleware), answered 413 and 431 before any route runs.
"""

from collections.abc import Mapping
from typing import Annotated, Any, Literal, NotRequired

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12 on

from settings import settings

PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# The request's header fields, in all and in number, beyond which it is answered 431 (API.md),
# before any route runs: as much as common servers and proxies allow (Node's 16 KiB, nginx's buffers).
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_FIELDS = 100
# A 422 lists at most this many errors, each message cut to at most MAX_ERROR_MESSAGE characters,
# as the schema below says: a body of thousands of unknown fields gets the first few, not an
# answer larger than itself.
MAX_ERRORS = 20
MAX_ERROR_MESSAGE = 512


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": PHRASES.get(status, "Error"), "status": status, "detail": detail, **extra}
    return JSONResponse(body, status, headers, media_type="application/problem+json")


class SizeLimitMiddleware:
    """Answer 431 to headers over MAX_HEADER_BYTES or MAX_HEADER_FIELDS, 413 to a body over MAX_BODY_SIZE.

    Before any route runs, and without reading a body to the end.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.limit = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        if len(headers) > MAX_HEADER_FIELDS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            detail = f"The request's headers are over {MAX_HEADER_BYTES} bytes or {MAX_HEADER_FIELDS} fields."
            return await problem(431, detail)(scope, receive, send)
        length = next((v for k, v in headers if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.limit:
            return await problem(413, f"The request body is larger than {self.limit} bytes.")(scope, receive, send)
        received = 0

        # A chunked body has no length up front: count it as the route reads it.
        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # Raised inside the route, so the HTTPException handler answers it.
                raise HTTPException(413, f"The request body is larger than {self.limit} bytes.")
            return message

        await self.app(scope, receive_with_limit, send)


# TypedDicts, not models: a problem is the dict problem() builds, and NotRequired leaves a
# member out of the schema's `required` without inventing a default for it.
class ProblemError(TypedDict):
    # Where: ["body", "email"], ["query", "limit"], or ["body", 17], a position in malformed JSON.
    # A name in it may be a field the client sent, so only the body's size bounds it.
    loc: Annotated[
        list[str | int],
        Field(
            json_schema_extra={
                "maxItems": 3,
                "items": {
                    "anyOf": [
                        {"type": "string", "maxLength": settings.max_body_size},
                        {"type": "integer", "format": "int32", "minimum": 0, "maximum": settings.max_body_size},
                    ]
                },
            }
        ),
    ]
    msg: Annotated[str, Field(json_schema_extra={"maxLength": MAX_ERROR_MESSAGE})]


class Checks(TypedDict):
    """What a probe checked, in its 200 and its 503 alike."""

    database: NotRequired[Literal["ok", "unavailable"]]
    # /readyz only: a worker that has begun to shut down is "draining".
    worker: NotRequired[Literal["serving", "draining"]]


# int32: a pool is bounded by the database's max_connections, itself far below 2**31.
PoolFigure = Annotated[int, Field(json_schema_extra={"format": "int32", "minimum": 0, "maximum": 2**31 - 1})]


class Pool(TypedDict):
    """A worker's pool figures, as /health reports them."""

    size: PoolFigure
    checked_out: PoolFigure
    overflow: PoolFigure
    max_overflow: PoolFigure


class Problem(TypedDict):
    """An RFC 9457 problem document: the body of every 4xx and 5xx answer."""

    type: Literal["about:blank"]
    title: Annotated[str, Field(json_schema_extra={"maxLength": 64, "pattern": r"^[A-Z][A-Za-z ]*$"})]
    status: Annotated[int, Field(json_schema_extra={"format": "int32", "minimum": 400, "maximum": 599})]
    detail: Annotated[str, Field(json_schema_extra={"maxLength": 1024})]
    # Only in a 422: what was not valid.
    errors: NotRequired[Annotated[list[ProblemError], Field(json_schema_extra={"maxItems": MAX_ERRORS})]]
    # Only in a probe's 503: what failed, and (/health) the pool's figures.
    checks: NotRequired[Checks]
    pool: NotRequired[Pool]
