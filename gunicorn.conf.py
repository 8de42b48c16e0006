"""Gunicorn in production: `gunicorn -c gunicorn.conf.py main:app`.

Each value comes from the environment when set there, else the default beside it, which
says why. The app's own settings (DATABASE_URL, DB_POOL_SIZE, ...) stay in settings.py.
"""

import asyncio
import contextlib
import os
import shutil
import tempfile
from typing import Any

from dotenv import dotenv_values
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]

from settings import settings

# gunicorn's own knobs, from the environment or else from `.env`, the one file a deployment edits
# (README.md, "Production with compose"); the environment wins, as it does for the app's settings.
env = {**dotenv_values(".env"), **os.environ}

# Containers publish one port; 0.0.0.0 so the port mapping or the load balancer reaches it.
# One listening socket, opened by the master and shared by every worker (reuse_port stays
# off): a worker that stops closes only its own copy, and the connections waiting in the
# backlog are accepted by the others. With reuse_port each worker would have a backlog of its
# own, and its waiting connections would be reset when it exits.
bind = f"0.0.0.0:{env.get('PORT') or '8000'}"

# Async workers each serve many requests at once, so one per core is enough; more only
# adds database connections. sched_getaffinity counts the cores this process may use
# (a container's cpuset), not the host's; a CPU quota (--cpus) is not seen: set WEB_CONCURRENCY.
workers = int(env.get("WEB_CONCURRENCY") or len(os.sched_getaffinity(0)))

# Seconds the arbiter waits after SIGTERM before it kills a worker. Under the default
# grace of Kubernetes (30 s), so the orchestrator does not kill gunicorn first; compose.yaml
# sets stop_grace_period above it (docker's default, 10 s, is below).
graceful_timeout = int(env.get("GRACEFUL_TIMEOUT") or "20")
# Seconds a worker drains open requests after SIGTERM before it cancels them: 5 s short of
# graceful_timeout, less the SHUTDOWN_DELAY it first goes on serving for (main.drain_on_sigterm),
# so the lifespan's shutdown (closing the pool) runs before the kill. Requests end in ~2 s at
# worst (DB_POOL_TIMEOUT + DB_TIMEOUT), so the drain is generous.
drain_timeout = max(1, graceful_timeout - 5 - settings.shutdown_delay)
# Seconds of silence after which a worker counts as hung and is restarted. Above
# graceful_timeout: a worker that drains (after max_requests) does not report, and must
# not be killed for it.
timeout = int(env.get("WORKER_TIMEOUT") or graceful_timeout + 10)


