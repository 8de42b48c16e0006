"""User records over HTTP: FastAPI in front of MySQL, MariaDB or SQLite.

This file is the story of a request, in the order the request meets it:
  1. settings, then the database: `ConnectionDep`, the pooled connection a route's work runs on,
     and `ReadDep`, a GET's reads, on a replica that has the client's writes or on the primary
  2. the lifespan: what each worker process starts, and stops again
  3. the app and its middleware: access log, rate limit, key check, size limits, in that order
  4. errors: every 4xx and 5xx as application/problem+json, 503 only for an outage
  5. schemas, then the routes: the probes and /metrics, then /api/v1/users in CRUD order
  6. the entry point, `python main.py`

The machinery it calls sits beside it, a flat module per job, each importing only those below it:
  settings.py       the typed, frozen settings         models.py      the tables
  database.py       engines, pool care, and whether an error is an outage (503) or a bug (500)
  crud.py           fetch, page, insert, compare-and-swap update, conditional delete, for any table
  idempotency.py    the Idempotency-Key store          ratelimit.py   GCRA in shared memory and in Redis
  replicas.py       GETs read from MariaDB replicas, and the Consistency-Token of read-your-writes
  probes.py         /health, /livez, /readyz, SIGTERM  emails.py      an address's syntax and identity
  observability.py  metrics, /metrics, SQL traces      logs.py        the log and the access line
  openapi.py        the OpenAPI document's additions   problems.py    RFC 9457 errors, request size limits
  schema.py         the schema's revision (Alembic's migrations/), and development's demo users
"""

import asyncio
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from opentelemetry import trace
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StringConstraints, field_validator
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import crud
import emails
import schema
from database import create_engine, unavailable
from idempotency import IdempotencyKeyHeader, answer_once, owner, purge_expired_keys
from logs import configure_logging, log_access
from models import MAX_ID, User
from observability import (
    DB_POOL_WAIT,
    DB_POOL_WAITING,
    DB_STATEMENT_TIMEOUTS,
    DB_UNAVAILABLE,
    HTTP_IN_FLIGHT,
    RATE_LIMITED,
    UNAUTHORIZED,
    HttpMetrics,
    instrument_sql,
    metrics_router,
    sample_pools,
)
from openapi import DOCUMENT, TRIMMED, api_operation, bounds, finish, not_null, problem_responses, trimmed
from probes import drain_on_sigterm
from probes import router as probes
from problems import MAX_ERROR_MESSAGE, MAX_ERRORS, PHRASES, SizeLimitMiddleware, problem
from ratelimit import RateLimiter
from replicas import ConsistencyTokenHeader, Read, Replicas, stamp
from settings import misspelt_variables, settings

log = logging.getLogger("users")


# --- Database: the connection a route's work runs on ----------------------------------------


def create_engines() -> tuple[AsyncEngine, AsyncEngine]:
    """This worker's engine, and its probe engine: one connection for the probes, which never waits behind users."""
    engine = partial(
        create_engine,
        settings.database_url,
        recycle=settings.db_pool_recycle,
        pool_timeout=settings.db_pool_timeout,
        timeout=settings.db_timeout,
    )
    return (
        engine(pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow, name="main"),
        engine(pool_size=1, max_overflow=0, name="probe"),
    )


