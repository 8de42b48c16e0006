"""User records over HTTP: FastAPI in front of MySQL, MariaDB or SQLite.

The file reads in the order a request meets it:
  0. metrics: Prometheus's, summed over gunicorn's workers through prometheus_client's files
  1. database: the engine and its pool (idle pings, a warning when saturated), and the probe
     engine that /health checks the database on
  2. lifespan: engines per worker, schema and demo data in development, Redis for the limit
  3. the app and its middleware: access log with request ids and the HTTP metrics, rate limit (GCRA, shared by
     the workers, or by every container through Redis), API keys, body size limit
  4. errors: every 4xx and 5xx as application/problem+json
  5. dependencies: `ConnectionDep`, the pooled connection a route's database work runs on
  6. schemas, then routes: /health, the probes /livez and /readyz, /metrics, the offline docs,
     then /api/v1/users in CRUD order
"""

import asyncio
import fcntl
import hmac
import json
import logging
import math
import mmap
import os
import random
import re
import secrets
import signal
import time
import unicodedata
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from importlib.resources import files
from types import FrameType
from typing import Annotated, Any, Literal, NotRequired

import idna
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from opentelemetry import trace
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    TypeAdapter,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy import (
    CursorResult,
    ExceptionContext,
    Executable,
    Row,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12 on

from models import Base, IdempotencyKey, User
from settings import settings

log = logging.getLogger("users")
access_log = logging.getLogger("users.access")


# --- Metrics -------------------------------------------------------------------------------
# Under gunicorn every worker writes its figures to files in PROMETHEUS_MULTIPROC_DIR, which
# gunicorn.conf.py makes before this module is first imported, and /metrics sums the files:
# counters over every worker that ever ran, so a restart loses none; gauges over the workers
# alive now. Without it (uvicorn in development, the in-process tests) this process's registry.
# Gauges are labelled, so that gunicorn's master, which imports this module too, writes none.

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
# For an API that answers in milliseconds; the top buckets hold the requests that met a time limit.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HTTP_REQUESTS = Counter(
    "http_requests", "Requests answered, by method, route template and status.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Seconds from a request's arrival to the end of its answer, by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
# livesum: what the live workers are answering now; a dead worker's count goes with it.
HTTP_IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being answered now.", multiprocess_mode="livesum")
# liveall: each worker's own (a pid label), as each has its own pool, and one saturated worker
# would hide in a sum; a dead worker's series go with it.
DB_POOL_SIZE = Gauge("db_pool_size", "Connections the pool keeps open.", ["pool"], multiprocess_mode="liveall")
DB_POOL_CHECKED_OUT = Gauge(
    "db_pool_checked_out", "Connections lent to requests now.", ["pool"], multiprocess_mode="liveall"
)
DB_POOL_OVERFLOW = Gauge(
    "db_pool_overflow", "Connections open beyond the pool's size now.", ["pool"], multiprocess_mode="liveall"
)
DB_POOL_WAITING = Gauge(
    "db_pool_waiting_requests", "Requests waiting in line for a connection now.", ["pool"], multiprocess_mode="liveall"
)
DB_POOL_WAIT = Histogram(
    "db_pool_wait_seconds",
    "Seconds a request waited in line for a pooled connection (DB_POOL_TIMEOUT at most).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
DB_STATEMENT_TIMEOUTS = Counter("db_statement_timeouts", "Requests whose database work overran DB_TIMEOUT.")
DB_UNAVAILABLE = Counter(
    "db_unavailable_responses",
    "503s answered because of the database, by cause: pool_timeout, db_timeout, connection.",
    ["cause"],
)
DB_INVALIDATED = Counter("db_connections_invalidated", "Connections the pool discarded as dead or unusable.", ["pool"])
UNAUTHORIZED = Counter(
    "http_unauthorized_responses", "401s for a missing or wrong bearer key, by the key's kind: api, metrics.", ["key"]
)
RATE_LIMITED = Counter("http_rate_limited_responses", "429s answered by the rate limit.")
# livesum: how many live workers count in Redis (the limit shared by every container) and how
# many on this machine alone (no REDIS_URL, or Redis out).
RATE_LIMIT_WORKERS = Gauge(
    "rate_limit_workers",
    "Workers counting the rate limit in Redis or on this machine alone, by counting: redis, local.",
    ["counting"],
    multiprocess_mode="livesum",
)


def rate_limit_counted_in(where: str) -> None:
    """Say in the metrics whether this worker counts the rate limit in "redis" or "local"ly."""
    RATE_LIMIT_WORKERS.labels("redis").set(where == "redis")
    RATE_LIMIT_WORKERS.labels("local").set(where == "local")


# --- Database ------------------------------------------------------------------------------


def create_engine(*, probe: bool = False) -> AsyncEngine:
    """Create the engine; each worker process calls this once, in its lifespan.

    With probe=True, an engine of one connection for the health check, so that it never
    waits in line behind user traffic for a connection of the main pool.
    """
    is_sqlite = settings.database_url.startswith("sqlite")
    pool_size, max_overflow = (1, 0) if probe else (settings.db_pool_size, settings.db_max_overflow)
    engine = create_async_engine(
        settings.database_url,
        # Autocommit: each statement is its own transaction, committed when it returns. Every
        # route writes with one statement, so a COMMIT would be a round trip that protects
        # nothing, and a connection never goes back to the pool inside a transaction.
        isolation_level="AUTOCOMMIT",
        # For the same reason there is nothing to roll back when a connection is returned or
        # closed, and no ROLLBACK round trip is sent for it.
        pool_reset_on_return=None,
        skip_autocommit_rollback=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=settings.db_pool_recycle,
        pool_timeout=settings.db_pool_timeout,
        connect_args=(
            {"timeout": settings.db_timeout}
            if is_sqlite
            else {"connect_timeout": settings.db_timeout, "charset": "utf8mb4"}
        ),
    )
    watch_pool(engine, pool_size + max_overflow, "probe" if probe else "main")
    event.listen(engine.sync_engine, "handle_error", closed_transport_is_a_disconnect)
    return engine


def closed_transport_is_a_disconnect(context: ExceptionContext) -> DBAPIError | None:
    """Make aiomysql's RuntimeError on uvloop for a closed connection the disconnect it is.

    On asyncio, aiomysql writing to a connection that the server or the network has closed
    raises OperationalError; on uvloop the transport's own RuntimeError escapes instead
    (aio-libs/aiomysql#966), which SQLAlchemy would neither recognise nor wrap. Remove this
    once aiomysql raises its own error there.
    """
    error = context.original_exception
    if not (isinstance(error, RuntimeError) and "handler is closed" in str(error)):
        return None
    context.is_disconnect = True  # SQLAlchemy invalidates the connection: it is never pooled again
    return OperationalError(context.statement, context.parameters, error, connection_invalidated=True)


# A connection that sat idle this long is pinged before use: the server (wait_timeout) or a
# proxy may have closed it. Busy connections skip the ping and its round trip.
IDLE_PING_AFTER = 2.0
# How often a saturated pool is reported, at most.
SATURATION_LOG_INTERVAL = 10.0


def watch_pool(engine: AsyncEngine, capacity: int, name: str) -> None:
    """Ping connections that were idle, warn when the pool is saturated, count connections invalidated."""
    pool = engine.sync_engine.pool
    last_warning = 0.0
    invalidated = DB_INVALIDATED.labels(name)

    @event.listens_for(pool, "invalidate")
    def on_invalidate(dbapi_connection: Any, record: ConnectionPoolEntry, exception: BaseException | None) -> None:
        invalidated.inc()

    @event.listens_for(pool, "checkin")
    def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "close")
    def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # The server or a proxy may have cut this connection already (wait_timeout, an idle
        # cut). The dialect's terminate says goodbye where it can and shuts the socket where it
        # cannot, so the pool's close that follows finds nothing left to do, and logs no
        # traceback for a goodbye that could not be said.
        try:
            engine.dialect.do_terminate(dbapi_connection)
        except RuntimeError:
            # On uvloop aiomysql's goodbye to a closed connection raises RuntimeError, which
            # terminate does not expect (aio-libs/aiomysql#966): shut the socket without one.
            dbapi_connection.driver_connection.close()

    @event.listens_for(pool, "checkout")
    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        nonlocal last_warning
        now = time.monotonic()
        if now - record.info.get("idle_since", now) > IDLE_PING_AFTER:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:
                # The pool discards this connection and checks out another.
                raise DisconnectionError("idle connection was closed") from exc
        # The probe engine's one connection is in use whenever a probe runs: that is no queue.
        saturated = name == "main" and pool.checkedout() >= capacity  # type: ignore[attr-defined]
        if saturated and now - last_warning > SATURATION_LOG_INTERVAL:
            last_warning = now
            log.warning(
                "database pool saturated: %d of %d connections in use; requests are queueing "
                "(raise DB_POOL_SIZE or WEB_CONCURRENCY within the server's max_connections)",
                pool.checkedout(),  # type: ignore[attr-defined]
                capacity,
            )


# Seconds between two writes of the pool's figures to their gauges: a scrape every 15 s or so
# gains nothing from more, and requests pay nothing for them.
POOL_SAMPLE_INTERVAL = 1.0


async def sample_pools(engines: dict[str, AsyncEngine]) -> None:
    """Write each pool's figures to its gauges, until cancelled; a scrape in any worker reads them."""
    DB_POOL_WAITING.labels("main").set(0)  # from the start, not from the first wait
    gauges = [
        (engine, DB_POOL_SIZE.labels(name), DB_POOL_CHECKED_OUT.labels(name), DB_POOL_OVERFLOW.labels(name))
        for name, engine in engines.items()
    ]
    while True:
        for engine, size, checked_out, overflow in gauges:
            status = pool_status(engine)
            size.set(status["size"])
            checked_out.set(status["checked_out"])
            overflow.set(status["overflow"])
        await asyncio.sleep(POOL_SAMPLE_INTERVAL)


def pool_status(engine: AsyncEngine) -> dict[str, int]:
    pool: Any = engine.pool
    return {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": max(pool.overflow(), 0),
        "max_overflow": settings.db_max_overflow,
    }


# --- Lifespan ------------------------------------------------------------------------------


# One encoder for every line: json.dumps() with any option builds a new encoder per call.
JSON_LINE = json.JSONEncoder(ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return JSON_LINE.encode(entry)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    if settings.environment == "production":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("users")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    root.propagate = False


DEMO_USERS = [
    ("ada@example.com", "Ada Lovelace"),
    ("grace@example.com", "Grace Hopper"),
    ("alan@example.com", "Alan Turing"),
]


async def create_schema(engine: AsyncEngine) -> None:
    """Create the table if missing; in production gunicorn's master does it once, before fork."""
    async with engine.connect() as conn:
        await conn.run_sync(Base.metadata.create_all)


async def create_schema_and_demo_users(engine: AsyncEngine) -> None:
    """Create the table if missing; a fresh database gets a few demo users."""
    await create_schema(engine)
    async with engine.connect() as conn:
        if await conn.scalar(select(func.count()).select_from(User)) == 0:
            now = datetime.now(UTC)
            # Several workers may find the table empty at once; the unique index lets one seed it.
            with suppress(IntegrityError):
                await conn.execute(
                    insert(User),
                    [
                        {
                            "email": e,
                            "email_key": e.lower(),
                            "name": n,
                            "is_active": True,
                            "created_at": now,
                            "updated_at": now,
                            "version": 1,
                        }
                        for e, n in DEMO_USERS
                    ],
                )


# Seconds between two purges of expired Idempotency-Keys, on average, in each worker.
KEY_PURGE_INTERVAL = 300.0
# Keys one DELETE removes at most, so that no purge holds locks that user writes wait on for long.
KEY_PURGE_BATCH = 500


async def purge_expired_keys(engine: AsyncEngine) -> None:
    """Now and then, delete the Idempotency-Keys older than IDEMPOTENCY_TTL_HOURS; runs in every worker.

    That is safe with any number of workers: each batch is deleted by primary key in a
    statement of its own, so two workers on the same batch delete it once between them.
    """
    while True:
        # Jittered, so that the workers of a fleet started together do not purge together.
        await asyncio.sleep(KEY_PURGE_INTERVAL * random.uniform(0.5, 1.5))
        try:
            async with asyncio.timeout(KEY_PURGE_INTERVAL / 10):
                await delete_expired_keys(engine)
        except (TimeoutError, PoolTimeoutError, DBAPIError) as exc:
            log.warning("purging expired idempotency keys failed, next time then: %s", type(exc).__name__)


async def delete_expired_keys(engine: AsyncEngine, batch: int = KEY_PURGE_BATCH) -> int:
    """Delete expired Idempotency-Keys, a batch at a time; return how many."""
    select_batch = (
        select(IdempotencyKey.id)
        .where(IdempotencyKey.created_at < bindparam("cutoff"))
        .order_by(IdempotencyKey.created_at)
        .limit(batch)
    )
    deleted = 0
    async with engine.connect() as conn:
        while True:
            ids = (await conn.execute(select_batch, {"cutoff": key_expiry()})).scalars().all()
            if ids:  # in autocommit, each batch is committed on its own
                await conn.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(ids)))
            deleted += len(ids)
            if len(ids) < batch:
                return deleted


