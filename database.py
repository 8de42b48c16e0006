"""The engines and their pools' care, and what a database error means for the answer.

An engine per worker process, in AUTOCOMMIT; its pool pings connections that sat idle,
says goodbye to dead ones without a traceback, warns when it is saturated, and counts what it
discards. `unavailable()` decides whether an error is an outage (503: retry) or not (500).
"""

import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import CursorResult, ExceptionContext, Executable, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from observability import DB_INVALIDATED

log = logging.getLogger("users.database")

# A connection that sat idle this long is pinged before use: the server (wait_timeout) or a
# proxy may have closed it. Busy connections skip the ping and its round trip.
IDLE_PING_AFTER = 2.0
# How often a saturated pool is reported, at most.
SATURATION_LOG_INTERVAL = 10.0


def create_engine(
    url: str, *, pool_size: int, max_overflow: int, recycle: int, pool_timeout: float, timeout: float, name: str
) -> AsyncEngine:
    """Create an engine whose pool is watched under `name` ("main", "probe") in the log and the metrics."""
    engine = create_async_engine(
        url,
        # Autocommit: a statement outside a transaction is committed as it returns. Most routes
        # run one statement, or reads and a compare-and-swap that need no transaction around them
        # (crud.py); the few that need one begin it themselves (idempotency.py). A COMMIT after
        # each would be a round trip that protects nothing, and a connection never goes back to
        # the pool inside a transaction.
        isolation_level="AUTOCOMMIT",
        # For the same reason there is nothing to roll back when a connection is returned or
        # closed, and no ROLLBACK round trip is sent for it.
        pool_reset_on_return=None,
        skip_autocommit_rollback=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=recycle,
        pool_timeout=pool_timeout,
        connect_args=(
            {"timeout": timeout} if url.startswith("sqlite") else {"connect_timeout": timeout, "charset": "utf8mb4"}
        ),
    )
    watch_pool(engine, pool_size + max_overflow, name)
    event.listen(engine.sync_engine, "handle_error", closed_transport_is_a_disconnect)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", enforce_foreign_keys)
    return engine


def enforce_foreign_keys(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    """Make SQLite enforce foreign keys, as MySQL and MariaDB do: off, a table's relations hold on neither
    the development database nor the SQLite half of the tests."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


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


def pool_status(engine: AsyncEngine, max_overflow: int) -> dict[str, int]:
    """The pool's figures now: its size, connections lent, connections beyond its size."""
    pool: Any = engine.pool
    return {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": max(pool.overflow(), 0),
        "max_overflow": max_overflow,
    }


async def read(
    conn: AsyncConnection, statement: Executable, params: Mapping[str, Any], *, retry: bool = True
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


async def set_isolation(conn: AsyncConnection, level: str) -> None:
    """Set the connection's isolation level; if the connection is found dead doing so, 503 as for any statement."""
    try:
        await conn.execution_options(isolation_level=level)
    except (conn.dialect.loaded_dbapi.Error, RuntimeError) as exc:
        # SQLAlchemy passes the driver's own error on from here, not wrapped in a DBAPIError
        # (RuntimeError: aiomysql's on uvloop, see closed_transport_is_a_disconnect()).
        await conn.invalidate(exc)
        raise DBAPIError(None, None, exc, connection_invalidated=True) from exc


# --- Outage or bug --------------------------------------------------------------------------

# MySQL and MariaDB errors after which the same request may succeed a moment later, by cause.
TRANSIENT_MYSQL_ERRORS = {
    1040: "connection",  # too many connections
    1203: "connection",  # the account's max_user_connections reached
    1053: "connection",  # the server is shutting down
    1927: "connection",  # MariaDB: the connection was killed
    2002: "connection",  # cannot connect (socket)
    2003: "connection",  # cannot connect (TCP)
    2006: "connection",  # the server has gone away
    2013: "connection",  # the connection was lost during the query
    4031: "connection",  # MySQL: disconnected for inactivity
    1205: "lock",  # lock wait timeout
    1213: "lock",  # deadlock: the statement was rolled back
    1317: "db_timeout",  # the statement was interrupted (KILL QUERY)
    1969: "db_timeout",  # MariaDB: max_statement_time exceeded
    3024: "db_timeout",  # MySQL: max_execution_time exceeded
}
# SQLite's primary result codes for a database another connection holds: SQLITE_BUSY, SQLITE_LOCKED.
TRANSIENT_SQLITE_ERRORS = {5: "lock", 6: "lock"}


def unavailable(exc: Exception) -> str | None:
    """Why this error means the database is unavailable now ("connection", "lock", ...), or None if it does not.

    An outage is answered 503 with Retry-After; anything else (a schema that lags the code, a
    bug) is a 500, which retrying would not mend.
    """
    if isinstance(exc, PoolTimeoutError):
        return "pool_timeout"
    if isinstance(exc, TimeoutError):
        return "db_timeout"
    if not isinstance(exc, DBAPIError):
        return None
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return "connection"
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return TRANSIENT_SQLITE_ERRORS.get(code & 0xFF)
    args = getattr(exc.orig, "args", ())
    return TRANSIENT_MYSQL_ERRORS.get(args[0]) if args and isinstance(args[0], int) else None