async def connect(request: Request) -> AsyncIterator[AsyncConnection]:
    """Lend the request a pooled connection; its database work must end within the time limits.

    DB_POOL_TIMEOUT bounds the wait for a connection, and DB_TIMEOUT everything after it: the
    checkout (a new connection's handshake, an idle one's ping) and every statement the route
    runs, together. A statement cut off by the limit leaves its connection unusable, and
    SQLAlchemy invalidates it rather than pool it again. The wait's limit surfaces as
    PoolTimeoutError and the work's as TimeoutError; database_error() answers both 503.

    Requests wait in `pool_line`, first come, first served. The pool's own wait is not fair:
    a connection given back wakes the longest waiter, but a request that reaches the pool
    before that waiter runs takes it, and under sustained load a waiter can lose every race
    until it times out.
    """
    line: asyncio.Semaphore = request.state.pool_line
    if line.locked():  # every connection is in use: wait in line
        start = time.perf_counter()
        waiting = DB_POOL_WAITING.labels("main")
        waiting.inc()
        try:
            async with asyncio.timeout(settings.db_pool_timeout):
                await line.acquire()
        except TimeoutError:
            # The error SQLAlchemy's pool raises for the same wait, so the 503 names its cause.
            raise PoolTimeoutError(
                f"no connection free within DB_POOL_TIMEOUT ({settings.db_pool_timeout} s)"
            ) from None
        finally:
            waiting.dec()
            observe_pool_wait(time.perf_counter() - start)
    else:
        await line.acquire()  # returns at once
        observe_pool_wait(0.0)
    try:
        async with asyncio.timeout(settings.db_timeout), request.state.engine.connect() as conn:
            yield conn
    finally:
        line.release()


observe_pool_wait = DB_POOL_WAIT.observe

# A connection, not a session: the routes run Core statements, and an AsyncSession would add a
# unit of work per request that they never use (what it costs: bench/README.md, "the tutorial peer").
# scope="function": the connection goes back to the pool when the route returns, before the
# response is sent to a client that may be slow to read it.
ConnectionDep = Annotated[AsyncConnection, Depends(connect, scope="function")]
lend = asynccontextmanager(connect)


async def reads(request: Request, consistency_token: ConsistencyTokenHeader = None) -> Read:
    """Route a GET's reads: to a replica that has the client's writes, else to the primary (replicas.py)."""
    replicas: Replicas = request.state.replicas
    return replicas.read(partial(lend, request), consistency_token)


# `await read(crud.get_row, ...)` runs the read on a connection of its own, to a replica or the
# primary, and runs it again on the primary if the replica fails meanwhile. Every write, and every
# read a write makes, is on ConnectionDep's: the primary's.
ReadDep = Annotated[Read, Depends(reads)]


# --- Lifespan: what each worker process starts and stops ------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Start this worker's engines, rate limiter and background tasks; close them when it stops."""
    configure_logging(settings.environment, settings.log_level)
    for variable, setting in misspelt_variables():
        log.warning("the environment variable %s is not a setting: did you mean %s?", variable, setting)
    if not settings.api_keys:
        log.warning("!!! API_KEYS is empty: /api/v1 is open to anyone (development only) !!!")
    engine, probe_engine = create_engines()
    if settings.environment == "development":
        await schema.add_demo_users(engine)
    replicas = Replicas(settings, engine)  # none without DATABASE_REPLICA_URLS
    await replicas.start()
    # Per worker, like the engines: a Redis connection belongs to this worker's event loop.
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    # RATE_LIMIT_TABLE is not a setting: gunicorn's master sets it for the workers it forks.
    table = os.environ.get("RATE_LIMIT_TABLE")
    limiter = RateLimiter(settings.rate_limit, settings.rate_limit_window, table, redis_url, settings.redis_key_prefix)
    await limiter.start()
    if settings.telemetry:
        instrument_sql([engine, probe_engine, *replicas.engines.values()])
    background = [
        asyncio.create_task(purge_expired_keys(engine)),
        asyncio.create_task(sample_pools({"main": engine, "probe": probe_engine, **replicas.engines})),
    ]
    try:
        yield {
            "engine": engine,
            "probe_engine": probe_engine,
            "replicas": replicas,
            # One place per connection the pool may open; see connect() for why requests queue here.
            "pool_line": asyncio.Semaphore(settings.db_pool_size + settings.db_max_overflow),
            "rate_limiter": limiter,
            "http_metrics": HttpMetrics(app.routes),
            "draining": drain_on_sigterm(settings.shutdown_delay),
        }
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await replicas.close()
        await engine.dispose()
        await probe_engine.dispose()
        log.info("database pool closed")
        await limiter.close()