def key_expiry() -> datetime:
    """The creation time before which an Idempotency-Key has expired."""
    return datetime.now(UTC) - timedelta(hours=settings.idempotency_ttl_hours)


def drain_on_sigterm(draining: asyncio.Event) -> None:
    """On SIGTERM, mark this worker draining at once, and pass the signal on to the server SHUTDOWN_DELAY later.

    The server (uvicorn, also as gunicorn's worker) has installed its own SIGTERM handler before
    it starts the lifespan; on the signal it stops accepting connections within 0.1 s. Held back,
    the worker goes on serving while /readyz answers 503, so that balancers stop sending to it
    before it closes. uvicorn's handler is the only one SIGTERM reaches: uvicorn-worker resets
    gunicorn's Worker.handle_exit, and creates uvicorn's Server where no subclass can replace it.
    """
    server_stop = signal.getsignal(signal.SIGTERM)
    if not callable(server_stop):  # no server's handler to pass it on to: the tests' in-process app
        return
    loop = asyncio.get_running_loop()

    def begin_draining(sig: int, frame: FrameType | None) -> None:
        draining.set()
        loop.call_later(settings.shutdown_delay, server_stop, sig, frame)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes, even in the event loop's own code: the
        # thread-safe call is the one way in that cannot catch the loop half way.
        loop.call_soon_threadsafe(begin_draining, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def instrument_sql(engines: list[AsyncEngine]) -> None:
    """Trace each SQL statement as a child of the request's span (TELEMETRY=true)."""
    # Installed by the deployment that turns TELEMETRY on (README.md, "Tracing"); the image
    # without it does not need it. The engines given are traced through SQLAlchemy's public
    # cursor events; the instrumentor also wraps create_engine, as its design is.
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # skip_dep_check: the instrumentation's declared range (sqlalchemy < 2.1) predates 2.1, whose
    # events it uses are unchanged; without it, it instruments nothing. The tracing test in
    # test_main.py pins that statements are traced; drop this once the range includes 2.1.
    SQLAlchemyInstrumentor().instrument(engines=[engine.sync_engine for engine in engines], skip_dep_check=True)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    configure_logging()
    if not settings.api_keys:
        log.warning("!!! API_KEYS is empty: /api/v1 is open to anyone (development only) !!!")
    engine = create_engine()
    probe_engine = create_engine(probe=True)
    if settings.environment == "development":
        await create_schema_and_demo_users(engine)
    # Per worker, like the engine: its connections belong to this worker's event loop.
    redis_limiter = (
        RedisRateLimiter(settings.redis_url.get_secret_value(), settings.rate_limit, settings.rate_limit_window)
        if settings.redis_url
        else None
    )
    if redis_limiter:
        await redis_limiter.connect()
    purge = asyncio.create_task(purge_expired_keys(engine))
    rate_limit_counted_in("redis" if redis_limiter else "local")
    if settings.telemetry:
        instrument_sql([engine, probe_engine])
    draining = asyncio.Event()
    drain_on_sigterm(draining)
    sampler = asyncio.create_task(sample_pools({"main": engine, "probe": probe_engine}))
    try:
        # One place per connection the pool may open; see connect() for why requests queue here.
        pool_line = asyncio.Semaphore(settings.db_pool_size + settings.db_max_overflow)
        yield {
            "engine": engine,
            "probe_engine": probe_engine,
            "pool_line": pool_line,
            "redis_limiter": redis_limiter,
            "draining": draining,
        }
    finally:
        for task in (sampler, purge):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await engine.dispose()
        await probe_engine.dispose()
        log.info("database pool closed")
        if redis_limiter:
            await redis_limiter.redis.aclose()


# --- The app and its middleware ----------------------------------------------------------

DOCS = settings.docs_enabled if settings.docs_enabled is not None else settings.environment == "development"

app = FastAPI(
    title="Users API",
    version="1.0.0",
    description="User records: create, read, list, update and delete, with bearer API keys, ETags and a rate limit.",
    # Relative: the schema describes whichever deployment serves it, at that origin.
    servers=[
        {
            "url": "/",
            "description": "The deployment that serves this schema: production or local development.",
            "x-internal": False,
        }
    ],
    # No license has been chosen for this code yet; until one is, nobody else may use it.
    license_info={"name": "Proprietary: all rights reserved", "identifier": "LicenseRef-Proprietary"},
    contact={"name": "The Users API maintainers"},
    openapi_tags=[
        {"name": "users", "description": "The user records, under /api/v1; every operation needs an API key."},
        {"name": "health", "description": "For load balancers and orchestrators; needs no key."},
        {"name": "metrics", "description": "For Prometheus; needs a key of METRICS_KEYS in production."},
    ],
    # operationId: the route function's name, which generated clients name their functions after.
    generate_unique_id_function=lambda route: route.name,
    lifespan=lifespan,
    # No max_body_size here: FastAPI's limit answers a too-large Content-Length in plain text,
    # past every handler; BodyLimitMiddleware below answers it as a problem.
    # Served below from local files: the CDN pages FastAPI links by default need the internet.
    docs_url=None,
    redoc_url=None,
    telemetry=None if settings.telemetry else {"tracing": False, "metrics": False, "logs": False},
)


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": PHRASES.get(status, "Error"), "status": status, "detail": detail, **extra}
    return JSONResponse(body, status, headers, media_type="application/problem+json")


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
    500: "Internal Server Error",
    503: "Service Unavailable",
}

SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# The methods counted by name; any other is "_OTHER", so a client cannot invent new series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
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
        self.in_flight = HTTP_IN_FLIGHT
        # Bound label children by (method, route, status): labels() takes a lock and builds a key
        # on every call. The routes are all added by the time the first call (the lifespan's)
        # builds the middleware: their histograms exist from the start, at zero.
        self.children: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}
        for route in app_routes():
            for method in route.methods or ():
                HTTP_DURATION.labels(method, route.path)

    def count(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in HTTP_METHODS:
            method = "_OTHER"
        children = self.children.get((method, route, status))
        if children is None:
            counter = HTTP_REQUESTS.labels(method, route, str(status))
            histogram = HTTP_DURATION.labels(method, route)
            children = self.children[method, route, status] = (counter.inc, histogram.observe)
        inc, observe = children
        inc()
        observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        self.in_flight.inc()
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
            self.in_flight.dec()
            # The template of the route that answered, which Starlette's router puts in the scope.
            route = scope.get("route")
            self.count(scope["method"], route.path if route else UNROUTED, status, seconds)
            path = scope["path"]
            if not path.isprintable():  # a decoded %0A would start a forged line in a plain-text log
                path = path.encode("unicode_escape").decode("ascii")
            trace_id = ""
            if self.traced and (span := trace.get_current_span().get_span_context()).is_valid:
                trace_id = f" trace_id={span.trace_id:032x}"  # how logs and traces join up
            # A scrape every few seconds would drown the requests' lines.
            (access_log.debug if path == "/metrics" else access_log.info)(
                "%s %s %d %.1fms %s%s",
                scope["method"],
                path,
                status,
                seconds * 1000,
                request_id.decode(),
                trace_id,
            )


def app_routes() -> list[Route]:
    return [route for route in app.routes if isinstance(route, Route)]


def bearer_key_in(scope: Scope, keys: list[bytes]) -> bool:
    """Whether the request's Authorization is a bearer key of these."""
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    scheme, _, key = header.partition(b" ")
    # Every key is compared, in constant time, so timing tells nothing about any of them.
    matches = [hmac.compare_digest(key.strip(), k) for k in keys]
    return scheme.lower() == b"bearer" and any(matches)


class ApiKeyMiddleware:
    """Answer 401 to /api/ requests without a valid bearer key, before anything else is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.keys = [key.get_secret_value().encode() for key in settings.api_keys]
        self.rejected = UNAUTHORIZED.labels("api")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.keys
            and scope["type"] == "http"
            and scope["path"].startswith("/api/")
            and not bearer_key_in(scope, self.keys)
        ):
            self.rejected.inc()
            response = problem(
                401, "A valid API key is required: Authorization: Bearer <key>.", {"WWW-Authenticate": "Bearer"}
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


# Rate limiting is GCRA, the generic cell rate algorithm: all it keeps per client is one float,
# the theoretical arrival time (TAT) of its next request if it sent one every interval
# (window / limit). A request is allowed while the TAT is less than a window ahead of now,
# and moves the TAT one interval further. A fresh client may so send `limit` requests at once,
# then one per interval: a token bucket, without a counter per window to reset or sweep,
# and small enough to live in one Redis key or one 16-byte slot of a shared table.

# Client addresses the table holds at once (1 MiB); far more than one container sees per window.
RATE_TABLE_SLOTS = 1 << 16
# Slots looked at for one address: enough that a busy neighbourhood never evicts a live client.
RATE_TABLE_PROBES = 8
# Seconds one Redis call may take. A healthy one takes under a millisecond; the margin is for
# a busy machine, where a spurious timeout would loosen the limit to per container for a while.
REDIS_TIMEOUT = 0.25
# Failures in a row after which Redis counts as out: one slow answer on a busy machine does not.
REDIS_FAILURES_TO_PAUSE = 3
# Seconds Redis is then left alone, so an outage costs one timeout per pause, not one per request.
REDIS_PAUSE = 5.0


class RateLimitTable:
    """GCRA state per client address in a fixed-size hash table, on this machine.

    Under gunicorn the table is a file in shared memory that the master created before it
    forked the workers (gunicorn.conf.py passes its path in RATE_LIMIT_TABLE). Every worker
    maps it and locks it with fcntl for the microseconds of one update, so the limit is the
    service's, however many workers share the counting. Without it (uvicorn in development,
    tests over ASGI) the table is this process's own memory, and needs no lock.
    """

    def __init__(self, limit: int, window: int, path: str | None) -> None:
        self.window = float(window)
        self.interval = window / limit
        size = RATE_TABLE_SLOTS * 16  # per slot: 8 bytes of the address's hash, 8 of its TAT
        if path:
            # A POSIX lock belongs to the process, not to the descriptor: it excludes the
            # other workers even if this descriptor was inherited, and dies with its holder.
            self.lock_fd: int | None = os.open(path, os.O_RDWR)
            os.ftruncate(self.lock_fd, size)  # zeros the first time; the same size again is a no-op
            memory = mmap.mmap(self.lock_fd, size)
        else:
            self.lock_fd = None
            memory = mmap.mmap(-1, size)
        self.keys = memoryview(memory)[: size // 2].cast("Q")  # 0: a slot never used
        self.tats = memoryview(memory)[size // 2 :].cast("d")

    def hit(self, client: str) -> tuple[bool, float]:
        """Count one request; return whether it is allowed, and how far ahead of now the TAT is."""
        # A hash that every process computes alike (Python's own hash() is salted per process).
        key = int.from_bytes(blake2b(client.encode(), digest_size=8).digest()) or 1
        # CLOCK_MONOTONIC: one clock for every process on the machine, and never set back.
        now = time.monotonic()
        if self.lock_fd is not None:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            slot = self.slot(key)
            tat = max(self.tats[slot], now) if self.keys[slot] == key else now
            if tat - now > self.window - self.interval:
                return False, tat - now
            self.keys[slot], self.tats[slot] = key, tat + self.interval
            return True, tat + self.interval - now
        finally:
            if self.lock_fd is not None:
                fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)

    def slot(self, key: int) -> int:
        """The slot holding key; else the first never used; else the one with the oldest TAT.

        A TAT in the past means a full quota, the same as no entry at all, so expired slots
        need no sweeping: they are simply the first to be taken over. Slots are never
        emptied, so a key is never stored past the first empty slot of its run.
        """
        oldest = key % RATE_TABLE_SLOTS
        for i in range(key, key + RATE_TABLE_PROBES):
            slot = i % RATE_TABLE_SLOTS
            if self.keys[slot] == key or self.keys[slot] == 0:
                return slot
            if self.tats[slot] < self.tats[oldest]:
                oldest = slot
        return oldest


# The same GCRA in Redis, atomic because Redis runs one script at a time. The time is
# Redis's own, so containers whose clocks differ still agree. Numbers go back as strings:
# Redis would cut Lua's floats down to integers.
GCRA_SCRIPT = """
local time = redis.call("TIME")
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local interval, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call("GET", KEYS[1])) or now, now)
if tat - now > window - interval then
    return {0, tostring(tat - now)}
