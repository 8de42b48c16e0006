"""The OpenAPI document, finished: what FastAPI cannot see from the routes, added in one place.

The Problem schema under the media type it is served as, every header the service sends
(declared once, under components/headers), the bearer scheme, and the headers the middleware
adds to every answer. The routes declare their statuses with `problem_responses()` and
`api_operation()`; `finish()` does the rest when the document is first asked for.
"""

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import Field, TypeAdapter

from problems import MAX_HEADER_BYTES, MAX_HEADER_FIELDS, PHRASES, Problem
from replicas import MAX_TOKEN, TOKEN
from settings import settings

# What the document says of the service as a whole; main.py gives it to FastAPI.
DOCUMENT: dict[str, Any] = {
    "title": "Users API",
    "version": "1.0.0",
    "description": "User records: create, read, list, update and delete, with bearer API keys, ETags and a rate "
    "limit. Paths are exact: one with a trailing slash is 404, never a redirect.",
    # Relative: the schema describes whichever deployment serves it, at that origin.
    "servers": [
        {
            "url": "/",
            "description": "The deployment that serves this schema: production or local development.",
            "x-internal": False,
        }
    ],
    # No license has been chosen for this code yet; until one is, nobody else may use it.
    "license_info": {"name": "Proprietary: all rights reserved", "identifier": "LicenseRef-Proprietary"},
    "contact": {"name": "The Users API maintainers"},
    "openapi_tags": [
        {"name": "users", "description": "The user records, under /api/v1; every operation needs an API key."},
        {"name": "health", "description": "For load balancers and orchestrators; needs no key."},
        {"name": "metrics", "description": "For Prometheus; needs a key of METRICS_KEYS in production."},
    ],
    # operationId: the route function's name, which generated clients name their functions after.
    "generate_unique_id_function": lambda route: route.name,
}


def bounds(**schema: Any) -> Any:
    """A field whose document declares these bounds, without pydantic checking them.

    For what the service sends: OWASP's rules ask that every string, number and array of an
    answer be bounded, and these values were checked on the way in, or are the service's own.
    """
    return Field(json_schema_extra=schema)


# What strip_whitespace trims (Unicode White_Space), spelled out: ECMA, Python and Rust regex
# engines each read \s differently.
WHITE_SPACE = r"\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# A string stored trimmed: no white space at either end.
TRIMMED = rf"^[^{WHITE_SPACE}]([\s\S]*[^{WHITE_SPACE}])?$"


def trimmed(max_length: int) -> Callable[[dict[str, Any]], None]:
    """Say "1 to max_length characters after trimming" in JSON Schema, whose lengths count white space too."""

    def schema(field: dict[str, Any]) -> None:
        field["description"] = f"1 to {max_length} characters after trimming surrounding white space."
        del field["minLength"]
        # The white space around it is trimmed, not counted: only the body's size bounds it.
        field["maxLength"] = settings.max_body_size
        body = rf"[^{WHITE_SPACE}]([\s\S]{{0,{max_length - 2}}}[^{WHITE_SPACE}])?"
        field["pattern"] = rf"^[{WHITE_SPACE}]*{body}[{WHITE_SPACE}]*$"

    return schema


def not_null(schema: dict[str, Any]) -> None:
    """Leave null out of a model's optional fields: they may be left out, never sent as null."""
    for field in schema["properties"].values():
        kinds = field.get("anyOf", [])
        if {"type": "null"} in kinds:
            field.update(*(kind for kind in kinds if kind != {"type": "null"}))
            del field["anyOf"]


def header(description: str, **schema: Any) -> dict[str, Any]:
    return {"description": description, "schema": schema}