# --- The app and its middleware -------------------------------------------------------------

DOCS = settings.docs_enabled if settings.docs_enabled is not None else settings.environment == "development"

# FastAPIOffline serves /docs and /redoc from the assets in its wheel: no CDN, no internet needed.
app = FastAPIOffline(
    docs_url="/docs" if DOCS else None,
    redoc_url="/redoc" if DOCS else None,
    static_url="/static",
    # A path with a trailing slash is 404, not a redirect built from the client's Host header.
    redirect_slashes=False,
    lifespan=lifespan,
    # No max_body_size here: FastAPI's limit answers a too-large Content-Length in plain text,
    # past every handler; SizeLimitMiddleware (problems.py) answers it as a problem.
    telemetry=None if settings.telemetry else {"tracing": False, "metrics": False, "logs": False},
    **DOCUMENT,  # title, description, tags: openapi.py
)


def route_path(scope: Scope) -> str:
    """The path as the routes see it: without the root_path a proxy may mount the service under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# The route label of a request no route answered: unknown paths, and what the middleware below
# answers before routing (401, 413, 429).
UNROUTED = "(none)"


class AccessLogMiddleware:
    """Tag every response with X-Request-ID, log one line per request, and count it in the metrics.

    One clock for both. Also the last line of defence: an unhandled exception is logged here
    with its traceback and answered as a bare 500 problem, never with the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.traced = settings.telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        HTTP_IN_FLIGHT.inc()
        request_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        if not SANE_REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(16).encode()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id.decode())
            if status:  # the answer had begun; the server cuts the connection
                raise
            await problem(500, "The server failed to answer; the error is logged.")(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            HTTP_IN_FLIGHT.dec()
            # The template of the route that answered, which Starlette's router puts in the scope.
            route = scope.get("route")
            scope["state"]["http_metrics"].count(scope["method"], route.path if route else UNROUTED, status, seconds)
            # The trace this request is part of, if tracing is on (0: none), joins its line to its spans.
            trace_id = trace.get_current_span().get_span_context().trace_id if self.traced else 0
            log_access(scope["method"], scope["path"], status, seconds, request_id.decode(), trace_id)


# For load balancers, orchestrators and Prometheus, which poll them on a schedule.
NOT_RATE_LIMITED = frozenset({"/health", "/livez", "/readyz", "/metrics"})


class RateLimitMiddleware:
    """Limit requests per client address (ratelimit.py); 429 with Retry-After, and the IETF RateLimit headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in NOT_RATE_LIMITED:
            return await self.app(scope, receive, send)
        # The server has already replaced the peer with X-Forwarded-For from trusted proxies only.
        client = scope["client"][0] if scope.get("client") else "unknown"
        allowed, wait, headers = await scope["state"]["rate_limiter"].hit(client)
        if not allowed:
            RATE_LIMITED.inc()
            response = problem(429, "Too many requests from this address; retry later.", {"Retry-After": str(wait)})
            response.raw_headers.extend(headers)
            return await response(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def bearer_key(scope: Scope, keys: list[bytes]) -> bytes | None:
    """The key of these that the request's Authorization header names, if any."""
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    scheme, _, key = header.partition(b" ")
    # Every key is compared, in constant time, so timing tells nothing about any of them.
    matched = [k for k in keys if hmac.compare_digest(key.strip(), k)]
    return matched[0] if matched and scheme.lower() == b"bearer" else None


class KeyCheckMiddleware:
    """Answer 401 to /api/ without a valid API key, and to /metrics without a metrics key, before anything is read.

    The API key a request matched owns its Idempotency-Keys (request.state.key_owner), however
    the client spelt the header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.owners = {key: owner(key) for key in (k.get_secret_value().encode() for k in settings.api_keys)}
        self.metrics_keys = [key.get_secret_value().encode() for key in settings.metrics_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path.startswith("/api/"):
            key = bearer_key(scope, list(self.owners)) if self.owners else b""
            if key is None:
                return await self.refuse("api", "A valid API key is required", scope, receive, send)
            scope["state"]["key_owner"] = self.owners.get(key, "")  # "": no keys, development
        elif path == "/metrics" and self.metrics_keys and bearer_key(scope, self.metrics_keys) is None:
            return await self.refuse("metrics", "A valid metrics key is required", scope, receive, send)
        await self.app(scope, receive, send)

    async def refuse(self, kind: str, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
        UNAUTHORIZED.labels(kind).inc()
        headers = {"WWW-Authenticate": "Bearer"}
        await problem(401, f"{detail}: Authorization: Bearer <key>.", headers)(scope, receive, send)


# add_middleware puts each one outside the last: a request meets the access log first, then
# the rate limit, which so counts requests without a valid key too (no guessing keys at speed).
app.add_middleware(SizeLimitMiddleware, max_body_size=settings.max_body_size)
app.add_middleware(KeyCheckMiddleware)
app.add_middleware(RateLimitMiddleware)
app.add_middleware(AccessLogMiddleware)


# --- Errors ---------------------------------------------------------------------------------


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        # FastAPI answers a body that json.loads rejects other than as a syntax error (not UTF-8,
        # nested too deep, a number of 5000 digits) with a bare 400; it is malformed JSON all the same.
        errors = [{"loc": ["body"], "msg": "JSON decode error"}]
        return problem(422, "The request is not valid; see errors.", errors=errors)
    detail = (
        exc.detail
        if isinstance(exc.detail, str) and exc.detail != PHRASES.get(exc.status_code)
        else {
            404: "There is nothing at this path.",
            405: f"{request.method} is not allowed here.",
        }.get(exc.status_code, str(exc.detail))
    )
    if exc.status_code == 405:
        return problem(405, detail, {"Allow": allowed_methods(request.scope)})
    return problem(exc.status_code, detail, exc.headers)


def allowed_methods(scope: Scope) -> str:
    """Every method served at this path: Starlette's own Allow names only those of its first route."""
    # A bare scope: the request's own carries the routing state of the route that answered.
    bare = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", ""), "method": ""}
    routes = [r for r in app.routes if isinstance(r, Route) and r.matches(bare)[0] is not Match.NONE]
    return ", ".join(sorted({method for route in routes for method in route.methods or ()}))


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Our validators' ValueErrors state the rule itself; pydantic's msg puts "Value error, " before it.
    told = [
        (e["loc"], str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"])
        for e in exc.errors()[:MAX_ERRORS]
    ]
    errors = [{"loc": list(loc), "msg": msg[:MAX_ERROR_MESSAGE]} for loc, msg in told]
    return problem(422, "The request is not valid; see errors.", errors=errors)


@app.exception_handler(TimeoutError)
@app.exception_handler(PoolTimeoutError)
@app.exception_handler(DBAPIError)
async def database_error(request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 when the database is unavailable now (database.unavailable() says when); else it is a bug."""
    cause = unavailable(exc)
    if cause is None:
        raise exc  # a 500, not an outage: AccessLogMiddleware logs it once, with its traceback
    if isinstance(exc, TimeoutError):
        DB_STATEMENT_TIMEOUTS.inc()
    DB_UNAVAILABLE.labels(cause).inc()
    log.error("database unavailable (%s): %s: %s", cause, type(exc).__name__, exc)
    return problem(503, "The database is not answering; retry shortly.", {"Retry-After": "1"})


# --- Schemas --------------------------------------------------------------------------------

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    Field(examples=["Ada Lovelace"], json_schema_extra=trimmed(100)),
]


def decimal_digits(value: object) -> object:
    """Let only decimal digits through: pydantic alone would also read " 3", "3\t" and "3_000" as 3."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a positive integer written in decimal digits")
    return value


UserId = Annotated[
    int,
    Path(ge=1, le=MAX_ID, description="A positive 64-bit integer.", json_schema_extra={"format": "int64"}),
    BeforeValidator(decimal_digits),
]
MAX_PAGE = 100  # the largest `limit` of GET /api/v1/users


class UserCreate(BaseModel):
    # strict: JSON types must match (no "yes" for true); extra="forbid": no mass assignment.
    model_config = ConfigDict(extra="forbid", strict=True)

    email: emails.Email
    name: Name
    is_active: bool = True


class UserUpdate(BaseModel):
    # Optional, but null is not a value: the validator below refuses it, and the schema leaves
    # it out (openapi.not_null), so a wrong type is told as the field's own error.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=not_null)

    email: emails.Email | None = None
    name: Name | None = None
    is_active: bool | None = None

    @field_validator("email", "name", "is_active", mode="before")
    @classmethod
    def not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out, but not null")
        return value


# What the service sends. bounds(): for the document only (openapi.py says why), as these
# values were checked on the way in, or are the service's own.

# RFC 3339 with the offset, always six fractional digits (pydantic drops them when zero).
Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda d: d.isoformat(timespec="microseconds"), return_type=str),
    bounds(format="date-time", maxLength=32, pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)$"),
]