end
tat = tat + interval
redis.call("SET", KEYS[1], tostring(tat), "PX", math.ceil((tat - now) * 1000))
return {1, tostring(tat - now)}
"""


class RedisRateLimiter:
    """GCRA in Redis, so that the limit holds across every container that shares it."""

    def __init__(self, url: str, limit: int, window: int) -> None:
        # No retries of redis-py's own: while Redis fails, the request is counted locally at once.
        self.redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        self.gcra = self.redis.register_script(GCRA_SCRIPT)
        self.args = (window / limit, window)
        self.failures = 0  # in a row
        self.paused_until = 0.0

    async def connect(self) -> None:
        """Open a connection and load the script at start, so the first requests do not wait for it."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.script_load(GCRA_SCRIPT)
        except (RedisError, OSError) as exc:
            self.failed(exc)

    async def hit(self, client: str) -> tuple[bool, float] | None:
        """Count one request in Redis; None when Redis is out, for the caller to count it locally."""
        if time.monotonic() < self.paused_until:
            return None
        try:
            # Also bounds the wait for a free connection, which the socket timeouts do not.
            async with asyncio.timeout(REDIS_TIMEOUT):
                allowed, ahead = await self.gcra(keys=[settings.redis_key_prefix + client], args=self.args)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError, and a refused connection
            self.failed(exc)
            return None
        if self.failures >= REDIS_FAILURES_TO_PAUSE:
            log.warning("Redis is back: the rate limit is shared again")
            rate_limit_counted_in("redis")
        self.failures = 0
        return allowed == 1, float(ahead)

    def failed(self, exc: Exception) -> None:
        """Count a failure; after REDIS_FAILURES_TO_PAUSE in a row, leave Redis alone for REDIS_PAUSE.

        A circuit breaker: a stalled Redis then costs one timeout per pause, not one per request.
        """
        self.failures += 1
        if self.failures == REDIS_FAILURES_TO_PAUSE:  # requests that waited together fail together: log once
            log.warning("Redis is out (%r): the rate limit is per container for a while", exc)
            rate_limit_counted_in("local")
        if self.failures >= REDIS_FAILURES_TO_PAUSE:
            self.paused_until = time.monotonic() + REDIS_PAUSE


# For load balancers, orchestrators and Prometheus, which poll them on a schedule.
NOT_RATE_LIMITED = frozenset({"/health", "/livez", "/readyz", "/metrics"})


class RateLimitMiddleware:
    """Limit requests per client address; 429 with Retry-After, and the IETF RateLimit headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Not a setting: gunicorn's master sets it for the workers it forks (gunicorn.conf.py).
        self.table = RateLimitTable(settings.rate_limit, settings.rate_limit_window, os.environ.get("RATE_LIMIT_TABLE"))
        self.policy = f'"default";q={settings.rate_limit};w={settings.rate_limit_window}'.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NOT_RATE_LIMITED:
            return await self.app(scope, receive, send)
        # The server has already replaced the peer with X-Forwarded-For from trusted proxies only.
        client = scope["client"][0] if scope.get("client") else "unknown"
        # The lifespan's RedisRateLimiter, when REDIS_URL is set.
        redis = scope.get("state", {}).get("redis_limiter")
        verdict = await redis.hit(client) if redis else None
        if verdict is None:  # no Redis, or Redis is out: this machine's table
            verdict = self.table.hit(client)
        allowed, ahead = verdict
        # Requests left now, and "t": seconds until one more is (draft -10: "until additional
        # quota is made available"). The 1e-9 absorbs float error at whole numbers.
        quota = (self.table.window - ahead) / self.table.interval
        remaining = max(0, math.floor(quota + 1e-9)) if allowed else 0
        wait = max(1, math.ceil((remaining + 1 - quota) * self.table.interval - 1e-9))
        headers = [
            (b"ratelimit-policy", self.policy),
            (b"ratelimit", f'"default";r={remaining};t={wait}'.encode()),
        ]
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


class BodyLimitMiddleware:
    """Answer 413 to a request body over MAX_BODY_SIZE, without reading it to the end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.limit = settings.max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
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


# add_middleware puts each one outside the last: a request meets the access log first, then
# the rate limit, which so counts requests without a valid key too (no guessing keys at speed).
app.add_middleware(BodyLimitMiddleware)
app.add_middleware(ApiKeyMiddleware)
app.add_middleware(RateLimitMiddleware)
app.add_middleware(AccessLogMiddleware)


# --- Errors ------------------------------------------------------------------------------


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


# A 422 lists at most this many errors, each message cut to at most MAX_ERROR_MESSAGE characters,
# as the schema's Problem says: a body of thousands of unknown fields gets the first few, not an
# answer larger than itself.
MAX_ERRORS = 20
MAX_ERROR_MESSAGE = 512


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"][:MAX_ERROR_MESSAGE]} for e in exc.errors()[:MAX_ERRORS]]
    return problem(422, "The request is not valid; see errors.", errors=errors)