# Every header the service sends, once, as components/headers; the responses refer to them.
HEADERS = {
    "X-Request-ID": header(
        "The client's own X-Request-ID when it sent a sane one, otherwise a new one; also in the log.",
        type="string",
        maxLength=128,
        pattern=r"^[A-Za-z0-9._:-]{1,128}$",
    ),
    "RateLimit": header(
        "Requests left in the current window (r), and seconds until one more is allowed (t); "
        "draft-ietf-httpapi-ratelimit-headers.",
        type="string",
        maxLength=48,
        pattern=r'^"default";r=\d{1,10};t=\d{1,10}$',
        examples=['"default";r=42;t=17'],
    ),
    "RateLimit-Policy": header(
        "The limit: q requests per w seconds, per client address.",
        type="string",
        maxLength=48,
        pattern=r'^"default";q=\d{1,10};w=\d{1,10}$',
        examples=['"default";q=100;w=60'],
    ),
    # A 429 waits at most one window of the rate limit; a 503 says 1.
    "Retry-After": header(
        "Seconds to wait before trying again.",
        type="integer",
        format="int32",
        minimum=1,
        maximum=settings.rate_limit_window,
    ),
    "WWW-Authenticate": header("The scheme the key is expected in.", type="string", const="Bearer"),
    "ETag": header(
        "The resource's current version, for If-Match and If-None-Match.",
        type="string",
        maxLength=12,
        pattern=r'^"[1-9][0-9]{0,9}"$',
    ),
    "Consistency-Token": header(
        "The primary's state just after this write. Send it back on a GET (Consistency-Token) to read "
        "this write or a later state, from a replica that has it or else from the primary. Opaque.",
        type="string",
        maxLength=MAX_TOKEN,
        pattern=f"^{TOKEN.pattern}$",
    ),
    # Any collection's: 64 is what idempotency_keys.location keeps.
    "Location": header(
        "The new resource's URL.",
        type="string",
        format="uri-reference",
        maxLength=64,
        pattern=r"^/api/v1/[a-z]+(/[a-z]+)*/[1-9][0-9]{0,18}$",
    ),
}


def headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


# The headers of each problem, beyond those the middleware adds to every answer (finish() below).
PROBLEM_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problems an operation may answer: 413, 431 and 500 on any, as the middleware answers them anywhere."""
    # The schema sits under the media type actually served: FastAPI's "model" key would file it
    # under application/json.
    content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    described = {
        431: f"{PHRASES[431]}: over {MAX_HEADER_BYTES} bytes of header fields, or over {MAX_HEADER_FIELDS} of them."
    }
    return {
        status: {
            "description": described.get(status, PHRASES[status]),
            "content": content,
            "headers": headers(*PROBLEM_HEADERS.get(status, ())),
        }
        for status in sorted({413, 431, 500, *statuses})
    }


def api_operation(tag: str, *statuses: int, sends: dict[int, Iterable[str]] | None = None) -> dict[str, Any]:
    """What every /api/v1 operation declares: its tag, its bearer key, the problems it may answer.

    `sends`: the headers of its success answers, by status (ETag, Location).
    """
    success: dict[int, dict[str, Any]] = {
        status: {"headers": headers(*names)} for status, names in (sends or {}).items()
    }
    if 304 in success:
        success[304]["description"] = "Not Modified: the client's copy, named by If-None-Match, is current."
    return {
        "tags": [tag],
        # The key itself is checked by the key-check middleware, before the body is read;
        # declared here (not as a Security dependency, which FastAPI would solve on every
        # request) so that the schema names it and Swagger UI's "Authorize" button works.
        "openapi_extra": {"security": [{"bearer": []}]},
        "responses": {**problem_responses(401, 422, 429, 503, *statuses), **success},
    }


def finish(app: FastAPI) -> None:
    """Make app's document FastAPI's, plus the Problem schema, the headers, the bearer scheme, once."""

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            schema = FastAPI.openapi(app)  # builds app.openapi_schema, once
            components = schema.setdefault("components", {})
            problem_schema = TypeAdapter(Problem).json_schema(ref_template="#/components/schemas/{model}")
            components["schemas"].update(problem_schema.pop("$defs"), Problem=problem_schema)
            components["headers"] = HEADERS
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "One of the keys in API_KEYS."}
            }
            for path, item in schema["paths"].items():
                for operation in item.values():
                    for status, response in operation["responses"].items():
                        sent = ["X-Request-ID"]  # the access log middleware: on every answer
                        # The rate limit: on every /api/ answer that passes through it, which the
                        # access log's own 500 does not.
                        if path.startswith("/api/") and status != "500":
                            sent += ["RateLimit", "RateLimit-Policy"]
                        response.setdefault("headers", {}).update(headers(*sent))
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
