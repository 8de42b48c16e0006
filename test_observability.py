"""Observability: Prometheus metrics summed over workers, the probes, and traces."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy import URL

import main
import observability
from conftest import (
    DEADLINE,
    HERE,
    KEYS,
    METRICS_KEY,
    USERS,
    Ledger,
    Server,
    TcpProxy,
    assert_503_problem,
    assert_problem,
    migrate,
    render,
    requests_counted,
    samples,
    scrape,
    service_env,
    some_user,
    timed,
    writes,
)

# --- Observability: metrics, probes, traces ------------------------------------------------


async def test_livez_and_readyz_are_200_when_the_database_answers(client: httpx.AsyncClient) -> None:
    """Both probes answer 200 with no key; /readyz has checked the database and the worker."""
    live = await client.get("/livez", headers={"Authorization": ""})
    ready = await client.get("/readyz", headers={"Authorization": ""})

    assert (200, {"status": "ok"}) == (live.status_code, live.json())
    assert 200 == ready.status_code
    assert {"database": "ok", "worker": "serving"} == ready.json()["checks"]


async def test_metrics_label_requests_by_route_template_never_by_raw_path(client: httpx.AsyncClient) -> None:
    """A request to /api/v1/users/7 is counted under /api/v1/users/{user_id}; an unknown path under (none)."""
    await client.get(f"{USERS}/7")
    await client.get("/no/such/path/8")

    text = (await client.get("/metrics")).text

    routes = {labels["route"] for name, labels, _ in samples(text) if name == "http_requests_total"}
    assert {f"{USERS}/{{user_id}}", main.UNROUTED} <= routes
    assert not {route for route in routes if re.search(r"/\d", route)}, routes


async def test_dashboard_queries_only_metrics_the_service_exports(client: httpx.AsyncClient) -> None:
    """Every metric named in dashboards/users-api.json is one a scrape of the service lists."""
    from prometheus_client.parser import text_string_to_metric_families

    await client.get(f"{USERS}/1")
    families = list(text_string_to_metric_families((await client.get("/metrics")).text))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {f"{f.name}{suffix}" for f in families for suffix in suffixes.get(f.type, [""])}
    dashboard = json.loads((HERE / "dashboards" / "users-api.json").read_text())

    named = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)", "", target["expr"])
            named |= {name for name in re.findall(r"[a-z_][a-z0-9_]*(?!\w*\s*\()", expr) if "_" in name}
    assert {"http_requests_total", "http_request_duration_seconds_bucket", "db_pool_wait_seconds_bucket"} <= named
    assert set() == named - exported


async def test_metrics_need_a_metrics_key_that_api_keys_do_not_replace(tmp_path: Path) -> None:
    """/metrics answers 401 to no key and to an API key, 200 to a metrics key, which opens no /api/v1."""
    async with Server(tmp_path, METRICS_KEYS=METRICS_KEY, RATE_LIMIT="2") as server:
        async with server.client(None) as anonymous, server.client(KEYS[0]) as api, server.client(METRICS_KEY) as ops:
            statuses = [
                (await anonymous.get("/metrics")).status_code,
                (await api.get("/metrics")).status_code,
                *[(await ops.get("/metrics")).status_code for _ in range(5)],
                (await ops.get(f"{USERS}/1")).status_code,
            ]
            rejected = (await api.get("/metrics")).headers["www-authenticate"]
        log = server.log()

    assert [401, 401, 200, 200, 200, 200, 200, 401] == statuses, "a scrape is never rate limited (RATE_LIMIT=2)"
    assert "Bearer" == rejected
    assert "GET /metrics" not in log, "a scrape writes no access line at INFO"


async def test_metrics_without_metrics_keys_are_not_served_in_production(sqlite_service: Server) -> None:
    """In production with no METRICS_KEYS, /metrics is a 404 problem, whatever key is sent."""
    async with sqlite_service.client() as client:
        response = await client.get("/metrics")

    assert_problem(response, 404)


async def test_request_counter_sums_exactly_over_2_workers_and_survives_a_worker_restart(tmp_path: Path) -> None:
    """N requests over 2 workers count N; after a worker is killed and replaced, N plus those that followed."""
    route, count, after = f"{USERS}/{{user_id}}", 60, 20
    async with Server(tmp_path, workers=2, METRICS_KEYS=METRICS_KEY) as server:
        workers = await server.workers(2)
        before = [writes(pid) for pid in workers]
        # Each on a connection of its own, so the kernel spreads them over both workers.
        for _ in range(count):
            async with server.client() as client:
                assert 404 == (await client.get(f"{USERS}/{2**62}")).status_code
        served = [writes(pid) - b for pid, b in zip(workers, before, strict=True)]
        first = await scrape(server)

        dead = workers[0]
        os.kill(dead, signal.SIGTERM)
        for _ in range(100):
            alive = server.children()
            if dead not in alive and len(alive) == 2 and server.log().count("Application startup complete") >= 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(POOL_SAMPLE_WAIT)  # the new worker's gauges written once
        for _ in range(after):
            async with server.client() as client:
                assert 404 == (await client.get(f"{USERS}/{2**62}")).status_code
        second = await scrape(server)
        replacement = next(pid for pid in server.children() if pid not in workers)

    print(f"served per worker (write calls): {served}\n{second}")
    assert min(served) > 0.2 * count, f"both workers answered: {served}"
    assert count == requests_counted(first, route)
    assert count + after == requests_counted(second, route)
    pids = {labels["pid"] for _, labels, _ in samples(second) if "pid" in labels}
    assert {str(workers[1]), str(replacement)} == pids, "no gauge of the dead worker remains"


# How long a new worker takes, at most, to write its pool gauges (observability.POOL_SAMPLE_INTERVAL).
POOL_SAMPLE_WAIT = observability.POOL_SAMPLE_INTERVAL + 0.5


async def test_livez_is_200_and_readyz_503_while_the_database_is_cut_then_both_200(
    service: Server, healthy_proxy: TcpProxy
) -> None:
    """With the database cut, /livez stays 200 and /readyz is 503 within 2 s; when back, both 200."""
    async with service.client(None, timeout=10) as client:
        healthy_proxy.cut()
        live, _ = await timed(client.get("/livez"))
        ready, elapsed = await timed(client.get("/readyz"))
        await healthy_proxy.restore()
        for _ in range(int(DEADLINE / 0.05)):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        back = [(await client.get(path)).status_code for path in ("/livez", "/readyz")]

    assert 200 == live.status_code
    assert_503_problem(ready, elapsed)
    assert {"database": "unavailable", "worker": "serving"} == ready.json()["checks"]
    assert [200, 200] == back


async def test_readyz_is_503_while_a_worker_drains_after_sigterm_and_held_requests_are_answered(
    db_url: URL, healthy_proxy: TcpProxy, tmp_path: Path
) -> None:
    """After SIGTERM, for SHUTDOWN_DELAY, new connections still get /readyz 503 and /livez 200; then it drains."""
    url = render(db_url.set(host="127.0.0.1", port=healthy_proxy.port))
    async with Server(tmp_path, workers=1, DATABASE_URL=url, SHUTDOWN_DELAY="2", DB_TIMEOUT="5") as server:
        async with server.client(timeout=10) as client:
            ready_before = (await client.get("/readyz")).status_code
            user_id = await some_user(server, Ledger())
            healthy_proxy.stall()  # the next read is held until the database is back
            held = asyncio.create_task(client.get(f"{USERS}/{user_id}"))
            await asyncio.sleep(0.3)
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with server.client(None) as new_connection:
                draining, elapsed = await timed(new_connection.get("/readyz"))
                live = (await new_connection.get("/livez")).status_code
            still_held = not held.done()
            await healthy_proxy.restore()
            answer = await held
        returncode = await server.wait_exit(20)

    assert 200 == ready_before
    assert_503_problem(draining, elapsed)
    assert {"worker": "draining"} == draining.json()["checks"]
    assert 200 == live
    assert still_held, "the slow request was in flight during the drain"
    assert 200 == answer.status_code
    assert 0 == returncode


TRACING_SCRIPT = """
import asyncio, json, logging, sys
import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import main

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())