@app.exception_handler(TimeoutError)
@app.exception_handler(PoolTimeoutError)
@app.exception_handler(DBAPIError)
async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Answer 503 when the database is unreachable, too slow, or dropped the connection."""
    if isinstance(exc, DBAPIError) and not (
        isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated
    ):
        raise exc  # a bug, not an outage: AccessLogMiddleware logs it and answers 500
    if isinstance(exc, PoolTimeoutError):
        cause = "pool_timeout"
    elif isinstance(exc, TimeoutError):
        cause = "db_timeout"
        DB_STATEMENT_TIMEOUTS.inc()
    else:
        cause = "connection"
    DB_UNAVAILABLE.labels(cause).inc()
    log.error("database unavailable: %s: %s", type(exc).__name__, exc)
    return problem(503, "The database is not answering; retry shortly.", {"Retry-After": "1"})


# --- Dependencies ------------------------------------------------------------------------


async def connect(request: Request) -> AsyncIterator[AsyncConnection]:
    """Lend the request a pooled connection; its database work must end within the time limits.

    DB_POOL_TIMEOUT bounds the wait for a connection, and DB_TIMEOUT everything after it: the
    checkout (a new connection's handshake, an idle one's ping) and every statement the route
    runs, together. A statement cut off by the limit leaves its connection unusable, and
    SQLAlchemy invalidates it rather than pool it again. The wait's limit surfaces as
    PoolTimeoutError and the work's as TimeoutError; database_unavailable() answers both 503.

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

# scope="function": the connection goes back to the pool when the route returns, before the
# response is sent to a client that may be slow to read it.
ConnectionDep = Annotated[AsyncConnection, Depends(connect, scope="function")]


async def read(
    conn: AsyncConnection, statement: Executable, params: dict[str, Any], *, retry: bool = True
) -> CursorResult[Any]:
    """Run a read; if the connection turns out dead (killed by the server, cut by the network), once more.

    Not inside a transaction (retry=False): the transaction died with the connection.
    """
    try:
        return await conn.execute(statement, params)
    except DBAPIError as exc:
        if not (retry and exc.connection_invalidated):
            raise
    await conn.rollback()  # lets go of the dead connection; the next statement checks out a fresh one
    return await conn.execute(statement, params)


# --- Schemas -----------------------------------------------------------------------------


# An address as RFC 5322 writes it, with RFC 6531's Unicode: a dot-atom local part of at most
# 64 bytes, then a host name of two or more labels, the last ending in a letter. Quoted local
# parts and address literals ("a b"@x, a@[192.0.2.1]) are refused, as most mail systems do.
# Reserved names (.test, .invalid, .local) are syntactically valid, which is all API.md asks.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
LOCAL_PART = re.compile(rf"{ATOM}(?:\.{ATOM})*")
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_email(value: str) -> str:
    """Check the syntax; lower-case the domain and keep the local part as given."""
    local, _, domain = value.rpartition("@")
    # Unicode letters, marks, digits, symbols and punctuation; no controls, spaces or surrogates.
    visible = local.isascii() or all(unicodedata.category(c)[0] not in "CZ" for c in local)
    if not (visible and LOCAL_PART.fullmatch(local) and len(local.encode()) <= 64):
        raise ValueError("the part before the @ is not a valid local part")
    domain = domain.lower()
    labels = [host_label(label) for label in domain.split(".")]
    if len(labels) < 2 or not labels[-1][-1].isalpha() or len(".".join(labels)) > 253:
        raise ValueError("the part after the @ is not a host name of two or more labels")
    return f"{local}@{domain}"


def host_label(label: str) -> str:
    """The label as DNS carries it (IDNA for Unicode); ValueError if it is not a valid one."""
    if HOST_LABEL.fullmatch(label) and label[2:4] != "--":  # "--" there is reserved for IDNA
        return label
    try:
        return idna.alabel(unicodedata.normalize("NFC", label)).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise ValueError(f"the part after the @ has an invalid label {label!r}") from None


# format "email" tells clients (and schemathesis) that any string will not do.
Email = Annotated[
    str,
    StringConstraints(max_length=254),
    AfterValidator(normalize_email),
    Field(examples=["ada@example.com"], json_schema_extra={"format": "email"}),
]
# What strip_whitespace trims (Unicode White_Space), spelled out: ECMA, Python and Rust regex
# engines each read \s differently.
WHITE_SPACE = r"\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def trimmed_name_schema(schema: dict[str, Any]) -> None:
    """Say "1 to 100 characters after trimming" in JSON Schema, whose lengths count the white space too."""
    del schema["minLength"]
    # The white space around a name is trimmed, not counted: only the body's size bounds it.
    schema["maxLength"] = settings.max_body_size
    schema["pattern"] = rf"^[{WHITE_SPACE}]*[^{WHITE_SPACE}]([\s\S]{{0,98}}[^{WHITE_SPACE}])?[{WHITE_SPACE}]*$"


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    Field(
        examples=["Ada Lovelace"],
        description="1 to 100 characters after trimming surrounding white space.",
        json_schema_extra=trimmed_name_schema,
    ),
]


def decimal_digits(value: object) -> object:
    """Let only decimal digits through: pydantic alone would also read " 3", "3\t" and "3_000" as 3."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a positive integer written in decimal digits")
    return value


# The largest id the id column holds: a signed 64-bit integer (BIGINT on MySQL).
MAX_USER_ID = 2**63 - 1
UserId = Annotated[
    int,
    Path(ge=1, le=MAX_USER_ID, description="A positive 64-bit integer.", json_schema_extra={"format": "int64"}),
    BeforeValidator(decimal_digits),
]
# The opaque `next_cursor`: an id's 8 bytes in URL-safe base64, unpadded (encode_cursor below).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]$"
# Enough for dozens of entity tags. Within it any value is taken: one that names no current
# version is answered 412, malformed or not (API.md).
MAX_IF_MATCH = 1024


class UserCreate(BaseModel):
    # strict: JSON types must match (no "yes" for true); extra="forbid": no mass assignment.
    model_config = ConfigDict(extra="forbid", strict=True)

    email: Email
    name: Name
    is_active: bool = True


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # Optional, but null is not a value: SkipJsonSchema keeps null out of the schema, and the
    # validator below rejects it.
    email: Email | SkipJsonSchema[None] = None
    name: Name | SkipJsonSchema[None] = None
    is_active: bool | SkipJsonSchema[None] = None

    @field_validator("email", "name", "is_active", mode="before")
    @classmethod
    def not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out, but not null")
        return value


# The models below describe what the service sends. Their bounds are in json_schema_extra, for
# the schema only: FastAPI checks every response against its model, and these values were
# checked on the way in, or are the service's own.

# RFC 3339 with the offset, always six fractional digits (pydantic drops them when zero).
Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda d: d.isoformat(timespec="microseconds"), return_type=str),
    Field(
        json_schema_extra={
            "format": "date-time",
            "maxLength": 32,
            "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)$",
        }
    ),
]


class UserOut(BaseModel):
    id: int = Field(json_schema_extra={"format": "int64", "minimum": 1, "maximum": MAX_USER_ID})
    # 254: what the column holds.
    email: str = Field(json_schema_extra={"format": "email", "maxLength": 254})
    # Stored trimmed.
    name: str = Field(
        json_schema_extra={
            "minLength": 1,
            "maxLength": 100,
            "pattern": rf"^[^{WHITE_SPACE}]([\s\S]*[^{WHITE_SPACE}])?$",
        }
    )
    is_active: bool
    created_at: Timestamp
    updated_at: Timestamp


MAX_PAGE = 100  # the largest `limit` of GET /api/v1/users


class Page(BaseModel):
    items: list[UserOut] = Field(json_schema_extra={"maxItems": MAX_PAGE})
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page.",
        json_schema_extra={"anyOf": [{"type": "string", "maxLength": 11, "pattern": CURSOR_PATTERN}, {"type": "null"}]},
    )


class Checks(BaseModel):
    database: Literal["ok", "unavailable"]


# int32: a pool is bounded by the database's max_connections, itself far below 2**31.
PoolFigure = Annotated[int, Field(json_schema_extra={"format": "int32", "minimum": 0, "maximum": 2**31 - 1})]


class Pool(BaseModel):
    size: PoolFigure
    checked_out: PoolFigure
    overflow: PoolFigure
    max_overflow: PoolFigure


class Health(BaseModel):
    status: Literal["ok"]
    checks: Checks = Field(examples=[{"database": "ok"}])
    pool: Pool = Field(examples=[{"size": 10, "checked_out": 1, "overflow": 0, "max_overflow": 5}])


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


class Problem(TypedDict):
    """An RFC 9457 problem document: the body of every 4xx and 5xx answer."""

    type: Literal["about:blank"]
    title: Annotated[str, Field(json_schema_extra={"maxLength": 64, "pattern": r"^[A-Z][A-Za-z ]*$"})]
    status: Annotated[int, Field(json_schema_extra={"format": "int32", "minimum": 400, "maximum": 599})]
    detail: Annotated[str, Field(json_schema_extra={"maxLength": 1024})]
    # Only in a 422: what was not valid.
    errors: NotRequired[Annotated[list[ProblemError], Field(json_schema_extra={"maxItems": MAX_ERRORS})]]
    # Only in /health's 503: what failed, and the pool's figures.
    checks: NotRequired[Checks]
    pool: NotRequired[Pool]


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
        "The user's current version, for If-Match.", type="string", maxLength=12, pattern=r'^"[1-9][0-9]{0,9}"$'
    ),
    "Location": header(
        "The new user's URL.",
        type="string",
        format="uri-reference",
        maxLength=33,
        pattern=r"^/api/v1/users/[1-9][0-9]{0,18}$",
    ),
}


def headers(*names: str) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


# The headers of each problem, beyond those the middleware adds to every answer (openapi() below).
PROBLEM_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problems an operation may answer: 413 and 500 on any, as the middleware answers them anywhere."""
    # The schema sits under the media type actually served: FastAPI's "model" key would file it
    # under application/json.
    content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {
        status: {
            "description": PHRASES[status],
            "content": content,
            "headers": headers(*PROBLEM_HEADERS.get(status, ())),
        }
        for status in sorted({413, 500, *statuses})
    }


