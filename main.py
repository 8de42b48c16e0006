"""User records over HTTP: FastAPI in front of MySQL, MariaDB or SQLite.

The file reads in the order a request meets it:
  1. database: engine, the pool's watch (idle pings, saturation warning), in_database(), which
     runs a route's database work on a pooled connection, and Db.execute(), the one place
     statements run (time limit, retry)
  2. lifespan: engine per worker, schema and demo data in development, Redis for the limit
  3. the app and its middleware: access log with request ids, API keys, rate limit (GCRA,
     shared by the workers, or by every container through Redis), body size limit
  4. errors: every 4xx and 5xx as application/problem+json
  5. schemas and routes: /health and the offline docs, then /api/v1/users in CRUD order
"""

import asyncio
import fcntl
import hmac
import json
import logging
import math
import mmap
import os
import re
import secrets
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from hashlib import blake2b
from importlib.resources import files
from typing import Annotated, Any, Concatenate, Literal, NotRequired, ParamSpec, TypeVar

import email_validator
from awaitlet import async_def
from email_validator import EmailNotValidError, validate_email
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import (
    AfterValidator,
    BaseModel,
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
    Connection,
    CursorResult,
    Engine,
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
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12 on

from models import Base, User
from settings import settings

log = logging.getLogger("users")
access_log = logging.getLogger("users.access")

P = ParamSpec("P")
T = TypeVar("T")


# --- Database ------------------------------------------------------------------------------


def create_engine() -> AsyncEngine:
    """Create the engine; each worker process calls this once, in its lifespan."""
    is_sqlite = settings.database_url.startswith("sqlite")
    engine = create_async_engine(
        settings.database_url,
        # Every route writes with one statement, so each statement is its own transaction.
        # That saves the COMMIT round trip, and a connection never goes back to the pool
        # inside a transaction, which is what makes skipping the reset below safe.
        isolation_level="AUTOCOMMIT",
        # The default reset is a ROLLBACK round trip on every return to the pool.
        pool_reset_on_return=None,
        # Closing a connection still "ends" its transaction with a ROLLBACK round trip (8 % of a
        # worker's time in bench/); the driver reports autocommit, so there is nothing to end.
        skip_autocommit_rollback=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_recycle=settings.db_pool_recycle,
        pool_timeout=settings.db_pool_timeout,
        connect_args=(
            {"timeout": settings.db_timeout}
            if is_sqlite
            else {"connect_timeout": settings.db_timeout, "charset": "utf8mb4"}
        ),
    )
    watch_pool(engine)
    return engine


# A connection that sat idle this long is pinged before use: the server (wait_timeout) or a
# proxy may have closed it. Busy connections skip the ping and its round trip.
IDLE_PING_AFTER = 2.0
# How often a saturated pool is reported, at most.
SATURATION_LOG_INTERVAL = 10.0


def watch_pool(engine: AsyncEngine) -> None:
    """Ping connections that were idle, and warn when the pool is saturated and requests queue."""
    pool = engine.sync_engine.pool
    capacity = settings.db_pool_size + settings.db_max_overflow
    last_warning = 0.0

    @event.listens_for(pool, "checkin")
    def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "close")
    def on_close(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        if closed_by_peer(dbapi_connection):
            # No one to say goodbye to: shut the socket, so that the pool's polite close does
            # not fail on it and log a traceback at every shutdown after a quiet spell.
            dbapi_connection.driver_connection.close()

    @event.listens_for(pool, "checkout")
    def on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
        nonlocal last_warning
        now = time.monotonic()
        if closed_by_peer(dbapi_connection):
            # Killed, timed out or cut while in the pool: replaced before a write is lost on it.
            raise DisconnectionError("connection was closed by the server or the network")
        if now - record.info.get("idle_since", now) > IDLE_PING_AFTER:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as exc:
                # The pool discards this connection and checks out another.
                raise DisconnectionError("idle connection was closed") from exc
        if pool.checkedout() >= capacity and now - last_warning > SATURATION_LOG_INTERVAL:  # type: ignore[attr-defined]
            last_warning = now
            log.warning(
                "database pool saturated: %d of %d connections in use; requests are queueing "
                "(raise DB_POOL_SIZE or WEB_CONCURRENCY within the server's max_connections)",
                pool.checkedout(),  # type: ignore[attr-defined]
                capacity,
            )


def closed_by_peer(dbapi_connection: Any) -> bool:
    """Whether the end of the stream (or a reset) from the server has already arrived; no round trip.

    The check aiomysql's own pool makes before lending a connection. SQLite has no stream.
    """
    reader = getattr(dbapi_connection.driver_connection, "_reader", None)
    if reader is None:
        return False
    # eof_received: MySQL 8 sends an error packet before it closes a timed-out connection.
    return bool(reader.at_eof() or reader.exception() or getattr(reader, "eof_received", False))


def pool_status(engine: AsyncEngine) -> dict[str, int]:
    pool: Any = engine.pool
    return {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": max(pool.overflow(), 0),
        "max_overflow": settings.db_max_overflow,
    }


async def in_database(
    request: Request, work: Callable[Concatenate["Db", P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run a route's database work, `work(db, ...)`, on a pooled connection, and return its result.

    `work` is a plain function over SQLAlchemy's synchronous Core API, which SQLAlchemy runs on
    the asyncio driver from inside a greenlet (awaitlet, by SQLAlchemy's author; the engine's
    `sync_engine` is part of SQLAlchemy's public asyncio API). One greenlet per request:
    AsyncConnection would start one for the checkout, one per statement and one for the return,
    and every greenlet maps and unmaps a stack for Python's frames (two system calls and a page
    fault, 20 µs here, each).

    Time limits: DB_POOL_TIMEOUT for the wait for a connection, then DB_TIMEOUT for each
    statement (Db.execute), the first one's counted from before the checkout. The pool bounds
    its own wait, but not a new connection's handshake nor the ping of an idle one: against a
    database that accepts connections and never answers, those would wait forever. A request
    that finds a place free takes it at once and needs no limit for that, and a route with one
    statement never reschedules its limit: on Python 3.11 an asyncio.timeout costs 1.5 % of a
    get's instructions, and each reschedule another 0.5 %.

    Requests wait for a connection in `pool_queue` (one place per connection the pool may open),
    first come, first served. The pool's own wait is not: a connection given back wakes the
    longest waiter, but a request that reaches the pool before that waiter runs takes it, and
    under sustained load a waiter can lose every race until it times out (in bench/, 1,800
    answers 503 in 16 s at 256 connections; none with the queue).

    The connection goes back to the pool as soon as `work` returns, before the response is
    serialized and sent to a client that may be slow to read it.
    """
    queue = request.state.pool_queue
    if queue.locked():  # every connection is in use: wait in line, at most DB_POOL_TIMEOUT
        async with asyncio.timeout(settings.db_pool_timeout):
            await queue.acquire()
    else:
        await queue.acquire()  # a free place: taken at once
    try:
        async with asyncio.timeout(settings.db_timeout) as limit:
            return await async_def(in_connection, request.state.engine.sync_engine, limit, work, args, kwargs)
    finally:
        queue.release()


def in_connection(engine: Engine, limit: asyncio.Timeout, work: Callable[..., T], args: Any, kwargs: Any) -> T:
    """in_database()'s greenlet: check a connection out, run `work` on it, give it back."""
    try:
        conn = engine.connect()
    except DBAPIError:
        # Killed while it was being opened (a server restarting, an operator's KILL): nothing
        # was sent on it yet, so one more try is always safe.
        conn = engine.connect()
    with conn:
        return work(Db(conn, limit), *args, **kwargs)


class Db:
    """A route's connection, lent by in_database(); execute() is the one place statements run."""

    __slots__ = ("conn", "first", "limit")

    def __init__(self, conn: Connection, limit: asyncio.Timeout) -> None:
        self.conn, self.limit = conn, limit
        self.first = True  # the first statement's DB_TIMEOUT began before the checkout

    def execute(
        self, statement: Executable, params: dict[str, Any] | None = None, *, retry: bool = False
    ) -> CursorResult[Any]:
        """Run one statement within DB_TIMEOUT.

        With retry=True (reads, and writes that are safe to repeat) a connection that turns out
        to be dead (killed by the server, cut by the network) is replaced and the statement run
        once more. The time limit surfaces as TimeoutError from in_database(); the handlers
        answer it, and DBAPIError, 503.
        """
        try:
            return self.attempt(statement, params)
        except DBAPIError as exc:
            if not (retry and exc.connection_invalidated):
                raise
        self.conn.rollback()  # clears the invalidated connection; the next statement checks out a new one
        return self.attempt(statement, params)

    def attempt(self, statement: Executable, params: dict[str, Any] | None) -> CursorResult[Any]:
        """One try of a statement, with DB_TIMEOUT from now (the first: from before the checkout)."""
        if self.first:
            self.first = False
        else:
            self.limit.reschedule(asyncio.get_running_loop().time() + settings.db_timeout)
        try:
            return self.conn.execute(statement, params)
        except asyncio.CancelledError:
            # Cut off mid-answer (the time limit, or the request cancelled): the connection is
            # unusable, never pool it again.
            self.conn.invalidate()
            raise


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
    # Per record, logging looks up the caller's file and line, the thread and the process name,
    # which no line here shows. The logging HOWTO's "Optimization" section switches them off
    # like this (process ids stay: gunicorn's own lines show them).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    configure_logging()
    if not settings.api_keys:
        log.warning("!!! API_KEYS is empty: /api/v1 is open to anyone (development only) !!!")
    engine = create_engine()
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
    try:
        pool_queue = asyncio.Semaphore(settings.db_pool_size + settings.db_max_overflow)
        yield {"engine": engine, "pool_queue": pool_queue, "redis_limiter": redis_limiter}
    finally:
        await engine.dispose()
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


class AccessLogMiddleware:
    """Tag every response with X-Request-ID and log one line per request.

    Also the last line of defence: an unhandled exception is logged here with its traceback
    and answered as a bare 500 problem, never with the traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
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
            access_log.info(
                "%s %s %d %.1fms %s",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1000,
                request_id.decode(),
            )


class ApiKeyMiddleware:
    """Answer 401 to /api/ requests without a valid bearer key, before anything else is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.keys = [key.get_secret_value().encode() for key in settings.api_keys]

    def authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, key = header.partition(b" ")
        # Every key is compared, in constant time, so timing tells nothing about any of them.
        matches = [hmac.compare_digest(key.strip(), k) for k in self.keys]
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith("/api/") and not self.authorized(scope):
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
        self.failures = 0
        return allowed == 1, float(ahead)

    def failed(self, exc: Exception) -> None:
        """Count a failure; after REDIS_FAILURES_TO_PAUSE in a row, leave Redis alone for REDIS_PAUSE.

        A circuit breaker: a stalled Redis then costs one timeout per pause, not one per request.
        """
        self.failures += 1
        if self.failures == REDIS_FAILURES_TO_PAUSE:  # requests that waited together fail together: log once
            log.warning("Redis is out (%r): the rate limit is per container for a while", exc)
        if self.failures >= REDIS_FAILURES_TO_PAUSE:
            self.paused_until = time.monotonic() + REDIS_PAUSE


class RateLimitMiddleware:
    """Limit requests per client address; 429 with Retry-After, and the IETF RateLimit headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Not a setting: gunicorn's master sets it for the workers it forks (gunicorn.conf.py).
        self.table = RateLimitTable(settings.rate_limit, settings.rate_limit_window, os.environ.get("RATE_LIMIT_TABLE"))
        self.policy = f'"default";q={settings.rate_limit};w={settings.rate_limit_window}'.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # /health is for load balancers and orchestrators, which poll it on a schedule.
        if scope["type"] != "http" or scope["path"] == "/health":
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


# add_middleware puts each one outside the last: a request meets the access log first.
app.add_middleware(BodyLimitMiddleware)
app.add_middleware(RateLimitMiddleware)
app.add_middleware(ApiKeyMiddleware)
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
    log.error("database unavailable: %s: %s", type(exc).__name__, exc)
    return problem(503, "The database is not answering; retry shortly.", {"Retry-After": "1"})


# --- Schemas -----------------------------------------------------------------------------


# The contract is the syntax (API.md). The special-use domains email_validator rejects on top
# (.test, .invalid, .local, ...) are syntactically valid, and this service sends no mail to them.
email_validator.SPECIAL_USE_DOMAIN_NAMES.clear()


# The common address, in plain ASCII: a dot-atom local part, then at least two host-name labels,
# the last ending in a letter. Every address this matches, email_validator accepts too
# (test_main checks it on generated addresses); its full check, a sixth of the instructions of
# a create, is left for everything else (Unicode, quoting, unusual lengths), and decides those.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
PLAIN_EMAIL = re.compile(rf"{ATEXT}(?:\.{ATEXT})*@(?:{LABEL}\.)+(?:[A-Za-z]|[A-Za-z0-9][A-Za-z0-9-]{{0,61}}[A-Za-z])")


def is_plain_email(value: str) -> bool:
    # "--" could begin a Punycode label (xn--), which email_validator decodes: not plain.
    return bool(PLAIN_EMAIL.fullmatch(value)) and "--" not in value and value.index("@") <= 64


def normalize_email(value: str) -> str:
    """Check the syntax; lower-case the domain and keep the local part as given."""
    if not is_plain_email(value):
        try:
            validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ValueError(str(exc)) from None
    local, _, domain = value.rpartition("@")
    return f"{local}@{domain.lower()}"


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
UserId = Annotated[
    int, Path(ge=1, le=2**63 - 1, description="A positive 64-bit integer.", json_schema_extra={"format": "int64"})
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
    id: int = Field(json_schema_extra={"format": "int64", "minimum": 1, "maximum": 2**63 - 1})
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


# No key, and the schema says so (security: []): orchestrators probe /health (API.md).
@app.get(
    "/health",
    tags=["health"],
    openapi_extra={"security": []},
    responses={200: {"model": Health}, **problem_responses(503)},
)
async def health(request: Request) -> JSONResponse:
    """Report whether the database answers within DB_TIMEOUT, and the pool's figures."""
    engine = request.state.engine
    try:
        await in_database(request, lambda db: db.execute(select(1), retry=True))
    except (TimeoutError, PoolTimeoutError, DBAPIError) as exc:
        log.error("health check: database unavailable: %s: %s", type(exc).__name__, exc)
        return problem(
            503,
            "The database is not answering.",
            {"Retry-After": "1"},
            checks={"database": "unavailable"},
            pool=pool_status(engine),
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok"}, "pool": pool_status(engine)})


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
                    # ApiKeyMiddleware's 401 and AccessLogMiddleware's 500 do not.
                    if path.startswith("/api/") and status not in ("401", "500"):
                        sent += ["RateLimit", "RateLimit-Policy"]
                    response.setdefault("headers", {}).update(headers(*sent))
    return app.openapi_schema or {}


app.openapi = openapi  # type: ignore[method-assign]

COLUMNS = (User.id, User.email, User.name, User.is_active, User.created_at, User.updated_at, User.version)
FIELDS = tuple(column.key for column in COLUMNS)
# The hot statements are built once, with their values as parameters: building a statement
# and its cache key on every request cost more than a tenth of a worker's time in bench/.
SELECT_USER = select(*COLUMNS).where(User.id == bindparam("user_id"))
SELECT_PAGE = select(*COLUMNS).order_by(User.id).limit(bindparam("limit"))
SELECT_PAGE_AFTER = SELECT_PAGE.where(User.id > bindparam("after"))
INSERT_USER = insert(User)


def etag(user: dict[str, Any]) -> str:
    return f'"{user["version"]}"'


def parse_if_match(header: str | None) -> set[str] | None:
    """The strong entity tags in If-Match ("*" included); None when the header is absent."""
    if header is None:
        return None
    return {tag.strip() for tag in header.split(",") if not tag.strip().startswith("W/")}


def as_dict(row: Row[Any]) -> dict[str, Any]:
    """A row of COLUMNS as a dict; five times faster than Row._asdict(), which builds a mapping first."""
    return dict(zip(FIELDS, row, strict=True))


def encode_cursor(last_id: int) -> str:
    return urlsafe_b64encode(last_id.to_bytes(8, "big", signed=True)).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    # The pattern on the parameter admits exactly the strings this decodes (8 bytes).
    return int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True)


def fetch_user(db: Db, user_id: int) -> dict[str, Any]:
    """Read one user as a dict; raise 404 when there is none."""
    row = db.execute(SELECT_USER, {"user_id": user_id}, retry=True).first()
    if row is None:
        raise HTTPException(404, f"User {user_id} does not exist")
    return as_dict(row)


@app.get("/api/v1/users", response_model=Page, **users_operation())
async def list_users(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, json_schema_extra={"format": "int32"})] = 20,
    cursor: Annotated[
        str | None,
        Query(max_length=11, pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page."),
    ] = None,
) -> dict[str, Any]:
    """List users in ascending id order, one keyset page at a time."""
    if cursor is None:
        statement, params = SELECT_PAGE, {"limit": limit + 1}
    else:
        statement, params = SELECT_PAGE_AFTER, {"limit": limit + 1, "after": decode_cursor(cursor)}
    rows = await in_database(request, lambda db: db.execute(statement, params, retry=True).all())
    items = [as_dict(row) for row in rows[:limit]]
    return {"items": items, "next_cursor": encode_cursor(items[-1]["id"]) if len(rows) > limit else None}


@app.get("/api/v1/users/{user_id}", response_model=UserOut, **users_operation(404, sends={200: ("ETag",)}))
async def get_user(user_id: UserId, request: Request, response: Response) -> dict[str, Any]:
    """Return one user, with its ETag."""
    user = await in_database(request, fetch_user, user_id)
    response.headers["ETag"] = etag(user)
    return user


@app.post(
    "/api/v1/users", status_code=201, response_model=UserOut, **users_operation(409, sends={201: ("ETag", "Location")})
)
async def create_user(new: UserCreate, request: Request, response: Response) -> dict[str, Any]:
    """Create a user; 409 when the email is taken, decided by the unique index."""
    now = datetime.now(UTC)
    user = {**new.model_dump(), "email_key": new.email.lower(), "created_at": now, "updated_at": now, "version": 1}
    try:
        user["id"] = await in_database(request, lambda db: db.execute(INSERT_USER, user).lastrowid)
    except IntegrityError:
        raise HTTPException(409, f"The email {new.email} is already taken") from None
    response.headers["Location"] = f"/api/v1/users/{user['id']}"
    response.headers["ETag"] = etag(user)
    return user


@app.patch("/api/v1/users/{user_id}", response_model=UserOut, **users_operation(404, 409, 412, sends={200: ("ETag",)}))
async def update_user(
    user_id: UserId,
    changes: UserUpdate,
    request: Request,
    response: Response,
    if_match: Annotated[
        str | None,
        Header(
            max_length=MAX_IF_MATCH,
            description="Update only if the user's ETag is one of these.",
        ),
    ] = None,
) -> dict[str, Any]:
    """Change the given fields; with If-Match, only if the user is still at that version.

    The UPDATE is a compare-and-swap on the version that was read, so of two writers that
    read the same version exactly one succeeds. Without If-Match the loser reads again and
    retries (last write wins); with it, the loser gets 412.
    """
    user = await in_database(
        request, apply_update, user_id, changes.model_dump(exclude_unset=True), parse_if_match(if_match)
    )
    response.headers["ETag"] = etag(user)
    return user


def apply_update(db: Db, user_id: int, wanted: dict[str, Any], tags: set[str] | None) -> dict[str, Any]:
    """PATCH's database work: compare-and-swap the version read; return the user as it now is."""
    while True:
        user = fetch_user(db, user_id)
        if tags is not None and "*" not in tags and etag(user) not in tags:
            raise HTTPException(412, f"User {user_id} has changed: its ETag is now {etag(user)}")
        changed = {field: value for field, value in wanted.items() if user[field] != value}
        if not changed:  # not an update: same updated_at, same ETag
            return user
        now = datetime.now(UTC)
        values = {**changed, "updated_at": now, "version": user["version"] + 1}
        if "email" in changed:
            values["email_key"] = changed["email"].lower()
        try:
            result = db.execute(
                update(User).where(User.id == user_id, User.version == user["version"]).values(values),
                # Safe to repeat: if the first try landed, the version no longer matches
                # and the loop finds the values already in place.
                retry=tags is None,
            )
        except IntegrityError:
            raise HTTPException(409, f"The email {wanted['email']} is already taken") from None
        if result.rowcount == 1:
            user.update(values)  # email_key too, which the response model leaves out
            return user
        if tags is not None:
            raise HTTPException(412, f"User {user_id} changed while this request was applied")


@app.delete("/api/v1/users/{user_id}", status_code=204, **users_operation(404, 412))
async def delete_user(
    user_id: UserId,
    request: Request,
    if_match: Annotated[
        str | None,
        Header(
            max_length=MAX_IF_MATCH,
            description="Delete only if the user's ETag is one of these.",
        ),
    ] = None,
) -> Response:
    """Delete a user; with If-Match, only if the user is still at that version."""
    tags = parse_if_match(if_match)
    statement = delete(User).where(User.id == user_id)
    if tags is not None and "*" not in tags:
        versions = [int(t[1:-1]) for t in tags if re.fullmatch(r'"\d{1,18}"', t)]
        statement = statement.where(User.version.in_(versions))
    await in_database(request, delete_or_explain, statement, user_id)
    return Response(status_code=204)


def delete_or_explain(db: Db, statement: Executable, user_id: int) -> None:
    """DELETE's database work: delete, or say why nothing was deleted (404 or 412)."""
    if db.execute(statement, retry=True).rowcount == 0:
        fetch_user(db, user_id)  # 404 when absent; otherwise the version did not match
        raise HTTPException(412, f"User {user_id} has changed; fetch it again for its current ETag")


if __name__ == "__main__":
    import uvicorn

    # loop="asyncio": on uvloop, aiomysql meets a connection the server closed with a RuntimeError,
    # not a driver error, and the dead connection is never replaced (aio-libs/aiomysql#966).
    # forwarded_allow_ips: X-Forwarded-For only from TRUSTED_PROXIES (uvicorn's default believes 127.0.0.1).
    # access_log=False: the one line per request is AccessLogMiddleware's; uvicorn's would double it.
    uvicorn.run(
        "main:app",
        reload=True,
        loop="asyncio",
        forwarded_allow_ips=list(settings.trusted_proxies),
        access_log=False,
    )