# Seconds an idle keep-alive connection stays open once its worker stops (recycled, SIGTERMed,
# scaled down): long enough for a request already on its way to arrive, and be answered.
IDLE_CLOSE_GRACE = 1.0


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), with a gentler close of idle connections on stop.

    uvicorn closes an idle keep-alive connection at once when its worker stops, and a request
    the client sent on it at that moment is lost: the client sees the connection reset. HTTP/1.1
    lets a server close an idle connection at any time (RFC 9112, 9.6), so clients must be ready
    for it; this narrows the window. The connection stays open IDLE_CLOSE_GRACE longer, and a
    request that arrives meanwhile is answered, with Connection: close, so that the client's next
    one goes to another worker. What remains is a request sent in the instant the grace ends.
    """

    # Whether this worker has begun to stop: one flag for all its connections. On asyncio a
    # connection accepted just before the worker stopped listening is made in a task of its own,
    # after uvicorn has asked every connection it knew of to shut down: asked by no one, it would
    # keep its client until the graceful timeout cut the requests on it.
    worker_stopping = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if HttpProtocol.worker_stopping:
            self.shutdown()

    def shutdown(self) -> None:
        HttpProtocol.worker_stopping = True
        if self.cycle is not None and not self.cycle.response_complete:
            return super().shutdown()  # busy: its answer gets Connection: close
        # The grace is uvicorn's own keep-alive timer, set shorter: the first bytes of a request
        # cancel it, as they cancel any keep-alive timeout, so it never cuts a request in progress.
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
        self.timeout_keep_alive_task = self.loop.call_later(IDLE_CLOSE_GRACE, self.timeout_keep_alive_handler)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if HttpProtocol.worker_stopping:
            self.cycle.keep_alive = False


class Worker(UvicornWorker):  # type: ignore[misc]
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        # EVENT_LOOP: uvloop unless set to asyncio (database.create_engine() makes aiomysql's
        # errors on a closed connection the same on both).
        "loop": settings.event_loop,
        "http": HttpProtocol,
        # The one access log line per request is AccessLogMiddleware's; uvicorn's would double it.
        "access_log": False,
        # uvicorn waits for open requests forever unless told; gunicorn would then kill the
        # worker at graceful_timeout, before the lifespan has closed the pool.
        "timeout_graceful_shutdown": drain_timeout,
    }

    def init_process(self) -> None:
        # On uvloop, closing uvicorn's server closes its listening sockets, and uvicorn closes
        # them again: gunicorn's socket wrapper logs that second close as "Error while closing
        # socket [Errno 9]" on every clean stop. The sockets themselves take it quietly.
        self.sockets: list[Any] = [getattr(sock, "sock", sock) for sock in self.sockets]
        super().init_process()


# uvicorn-worker, not gunicorn 27's native "asgi" worker: on SIGTERM that one waits for idle
# keep-alive connections until it is killed, before its pool is closed (and it is slower:
# bench/README.md, "The worker class").
worker_class = Worker

# Seconds an idle client connection stays open. Longer than the idle timeout of the load
# balancer in front (AWS ALB and nginx: 60 s), so the balancer always closes first and
# never sends a request on a connection the worker is closing at that moment (a 502).
keepalive = int(env.get("KEEPALIVE") or "75")

# Worker recycling, off (0): a count of requests grows with traffic, not with a leak, and at
# high traffic it would restart every worker every few seconds. Turn it on (say 100000, with
# a jitter of a tenth, so the workers never restart together) only if a worker's memory
# (process_resident_memory_bytes in /metrics) keeps growing under steady load.
max_requests = int(env.get("MAX_REQUESTS") or "0")
max_requests_jitter = int(env.get("MAX_REQUESTS_JITTER") or max_requests // 10)

# X-Forwarded-For/-Proto are believed only from these addresses (TRUSTED_PROXIES); empty,
# the default, believes no one, so a client cannot choose its own rate-limit key.
forwarded_allow_ips = ",".join(settings.trusted_proxies)

# No access log from gunicorn either (see Worker); errors and lifecycle to stderr.
accesslog = None
errorlog = "-"
loglevel = settings.log_level.lower()
# gunicorn's and uvicorn's own lines in the app's format (logs.py): in production every line on
# stderr is one JSON object. uvicorn-worker gives uvicorn's logger gunicorn.error's handlers.
logconfig_dict = {
    "formatters": {"app": {"()": "logs.log_formatter", "environment": settings.environment}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr"}},
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": settings.log_level, "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        # The schema check's Alembic says at INFO which of its plugins it loads, at every start.
        "alembic.runtime.plugins": {"level": "WARNING"},
    },
}

# The heartbeat file is touched constantly; on a container's overlay filesystem that can
# block a worker, on tmpfs it cannot.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None


def on_starting(server) -> None:  # type: ignore[no-untyped-def]
    """Make the metrics directory; check the connection budget and the schema's revision; once, before fork."""
    prepare_metrics_directory(server)
    try:
        # The master starts no event loop of its own; this one is closed again before any fork.
        server.log.info(asyncio.run(prepare_database(server.cfg.workers)))
    except RuntimeError as refusal:
        # gunicorn would print it as a bare "Error:" line; logged, it is a line like all others (JSON in production).
        server.log.error("%s", refusal)
        raise SystemExit(1) from None