async def run():
    async with main.app.router.lifespan_context(main.app) as state:
        logging.getLogger("users.access").addHandler(Keep())
        async def app(scope, receive, send):
            scope["state"] = dict(state)
            await main.app(scope, receive, send)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/api/v1/users/1")).status_code == 200
    spans = [
        {"name": s.name, "kind": s.kind.name, "trace_id": f"{s.context.trace_id:032x}",
         "span_id": s.context.span_id, "parent": s.parent.span_id if s.parent else None}
        for s in exporter.get_finished_spans()
    ]
    print(json.dumps({"spans": spans, "lines": lines}))

asyncio.run(run())
"""


async def test_tracing_gives_a_server_span_per_request_and_a_child_span_per_statement(tmp_path: Path) -> None:
    """With TELEMETRY=true: one server span named after the route, SQL spans under it, its trace id in the log line."""
    env = service_env(tmp_path, TELEMETRY="true", API_KEYS="")
    await migrate(env, tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRACING_SCRIPT, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert 0 == process.returncode, err.decode()
    result = json.loads(out.decode().splitlines()[-1])
    spans = result["spans"]

    servers = [span for span in spans if span["kind"] == "SERVER"]
    assert [f"GET {USERS}/{{user_id}}"] == [span["name"] for span in servers]
    server = servers[0]
    statements = [span for span in spans if span["kind"] == "CLIENT"]
    assert statements, spans
    assert all(server["trace_id"] == span["trace_id"] for span in statements)
    ids = {span["span_id"]: span for span in spans}
    for span in statements:  # under the server span, directly or through FastAPI's operation spans
        parent = span
        while parent["parent"] is not None and parent["span_id"] != server["span_id"]:
            parent = ids[parent["parent"]]
        assert server["span_id"] == parent["span_id"]
    request_lines = [line for line in result["lines"] if line.startswith(f"GET {USERS}/1 ")]
    assert [f"trace_id={server['trace_id']}"] == [line.split()[-1] for line in request_lines]