# --- Routes ------------------------------------------------------------------------------


async def database_answers(request: Request) -> bool:
    """Whether the database answers within DB_TIMEOUT; when it does not, log why.

    The check runs in a task of its own, and the answer does not wait for it past DB_TIMEOUT:
    a check cut off by the limit still closes its connection, and that cleanup (which SQLAlchemy
    shields from cancellation) can outlast the limit on a database that has stopped answering.
    """
    check = asyncio.ensure_future(select_one(request.state.probe_engine))
    # Its outcome, when no one waits for it any more, is logged below already.
    check.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        await asyncio.wait_for(asyncio.shield(check), settings.db_timeout)
    except (TimeoutError, PoolTimeoutError, DBAPIError) as exc:
        check.cancel()  # if still running: it finishes its cleanup on its own
        log.error("%s: database unavailable: %s: %s", request.url.path, type(exc).__name__, exc)
        return False
    return True


async def select_one(probe_engine: AsyncEngine) -> None:
    """SELECT 1 on the probe engine's own connection, so that the check never waits behind user traffic."""
    async with asyncio.timeout(settings.db_timeout), probe_engine.connect() as conn:
        await read(conn, select(1), {})


# No key, and the schema says so (security: []): orchestrators probe /health (API.md).
@app.get(
    "/health",
    tags=["health"],
    openapi_extra={"security": []},
    responses={200: {"model": Health}, **problem_responses(503)},
)
async def health(request: Request) -> JSONResponse:
    """Report whether the database answers within DB_TIMEOUT, and this worker's pool figures."""
    engine = request.state.engine
    if not await database_answers(request):
        return problem(
            503,
            "The database is not answering.",
            {"Retry-After": "1"},
            checks={"database": "unavailable"},
            pool=pool_status(engine),
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok"}, "pool": pool_status(engine)})


class Live(BaseModel):
    status: Literal["ok"]


@app.get("/livez", tags=["health"], responses=problem_responses(), openapi_extra={"security": []})
async def livez() -> Live:
    """Say the process is serving; no I/O, so a database outage never restarts it."""
    return Live(status="ok")


@app.get("/readyz", tags=["health"], responses=problem_responses(503), openapi_extra={"security": []})
async def readyz(request: Request) -> JSONResponse:
    """Report whether this worker should get traffic: it is not shutting down, and the database answers."""
    if request.state.draining.is_set():
        return problem(503, "This worker is shutting down.", {"Retry-After": "1"}, checks={"worker": "draining"})
    if not await database_answers(request):
        return problem(
            503,
            "The database is not answering.",
            {"Retry-After": "1"},
            checks={"database": "unavailable", "worker": "serving"},
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok", "worker": "serving"}})


METRICS_KEYS = [key.get_secret_value().encode() for key in settings.metrics_keys]

if METRICS_KEYS or settings.environment == "development":
    # security: [] as the schema cannot say "a metrics key": API.md's rule, checked in the route.
    @app.get(
        "/metrics",
        tags=["metrics"],
        response_class=PlainTextResponse,
        responses=problem_responses(401),
        openapi_extra={"security": []},
    )
    async def metrics(request: Request) -> Response:
        """The service's figures in Prometheus's text format, summed over every worker process."""
        if METRICS_KEYS and not bearer_key_in(request.scope, METRICS_KEYS):
            UNAUTHORIZED.labels("metrics").inc()
            return problem(
                401, "A valid metrics key is required: Authorization: Bearer <key>.", {"WWW-Authenticate": "Bearer"}
            )
        registry = REGISTRY
        if MULTIPROCESS_DIR:
            # A registry per scrape, as prometheus_client's multiprocess mode asks: it holds only
            # the collector that reads every worker's files.
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


if DOCS:
    # Swagger UI and ReDoc assets ship in the fastapi-offline wheel; no CDN needed.
    app.mount("/static", StaticFiles(directory=str(files("fastapi_offline") / "static")), name="static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Users API",
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="/static/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="Users API",
            redoc_js_url="/static/redoc.standalone.js",
            redoc_favicon_url="/static/favicon.png",
            with_google_fonts=False,
        )


def users_operation(*statuses: int, sends: dict[int, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """What every /api/v1 operation declares: its tag, its bearer key, the problems it may answer.

    `sends`: the headers of its success answer, by status (ETag, Location).
    """
    success = {status: {"headers": headers(*names)} for status, names in (sends or {}).items()}
    return {
        "tags": ["users"],
        # The key itself is checked by ApiKeyMiddleware, before the body is read; declared here
        # (not as a Security dependency, which FastAPI would solve on every request) so that
        # the schema names it and Swagger UI's "Authorize" button works.
        "openapi_extra": {"security": [{"bearer": []}]},
        "responses": {**problem_responses(401, 422, 429, 503, *statuses), **success},
    }


def openapi() -> dict[str, Any]:
    """FastAPI's schema, plus what it cannot see: the Problem schema and the headers that
    problem_responses() and users_operation() refer to, the bearer scheme, and the headers the
    middleware adds to every answer."""
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
                    sent = ["X-Request-ID"]  # AccessLogMiddleware: on every answer
                    # RateLimitMiddleware: on every /api/ answer that passes through it, which
                    # AccessLogMiddleware's 500 does not.
                    if path.startswith("/api/") and status != "500":
                        sent += ["RateLimit", "RateLimit-Policy"]
                    response.setdefault("headers", {}).update(headers(*sent))
    return app.openapi_schema or {}


app.openapi = openapi  # type: ignore[method-assign]

COLUMNS = (User.id, User.email, User.name, User.is_active, User.created_at, User.updated_at, User.version)
FIELDS = tuple(column.key for column in COLUMNS)
# The hot statements are built once, with their values as parameters, so that no request pays
# for building a statement and its cache key.
SELECT_USER = select(*COLUMNS).where(User.id == bindparam("user_id"))
SELECT_PAGE = select(*COLUMNS).where(User.id > bindparam("after")).order_by(User.id).limit(bindparam("limit"))
INSERT_USER = insert(User)
DELETE_USER = delete(User).where(User.id == bindparam("user_id"))


def etag(user: dict[str, Any]) -> str:
    return f'"{user["version"]}"'


def parse_if_match(header: str | None) -> set[str] | None:
    """The strong entity tags in If-Match ("*" included); None when the header is absent or empty.

    An empty header is an empty list, which RFC 9110 lets a recipient treat as absent.
    """
    if not header or not header.strip():
        return None
    return {tag.strip() for tag in header.split(",") if not tag.strip().startswith("W/")}


def as_dict(row: Row[Any]) -> dict[str, Any]:
    """A row of COLUMNS as a dict, the shape the routes and the response model work with."""
    return dict(zip(FIELDS, row, strict=True))


def encode_cursor(last_id: int) -> str:
    return urlsafe_b64encode(last_id.to_bytes(8, "big", signed=True)).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    # The pattern on the parameter admits exactly the strings this decodes (8 bytes).
    return int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True)


async def fetch_user(conn: AsyncConnection, user_id: int, *, retry: bool = True) -> dict[str, Any]:
    """Read one user as a dict; raise 404 when there is none."""
    row = (await read(conn, SELECT_USER, {"user_id": user_id}, retry=retry)).first()
    if row is None:
        raise HTTPException(404, f"User {user_id} does not exist")
    return as_dict(row)


# --- Retries: the Idempotency-Key of POST and PATCH ---

IDEMPOTENCY_KEY = re.compile(r'"([A-Za-z0-9._:-]{1,255})"|([A-Za-z0-9._:-]{1,255})')
# The errors kept with a key (API.md); a 422 or a 5xx is not, so the fixed or retried request runs.
KEPT_ERRORS = {404, 409, 412}
KEPT = IdempotencyKey
SELECT_KEPT = select(KEPT.id, KEPT.fingerprint, KEPT.status, KEPT.location, KEPT.etag, KEPT.body, KEPT.created_at)
SELECT_KEPT = SELECT_KEPT.where(KEPT.owner == bindparam("owner"), KEPT.key == bindparam("key"))
INSERT_KEPT = insert(KEPT)
UPDATE_KEPT = update(KEPT).where(KEPT.id == bindparam("kept_id"))
DELETE_KEPT = delete(KEPT).where(KEPT.id == bindparam("kept_id"))


async def answer_once(
    conn: AsyncConnection,
    request: Request,
    key_header: str,
    asked: dict[str, Any],
    status: int,
    response: Response,
    work: Callable[[], Awaitable[dict[str, Any]]],
) -> Response:
    """Answer a request with an Idempotency-Key: the first time by running work(), then by replaying that answer.

    The key is claimed, the write made and its answer kept in one transaction, so that they
    land together or not at all. A second request with the key, on any worker or container,
    waits at the claim (the unique index) until the first one commits, then replays its answer.
    """
    match = IDEMPOTENCY_KEY.fullmatch(key_header)
    if match is None:
        raise HTTPException(400, "An Idempotency-Key is 1 to 255 characters of A-Z a-z 0-9 - _ . : (bare or quoted)")
    # Whose key: a hash of the API key that sent it, so that no client can replay another's answer.
    owner = blake2b(request.headers.get("authorization", "").encode(), digest_size=16).hexdigest()
    where = {"owner": owner, "key": match[1] or match[2]}
    asked_for = JSON_LINE.encode([request.method, request.url.path, asked]).encode()
    fingerprint = blake2b(asked_for, digest_size=32).hexdigest()  # 64 hex digits, the column's width
    kept = (await read(conn, SELECT_KEPT, where)).first()
    if kept is not None and kept.created_at > key_expiry():
        return replay(kept, fingerprint)

    await conn.commit()  # ends the autocommit read, so the connection may leave autocommit
    # READ COMMITTED, so that PATCH's compare-and-swap sees each new version; SQLite has only this one.
    await set_isolation(conn, "SERIALIZABLE" if conn.dialect.name == "sqlite" else "READ COMMITTED")
    try:
        async with conn.begin():
            if kept is not None:  # expired: the key is new again
                await conn.execute(DELETE_KEPT, {"kept_id": kept.id})
            claim = {**where, "fingerprint": fingerprint, "status": 0, "body": "", "created_at": datetime.now(UTC)}
            kept_id = (await conn.execute(INSERT_KEPT, claim)).lastrowid
            try:
                user = await work()
                answer = Response(
                    UserOut.model_validate(user).model_dump_json(),
                    status,
                    {name: response.headers[name] for name in ("Location", "ETag") if name in response.headers},
                    media_type="application/json",
                )
            except HTTPException as exc:
                if exc.status_code not in KEPT_ERRORS:
                    raise
                answer = problem(exc.status_code, exc.detail)
            kept_answer = {"status": answer.status_code, "body": bytes(answer.body).decode()}
            kept_answer |= {"location": answer.headers.get("location"), "etag": answer.headers.get("etag")}
            await conn.execute(UPDATE_KEPT, {"kept_id": kept_id, **kept_answer})
        return answer
    except IntegrityError:
        pass  # the claim lost: another request with this key has committed its answer meanwhile
    finally:
        if not conn.invalidated:  # back to autocommit, for the statements after this and the pool
            await set_isolation(conn, "AUTOCOMMIT")
    kept = (await read(conn, SELECT_KEPT, where)).first()
    if kept is None:
        raise HTTPException(409, "A request with this Idempotency-Key is still being processed; retry shortly")
    return replay(kept, fingerprint)


async def set_isolation(conn: AsyncConnection, level: str) -> None:
    """Set the connection's isolation level; if the connection is found dead doing so, 503 as for any statement."""
    try:
        await conn.execution_options(isolation_level=level)
    except (conn.dialect.loaded_dbapi.Error, RuntimeError) as exc:
        # SQLAlchemy passes the driver's own error on from here, not wrapped in a DBAPIError
        # (RuntimeError: aiomysql's on uvloop, see closed_transport_is_a_disconnect()).
        await conn.invalidate(exc)
        raise DBAPIError(None, None, exc, connection_invalidated=True) from exc


def replay(kept: Row[Any], fingerprint: str) -> Response:
    """The answer kept with an Idempotency-Key, again; 422 if the key was sent with another request."""
    if kept.fingerprint != fingerprint:
        raise HTTPException(422, "This Idempotency-Key was sent with another request; a new request needs a new key")
    headers = {"Idempotent-Replayed": "true"}
    if kept.location:
        headers["Location"] = kept.location
    if kept.etag:
        headers["ETag"] = kept.etag
    media_type = "application/problem+json" if kept.status >= 400 else "application/json"
    return Response(kept.body, kept.status, headers, media_type=media_type)


@app.get("/api/v1/users", response_model=Page, **users_operation())
async def list_users(
    conn: ConnectionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, json_schema_extra={"format": "int32"})] = 20,
    cursor: Annotated[
        str | None,
        Query(max_length=11, pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page."),
    ] = None,
) -> dict[str, Any]:
    """List users in ascending id order, one keyset page at a time."""
    # One more row than asked for says whether there is a next page.
    params = {"after": decode_cursor(cursor) if cursor else 0, "limit": limit + 1}
    rows = (await read(conn, SELECT_PAGE, params)).all()
    items = [as_dict(row) for row in rows[:limit]]
    return {"items": items, "next_cursor": encode_cursor(items[-1]["id"]) if len(rows) > limit else None}


@app.get("/api/v1/users/{user_id}", response_model=UserOut, **users_operation(404, sends={200: ("ETag",)}))
async def get_user(user_id: UserId, conn: ConnectionDep, response: Response) -> dict[str, Any]:
    """Return one user, with its ETag."""
    user = await fetch_user(conn, user_id)
    response.headers["ETag"] = etag(user)
    return user


# draft-ietf-httpapi-idempotency-key-header: a structured-field string, or bare as Stripe's clients send it.
IdempotencyKeyHeader = Annotated[
    str | SkipJsonSchema[None],
    Header(
        alias="Idempotency-Key",
        description="Makes a retry safe: the first answer is kept for IDEMPOTENCY_TTL_HOURS and "
        "replayed to every request with the same key. 1 to 255 of `A-Za-z0-9-_.:`, bare or quoted.",
        # Documented, not validated by FastAPI: a malformed key is 400 (API.md), not 422.
        json_schema_extra={"pattern": f"^(?:{IDEMPOTENCY_KEY.pattern})$", "maxLength": 257},
    ),
]


@app.post(
    "/api/v1/users",
    status_code=201,
    response_model=UserOut,
    **users_operation(400, 409, sends={201: ("ETag", "Location")}),
)
async def create_user(
    new: UserCreate,
    conn: ConnectionDep,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> dict[str, Any] | Response:
    """Create a user; 409 when the email is taken, decided by the unique index."""
    if idempotency_key is None:
        return await insert_user(conn, new, response)
    return await answer_once(
        conn, request, idempotency_key, new.model_dump(), 201, response, lambda: insert_user(conn, new, response)
    )


async def insert_user(conn: AsyncConnection, new: UserCreate, response: Response) -> dict[str, Any]:
    """POST's database work: one INSERT, committed as it returns, or in answer_once()'s transaction."""
    now = datetime.now(UTC)
    user = {**new.model_dump(), "email_key": new.email.lower(), "created_at": now, "updated_at": now, "version": 1}
    try:
        # Not retried: had it landed before the connection died, a second try would create the
        # user twice. A client that sends an Idempotency-Key can retry it safely.
        user["id"] = (await conn.execute(INSERT_USER, user)).lastrowid
    except IntegrityError:
        raise HTTPException(409, f"The email {new.email} is already taken") from None
    response.headers["Location"] = f"/api/v1/users/{user['id']}"
    response.headers["ETag"] = etag(user)
    return user


@app.patch(
    "/api/v1/users/{user_id}", response_model=UserOut, **users_operation(400, 404, 409, 412, sends={200: ("ETag",)})
)
async def update_user(
    user_id: UserId,
    changes: UserUpdate,
    conn: ConnectionDep,
    request: Request,
    response: Response,
    if_match: Annotated[
        str | None,
        Header(
            max_length=MAX_IF_MATCH,
            description="Update only if the user's ETag is one of these.",
        ),
    ] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> dict[str, Any] | Response:
    """Change the given fields; with If-Match, only if the user is still at one of those versions."""
    wanted, tags = changes.model_dump(exclude_unset=True), parse_if_match(if_match)
    if idempotency_key is None:
        return await apply_update(conn, user_id, wanted, tags, response)
    return await answer_once(
        conn,
        request,
        idempotency_key,
        {**wanted, "if_match": if_match},
        200,
        response,
        lambda: apply_update(conn, user_id, wanted, tags, response, in_transaction=True),
    )


async def apply_update(
    conn: AsyncConnection,
    user_id: int,
    wanted: dict[str, Any],
    tags: set[str] | None,
    response: Response,
    *,
    in_transaction: bool = False,
) -> dict[str, Any]:
    """PATCH's database work: of two writers that read the same version exactly one succeeds.

    Without If-Match (or with `*`) the loser reads again and retries, so the last write wins;
    with a tag, it gets 412. in_transaction: answer_once() runs it in its transaction, which a
    dead connection takes with it, so nothing may be tried again there.
    """
    # A read, then an UPDATE, with no transaction around them: the UPDATE is a compare-and-swap
    # on the version read, so a write that lands in between makes it miss, never overwritten.
    while True:  # bounded by DB_TIMEOUT, like every statement in it
        user = await fetch_user(conn, user_id, retry=not in_transaction)
        if tags is not None and "*" not in tags and etag(user) not in tags:
            raise HTTPException(412, f"User {user_id} has changed: its ETag is now {etag(user)}")
        changed = {field: value for field, value in wanted.items() if user[field] != value}
        if not changed:  # not an update: same updated_at, same ETag
            response.headers["ETag"] = etag(user)
            return user
        values = {**changed, "updated_at": datetime.now(UTC), "version": user["version"] + 1}
        if "email" in changed:
            values["email_key"] = changed["email"].lower()
        swap = update(User).where(User.id == user_id, User.version == user["version"]).values(values)
        try:
            swapped = (await conn.execute(swap)).rowcount == 1
        except IntegrityError:
            raise HTTPException(409, f"The email {wanted['email']} is already taken") from None
        except DBAPIError as exc:
            # Safe to repeat only when any version will do: had the first try landed, the loop
            # finds the values in place. With a tag, it would wrongly answer 412.
            if in_transaction or not (exc.connection_invalidated and (tags is None or "*" in tags)):
                raise
            await conn.rollback()  # lets go of the dead connection
            continue
        if swapped:
            user.update(values)  # email_key too, which the response model leaves out
            response.headers["ETag"] = etag(user)
            return user
        if tags is not None and "*" not in tags:
            raise HTTPException(412, f"User {user_id} changed while this request was applied")


@app.delete("/api/v1/users/{user_id}", status_code=204, **users_operation(404, 412))
async def delete_user(
    user_id: UserId,
    conn: ConnectionDep,
    if_match: Annotated[
        str | None,
        Header(
            max_length=MAX_IF_MATCH,
            description="Delete only if the user's ETag is one of these.",
        ),
    ] = None,
) -> Response:
    """Delete a user; with If-Match, only if the user is still at one of those versions."""
    tags = parse_if_match(if_match)
    statement, params = DELETE_USER, {"user_id": user_id}
    if tags is not None and "*" not in tags:
        # Strong comparison is byte for byte: '"01"' is no ETag this service gives, so it matches none.
        versions = [int(tag[1:-1]) for tag in tags if re.fullmatch(r'"[1-9][0-9]{0,17}"', tag)]
        statement = DELETE_USER.where(User.version.in_(versions))
    first_try_may_have_landed = False
    try:
        # One statement, committed as it returns (autocommit).
        deleted = (await conn.execute(statement, params)).rowcount == 1
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        await conn.rollback()  # lets go of the dead connection
        first_try_may_have_landed = True
        deleted = (await conn.execute(statement, params)).rowcount == 1
    if not deleted:
        # The read after it only explains the miss; nothing is written after the DELETE.
        if (await read(conn, SELECT_USER, params)).first() is not None:
            raise HTTPException(412, f"User {user_id} has changed; fetch it again for its current ETag")
        # Gone: this request's own first try may have deleted it, and then it succeeded.
        if not first_try_may_have_landed:
            raise HTTPException(404, f"User {user_id} does not exist")
    return Response(status_code=204)


if __name__ == "__main__":
    import uvicorn

    import schema

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