class UserOut(BaseModel):
    id: int = bounds(format="int64", minimum=1, maximum=MAX_ID)
    email: emails.StoredEmail
    name: str = bounds(minLength=1, maxLength=100, pattern=TRIMMED)  # stored trimmed
    is_active: bool
    created_at: Timestamp
    updated_at: Timestamp


class Page(BaseModel):
    items: list[UserOut] = bounds(maxItems=MAX_PAGE)
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page.",
        json_schema_extra={
            "anyOf": [{"type": "string", "maxLength": 11, "pattern": crud.CURSOR_PATTERN}, {"type": "null"}]
        },
    )


# --- Routes ---------------------------------------------------------------------------------

app.include_router(probes)

if settings.metrics_keys or settings.environment == "development":
    # security: [] as the schema cannot say "a metrics key": API.md's rule, checked by KeyCheckMiddleware.
    metrics = metrics_router(tags=["metrics"], responses=problem_responses(401), openapi_extra={"security": []})
    app.include_router(metrics)

USERS = "/api/v1/users"
# The unique constraint on the email's key (models.py), and what a write that breaks it is told.
EMAIL_TAKEN = "uq_users_email_key"


def user_answer(user: crud.Row, status: int = 200, **headers: str) -> Response:
    """The user as JSON, with its ETag, and any other headers given."""
    body = UserOut.model_validate(user).model_dump_json()
    return Response(body, status, {"ETag": crud.etag(user), **headers}, media_type="application/json")