async def prepare_database(worker_count: int) -> str:
    """Refuse to start when the pools cannot fit in the server's connection limit, or the schema is behind the code.

    The schema is never altered here: `alembic upgrade head` is a deploy step of its own, run once
    before the new code starts (README.md, Changing the schema).
    """
    # Imported here, so that only the master that starts gunicorn pays for them.
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    import schema

    # The + 1: each worker's probe engine, the one connection /health checks the database on.
    per_worker = settings.db_pool_size + settings.db_max_overflow + 1
    arithmetic = (
        f"{worker_count} workers x (DB_POOL_SIZE {settings.db_pool_size} + "
        f"DB_MAX_OVERFLOW {settings.db_max_overflow} + 1 for /health) = {worker_count * per_worker} connections"
    )
    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    try:
        async with asyncio.timeout(30), engine.connect() as conn:
            if conn.dialect.name not in ("mysql", "mariadb"):
                revision = await schema.check(conn)
                return f"database pool budget: {arithmetic}; no server limit on {conn.dialect.name}; {revision}"
            server_limit = await conn.scalar(text("SELECT @@max_connections"))
            # A per-account limit (MAX_USER_CONNECTIONS), when set, is the tighter one.
            user_limit = await conn.scalar(text("SELECT @@max_user_connections"))
            limit = min(server_limit, user_limit or server_limit)
            if worker_count * per_worker > limit:
                raise RuntimeError(
                    f"the connection pools do not fit in the database: {arithmetic} > {limit} "
                    f"(max_connections {server_limit}, max_user_connections {user_limit}). "
                    "Lower WEB_CONCURRENCY, DB_POOL_SIZE or DB_MAX_OVERFLOW, or raise the server's max_connections."
                )
            revision = await schema.check(conn)
    except (DBAPIError, TimeoutError) as exc:
        raise RuntimeError(f"cannot reach the database to check it: {type(exc).__name__}: {exc}") from None
    finally:
        await engine.dispose()
    return f"database pool budget: {arithmetic} <= {limit} (max_connections {server_limit}); {revision}"


# --- The rate-limit table the workers share (RateLimitTable in ratelimit.py) ---


def when_ready(server) -> None:  # type: ignore[no-untyped-def]
    """Create the file every worker maps as its rate-limit table, so the limit is the service's, not each worker's."""
    fd, path = tempfile.mkstemp(prefix="users-ratelimit-", dir=worker_tmp_dir)
    os.close(fd)
    # Workers may run as another user (gunicorn's user and group settings).
    os.chown(path, server.cfg.uid, server.cfg.gid)
    # Called before the first fork: every worker inherits the path, and the workers
    # that replace them later (max_requests, a crash) find the same table.
    os.environ["RATE_LIMIT_TABLE"] = path


# --- The metrics the workers share (prometheus_client's multiprocess mode; owner: metrics) ---

# The directory this master made, and removes on exit; None when PROMETHEUS_MULTIPROC_DIR was given.
metrics_directory_made: str | None = None


def prepare_metrics_directory(server) -> None:  # type: ignore[no-untyped-def]
    """Give the workers an empty PROMETHEUS_MULTIPROC_DIR, in which each writes its figures."""
    global metrics_directory_made
    # First of all: prometheus_client reads the variable when it is first imported, and the
    # master imports main (and prometheus_client with it) just after, for the workers to inherit.
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        # A previous run's files would be summed into this run's counters.
        empty_metrics_directory(given)
        return
    metrics_directory_made = tempfile.mkdtemp(prefix="users-metrics-", dir=worker_tmp_dir)
    os.chown(metrics_directory_made, server.cfg.uid, server.cfg.gid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_directory_made


def empty_metrics_directory(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_file() and entry.name.endswith(".db"):
            os.unlink(entry.path)


def child_exit(server, worker) -> None:  # type: ignore[no-untyped-def]
    """Drop the gauges of a worker that exited; its counters stay, in every later scrape's sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server) -> None:  # type: ignore[no-untyped-def]
    """Remove the rate-limit table, and the metrics directory (or its files, when it was given)."""
    with contextlib.suppress(KeyError, FileNotFoundError):
        os.unlink(os.environ.pop("RATE_LIMIT_TABLE"))
    if metrics_directory_made:
        shutil.rmtree(metrics_directory_made, ignore_errors=True)
    elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        empty_metrics_directory(os.environ["PROMETHEUS_MULTIPROC_DIR"])
