"""What the service tells its operators besides its log (logs.py): Prometheus metrics and /metrics, SQL traces.

Metrics. Under gunicorn every worker writes its figures to files in PROMETHEUS_MULTIPROC_DIR,
which gunicorn.conf.py makes before this module is first imported, and /metrics sums the files:
counters over every worker that ever ran, so a restart loses none; gauges over the workers
alive now. Without it (uvicorn in development, the in-process tests) this process's registry.
Gauges are labelled, so that gunicorn's master, which imports this module too, writes none.
"""

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
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
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import BaseRoute, Route

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
    "503s answered because of the database, by cause: pool_timeout, db_timeout, connection, lock, contention.",
    ["cause"],
)
DB_INVALIDATED = Counter("db_connections_invalidated", "Connections the pool discarded as dead or unusable.", ["pool"])
# Only with DATABASE_REPLICA_URLS set (replicas.py): without replicas every read is the primary's.
DB_READS = Counter(
    "db_reads",
    "Reads of the GET routes, by where they were served: replica; primary (no replica in rotation); "
    "primary_token (no replica had applied the Consistency-Token within REPLICA_WAIT, or it names none); "
    "primary_fallback (the replica failed during the read).",
    ["served_by"],
)
# livemax: each worker measures the lag on its own; the worst of them is the one that matters.
DB_REPLICA_LAG = Gauge(
    "db_replica_lag_seconds",
    "How long the replica has been missing a write the primary has (0: it has them all), measured by GTID.",
    ["replica"],
    multiprocess_mode="livemax",
)
DB_REPLICA_IN_ROTATION = Gauge(
    "db_replica_in_rotation",
    "Workers that send reads to the replica now: 0 while it lags past REPLICA_MAX_LAG or does not answer.",
    ["replica"],
    multiprocess_mode="livesum",
)
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

# The methods counted by name; any other is "_OTHER", so a client cannot invent new series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class HttpMetrics:
    """Count requests by method, route template and status, with their durations."""

    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        # Bound label children by (method, route, status): labels() takes a lock and builds a key
        # on every call. Each route's histogram exists from the start, at zero.
        self.children: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]] = {}
        for route in routes:
            if isinstance(route, Route):
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


def metrics() -> Response:
    """The service's figures in Prometheus's text format, summed over every worker process."""
    registry = REGISTRY
    if MULTIPROCESS_DIR:
        # A registry per scrape, as prometheus_client's multiprocess mode asks: it holds only
        # the collector that reads every worker's files.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metrics_router(**route: Any) -> APIRouter:
    """GET /metrics, declared with route's arguments (tags, responses); the key is checked before it."""
    router = APIRouter()
    router.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse, **route)
    return router


# Seconds between two writes of the pool's figures to their gauges: a scrape every 15 s or so
# gains nothing from more, and requests pay nothing for them.
POOL_SAMPLE_INTERVAL = 1.0


async def sample_pools(engines: dict[str, AsyncEngine]) -> None:
    """Write each pool's figures to its gauges, until cancelled; a scrape in any worker reads them."""
    DB_POOL_WAITING.labels("main").set(0)  # from the start, not from the first wait
    gauges = [
        (engine.pool, DB_POOL_SIZE.labels(name), DB_POOL_CHECKED_OUT.labels(name), DB_POOL_OVERFLOW.labels(name))
        for name, engine in engines.items()
    ]
    while True:
        for pool, size, checked_out, overflow in gauges:
            size.set(pool.size())  # type: ignore[attr-defined]
            checked_out.set(pool.checkedout())  # type: ignore[attr-defined]
            overflow.set(max(pool.overflow(), 0))  # type: ignore[attr-defined]
        await asyncio.sleep(POOL_SAMPLE_INTERVAL)


def instrument_sql(engines: list[AsyncEngine]) -> None:
    """Trace each SQL statement as a child of the request's span (TELEMETRY=true)."""
    # Installed by the deployment that turns TELEMETRY on (README.md, "Metrics and tracing"); the image
    # without it does not need it. The engines given are traced through SQLAlchemy's public
    # cursor events; the instrumentor also wraps create_engine, as its design is.
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    # skip_dep_check: the instrumentation's declared range (sqlalchemy < 2.1) predates 2.1, whose
    # events it uses are unchanged; without it, it instruments nothing. The tracing test in
    # test_observability.py pins that statements are traced; drop this once the range includes 2.1.
    SQLAlchemyInstrumentor().instrument(engines=[engine.sync_engine for engine in engines], skip_dep_check=True)