@app.get(USERS, response_model=Page, **api_operation("users", 400))
async def list_users(
    read: ReadDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, json_schema_extra={"format": "int32"})] = 20,
    cursor: crud.Cursor = None,
) -> dict[str, Any]:
    """List users in ascending id order, one keyset page at a time."""
    # One SELECT, in autocommit: no transaction; on a replica or the primary.
    users, next_cursor = await read(crud.get_page, User, cursor, limit)
    return {"items": users, "next_cursor": next_cursor}


@app.post(
    USERS,
    status_code=201,
    response_model=UserOut,
    **api_operation("users", 400, 409, sends={201: ("ETag", "Location", "Consistency-Token")}),
)
async def create_user(
    new: UserCreate, conn: ConnectionDep, request: Request, idempotency_key: IdempotencyKeyHeader = None
) -> Response:
    """Create a user; 409 when the email is taken, decided by the unique index."""

    async def insert_user() -> Response:
        values = {**new.model_dump(), "email_key": emails.key(new.email)}
        user = await crud.insert_row(conn, User, values, {EMAIL_TAKEN: f"The email {new.email} is already taken"})
        return user_answer(user, 201, Location=f"{USERS}/{user['id']}")

    # Without a key, no transaction: one INSERT, committed as it returns. With one,
    # answer_once() makes the key, the INSERT and the answer kept one transaction.
    if idempotency_key is None:
        return await stamp(await insert_user(), conn, request)
    return await answer_once(conn, request, idempotency_key, new.model_dump(), insert_user)


@app.get(
    f"{USERS}/{{user_id}}",
    response_model=UserOut,
    **api_operation("users", 400, 404, sends={200: ("ETag",), 304: ("ETag",)}),
)
async def get_user(user_id: UserId, read: ReadDep, if_none_match: crud.IfNoneMatch = None) -> Response:
    """Return one user, with its ETag; 304 with no body when If-None-Match names that ETag (or is `*`)."""
    user = await read(crud.get_row, User, user_id)  # one SELECT, in autocommit, on a replica or the primary
    if crud.Preconditions.of(None, if_none_match).refused(User, user):
        return Response(status_code=304, headers={"ETag": crud.etag(user)})
    return user_answer(user)


@app.patch(
    f"{USERS}/{{user_id}}",
    response_model=UserOut,
    **api_operation("users", 400, 404, 409, 412, sends={200: ("ETag", "Consistency-Token")}),
)
async def update_user(
    user_id: UserId,
    changes: UserUpdate,
    conn: ConnectionDep,
    request: Request,
    if_match: crud.IfMatch = None,
    if_none_match: crud.IfNoneMatch = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Change the given fields; with If-Match or If-None-Match, only if the user's version meets them."""
    asked = changes.model_dump(exclude_unset=True)
    wanted = {**asked, "email_key": emails.key(asked["email"])} if "email" in asked else asked
    preconditions = crud.Preconditions.of(if_match, if_none_match)
    taken = {EMAIL_TAKEN: f"The email {asked.get('email')} is already taken"}

    async def apply_update(in_transaction: bool = False) -> Response:
        user = await crud.update_row(conn, User, user_id, wanted, preconditions, taken, in_transaction=in_transaction)
        return user_answer(user)

    # Without a key, no transaction: a read, then an UPDATE that is a compare-and-swap on the
    # version read, which needs none (crud.update_row). With one, answer_once()'s transaction.
    if idempotency_key is None:
        return await stamp(await apply_update(), conn, request)
    asked_for = {**asked, "if_match": if_match, **({"if_none_match": if_none_match} if if_none_match else {})}
    return await answer_once(conn, request, idempotency_key, asked_for, lambda: apply_update(in_transaction=True))


@app.delete(
    f"{USERS}/{{user_id}}", status_code=204, **api_operation("users", 404, 412, sends={204: ("Consistency-Token",)})
)
async def delete_user(
    user_id: UserId,
    conn: ConnectionDep,
    request: Request,
    if_match: crud.IfMatch = None,
    if_none_match: crud.IfNoneMatch = None,
) -> Response:
    """Delete a user; with If-Match or If-None-Match, only if the user's version meets them."""
    # No transaction: one DELETE, conditional on the version, committed as it returns.
    await crud.delete_row(conn, User, user_id, crud.Preconditions.of(if_match, if_none_match))
    return await stamp(Response(status_code=204), conn, request)


finish(app)


if __name__ == "__main__":
    import uvicorn

    # A laptop's database has no deploy step to bring it to the code's revision first; production's has.
    if settings.environment == "development":
        schema.upgrade_to_head()

    # app itself, not "main:app" with reload: the reloader would import this file a second time
    # in its child, and prometheus_client refuses metrics registered twice.
    # forwarded_allow_ips: X-Forwarded-For only from TRUSTED_PROXIES (uvicorn's default believes 127.0.0.1).
    # access_log=False: the one line per request is AccessLogMiddleware's; uvicorn's would double it.
    uvicorn.run(
        app,
        port=int(os.environ.get("PORT", "8000")),
        loop=settings.event_loop,
        forwarded_allow_ips=list(settings.trusted_proxies),
        access_log=False,
    )
