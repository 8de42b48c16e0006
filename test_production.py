"""Production: gunicorn with gunicorn.conf.py on MariaDB, behind a TCP proxy the tests own.

So the tests can cut, stall and restore the database without touching the server others share:
start, the database gone and back, connections killed or idle, SIGTERM under load, workers
recycled, and nothing answered 201 lost.
"""

import asyncio
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import URL, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from conftest import (
    DEADLINE,
    KEYS,
    USERS,
    Ledger,
    Server,
    TcpProxy,
    assert_503_problem,
    count_users,
    fresh_database,
    new_user,
    read_response,
    render,
    report,
    some_user,
    timed,
    wait_until_answering,
    worker_boots,
)
from models import User

# --- Production: gunicorn on MariaDB, behind the proxy -------------------------------------
# Gunicorn runs with 2 workers. Its database traffic goes through TcpProxy, so the tests can
# cut, stall and restore the database without touching the server others share.


async def every_endpoint_once(service: Server, ledger: Ledger, user_id: int) -> list[tuple[str, httpx.Response, float]]:
    """One call to each endpoint, concurrently, each on its own connection (so both workers answer)."""
    calls: list[tuple[str, str, dict[str, Any]]] = [
        *[("GET", "/health", {}) for _ in range(4)],
        *[("GET", f"{USERS}/{user_id}", {}) for _ in range(4)],
        ("GET", USERS, {}),
        ("POST", USERS, {"json": new_user()}),
        ("PATCH", f"{USERS}/{user_id}", {"json": {"name": f"Patched {uuid.uuid4().hex[:8]}"}}),
        ("DELETE", f"{USERS}/{2**62}", {}),
    ]
    # Every client is made before the first request: making one takes the test's event loop
    # long enough to show in the others' timings.
    clients = [service.client(timeout=10) for _ in calls]

    async def call(
        client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
    ) -> tuple[str, httpx.Response, float]:
        async with client:
            response, elapsed = await timed(client.request(method, path, **kwargs))
            ledger.record(response)
            return f"{method} {path}", response, elapsed

    return list(await asyncio.gather(*(call(client, *c) for client, c in zip(clients, calls, strict=True))))


# --- Production: start ---------------------------------------------------------------------


async def test_start_with_4_workers_on_a_migrated_database_fails_no_worker(tmp_path: Path) -> None:
    """Gunicorn with 4 workers, on a database the deploy step brought to head, starts each worker once."""
    async with (
        fresh_database("empty") as url,
        Server(tmp_path, workers=4, DATABASE_URL=render(url)) as server,
        server.client() as client,
    ):
        assert 200 == (await client.get(USERS)).status_code
        # Ready means one worker answers; the others may still be starting, and each must finish.
        await server.workers(4)
    log = server.log()
    print(log)
    assert 4 == log.count("Application startup complete")
    assert 1 == log.count("database pool budget")
    for failure in ("Traceback", "ERROR", "already exists", "Worker failed to boot"):
        assert failure not in log


async def test_start_refuses_when_pools_exceed_max_connections(tmp_path: Path, admin: AsyncEngine) -> None:
    """Gunicorn refuses to start when workers x (pool + overflow + probe) exceeds max_connections; it shows the sum."""
    # Whatever the server's limit (151 by default; a benchmark may have raised it), one pool over it.
    async with admin.connect() as conn:
        limit = await conn.scalar(text("SELECT @@max_connections"))
    async with fresh_database("budget") as url:
        pool = limit // 4
        server = Server(tmp_path, workers=4, DATABASE_URL=render(url), DB_POOL_SIZE=str(pool))
        returncode = await server.exit_code(within=30)
    log = server.log()
    print(log)
    assert 0 != returncode
    total = 4 * (pool + 5 + 1)
    assert f"4 workers x (DB_POOL_SIZE {pool} + DB_MAX_OVERFLOW 5 + 1 for /health) = {total} connections >" in log
    assert "Booting worker" not in log


async def test_each_request_is_logged_once_as_json(service: Server) -> None:
    """One access log line per request, the app's (JSON), none from gunicorn or uvicorn."""
    request_ids = [f"log-once-{uuid.uuid4().hex}" for _ in range(10)]

    async def call(request_id: str) -> None:
        async with service.client() as client:  # a connection each, so both workers answer
            await client.get(f"{USERS}/1", headers={"X-Request-ID": request_id})

    await asyncio.gather(*(call(request_id) for request_id in request_ids))
    await asyncio.sleep(0.2)
    lines = service.log().splitlines()
    for request_id in request_ids:
        logged = [line for line in lines if request_id in line]
        assert 1 == len(logged), logged
        assert "users.access" == json.loads(logged[0])["logger"]


async def test_in_production_every_line_on_stderr_is_json_and_a_clean_stop_logs_no_error(tmp_path: Path) -> None:
    """gunicorn's, uvicorn's and the app's lines alike, from start to a SIGTERM; the access line's fields apart."""
    async with Server(tmp_path) as server, server.client() as client:
        await client.get(f"{USERS}/1", headers={"X-Request-ID": "json-fields"})
    lines = [json.loads(line) for line in server.log().splitlines()]  # raises on any line that is not JSON

    assert {"gunicorn.error", "uvicorn.error", "users", "users.access"} <= {line["logger"] for line in lines}
    assert [] == [line for line in lines if line["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert [] == [line for line in lines if "rror" in line["message"]]
    [access] = [line for line in lines if line.get("request_id") == "json-fields"]
    assert ("GET", f"{USERS}/1", 404) == (access["method"], access["path"], access["status"])
    assert isinstance(access["duration_ms"], float)
    assert "Shutting down: Master" == lines[-1]["message"]


# --- Production: the database unreachable, then back ---------------------------------------


async def assert_back_within_deadline(
    service: Server, proxy: TcpProxy, ledger: Ledger, user_id: int, boots: int
) -> None:
    """Restore the database: the service answers normally within DEADLINE, and no worker was restarted."""
    await proxy.restore()
    recovered = await wait_until_answering(service, user_id)
    print(f"back after restore: {recovered:.3f} s")
    assert recovered < DEADLINE
    for name, response, _ in await every_endpoint_once(service, ledger, user_id):
        assert response.status_code < 500, f"{name}: {response.status_code}"
    assert boots == worker_boots(service), "a worker was restarted"


async def test_database_cut_is_503_within_2s_then_back_within_2s(
    service: Server, healthy_proxy: TcpProxy, ledger: Ledger
) -> None:
    """With connections refused and reset, every endpoint answers 503 within 2 s; when back, 200 within 2 s."""
    user_id = await some_user(service, ledger)
    boots = worker_boots(service)
    await every_endpoint_once(service, ledger, user_id)  # connections in both pools

    healthy_proxy.cut()
    for name, response, elapsed in await every_endpoint_once(service, ledger, user_id):
        print(f"cut: {name} -> {response.status_code} in {elapsed:.3f} s")
        assert_503_problem(response, elapsed)
        if name == "GET /health":
            assert {"database": "unavailable"} == response.json()["checks"]

    await assert_back_within_deadline(service, healthy_proxy, ledger, user_id, boots)


@pytest.mark.parametrize("idle", [0.0, 2.5], ids=["busy-connections", "idle-connections"])
async def test_database_stalled_is_503_within_2s_then_back_within_2s(
    service: Server, healthy_proxy: TcpProxy, ledger: Ledger, idle: float
) -> None:
    """With a database that accepts and never answers, every endpoint answers 503 within 2 s; when back, 200."""
    user_id = await some_user(service, ledger)
    boots = worker_boots(service)
    await every_endpoint_once(service, ledger, user_id)
    # Connections idle longer than IDLE_PING_AFTER are pinged at checkout; fresher ones are not.
    await asyncio.sleep(idle)

    healthy_proxy.stall()
    for name, response, elapsed in await every_endpoint_once(service, ledger, user_id):
        print(f"stall: {name} -> {response.status_code} in {elapsed:.3f} s")
        assert_503_problem(response, elapsed)

    await assert_back_within_deadline(service, healthy_proxy, ledger, user_id, boots)


async def test_a_request_waiting_for_a_connection_waits_db_pool_timeout_not_the_statement(
    db_url: URL, healthy_proxy: TcpProxy, tmp_path: Path
) -> None:
    """One worker, one connection, stuck in a stalled statement: the next request is 503 after DB_POOL_TIMEOUT."""
    url = render(db_url.set(host="127.0.0.1", port=healthy_proxy.port))
    one_connection = {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "0", "DB_TIMEOUT": "1.5", "DB_POOL_TIMEOUT": "0.3"}
    async with Server(tmp_path, workers=1, DATABASE_URL=url, **one_connection) as server, server.client() as client:
        await client.get(f"{USERS}/1")  # the connection, open and fresh: no ping at its next checkout
        healthy_proxy.stall()
        holder = asyncio.create_task(timed(client.get(f"{USERS}/1")))
        await asyncio.sleep(0.2)  # the holder has the connection, and waits for its statement
        waiter, waited = await timed(client.get(f"{USERS}/1"))
        held, held_for = await holder
    print(f"waiting in line: {waiter.status_code} in {waited:.3f} s; holding: {held.status_code} in {held_for:.3f} s")
    assert_503_problem(waiter, waited)
    assert 0.25 < waited < 1.0, "the wait in line is DB_POOL_TIMEOUT, not the holder's DB_TIMEOUT"
    assert_503_problem(held, held_for)
    assert held_for > 1.4, "the statement had its DB_TIMEOUT"


# --- Production: connections killed by the server under load -------------------------------


@dataclass
class Tally:
    reads: Counter[int] = field(default_factory=Counter)
    writes: Counter[int] = field(default_factory=Counter)
    failed_writes: list[dict[str, Any]] = field(default_factory=list)
    # Requests that got no answer at all: (when they were sent, what the client saw).
    unanswered: list[tuple[float, str]] = field(default_factory=list)


async def run_load(service: Server, ledger: Ledger, user_ids: list[int], until: asyncio.Event) -> Tally:
    """Eight clients reading and creating users (one request in four a write) until `until` is set."""
    tally = Tally()

    async def client_loop(n: int) -> None:
        async with service.client(timeout=10) as client:
            i = 0
            while not until.is_set():
                i += 1
                sent = time.monotonic()
                user = new_user()
                try:
                    if i % 4 == 0:
                        response = await client.post(USERS, json=user)
                    elif i % 4 == 1:
                        response = await client.get(USERS, params={"limit": 5})
                    else:
                        response = await client.get(f"{USERS}/{user_ids[(n + i) % len(user_ids)]}")
                except httpx.TransportError as exc:
                    tally.unanswered.append((sent, repr(exc)))
                    await asyncio.sleep(0.05)
                    continue
                if response.request.method == "POST":
                    tally.writes[response.status_code] += 1
                    ledger.record(response)
                    if response.status_code >= 500:
                        tally.failed_writes.append(user)
                else:
                    tally.reads[response.status_code] += 1

    await asyncio.gather(*(client_loop(n) for n in range(8)))
    return tally


async def kill_three_times_then_stop(admin: AsyncEngine, database: str, stop: asyncio.Event) -> int:
    """Under load, KILL the service's connections three times, 0.7 s apart, then stop the load; return how many."""
    killed = 0
    for _ in range(3):
        await asyncio.sleep(0.7)
        killed += await kill_service_connections(admin, database)
    await asyncio.sleep(0.7)
    stop.set()
    return killed


async def kill_service_connections(admin: AsyncEngine, database: str) -> int:
    """KILL every server connection of the service (this test database's, not this one's)."""
    async with admin.connect() as conn:
        ids = (
            await conn.scalars(
                text(
                    "SELECT ID FROM information_schema.PROCESSLIST "
                    "WHERE DB = :db AND ID <> CONNECTION_ID() AND COMMAND <> 'Killed'"
                ),
                {"db": database},
            )
        ).all()
        for process_id in ids:
            try:
                await conn.execute(text(f"KILL {int(process_id)}"))
            except Exception as exc:  # already gone: "Unknown thread id"
                if "Unknown thread" not in str(exc):
                    raise
    return len(ids)


async def test_connections_killed_under_load_fail_no_read_and_at_most_one_write_each(
    service: Server, healthy_proxy: TcpProxy, admin: AsyncEngine, db_url: URL, ledger: Ledger
) -> None:
    """Connections KILLed under load: no read fails; a write fails at most once per kill, and atomically."""
    user_ids = [await some_user(service, ledger) for _ in range(5)]
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(service, ledger, user_ids, stop))
    killed = await kill_three_times_then_stop(admin, str(db_url.database), stop)
    tally = await load
    print(f"killed {killed} connections; reads {dict(tally.reads)}; writes {dict(tally.writes)}")

    assert killed > 0
    assert [] == tally.unanswered
    assert sum(tally.reads.values()) > 50 and sum(tally.writes.values()) > 10
    assert set() == {status for status in tally.reads if status != 200}
    failed = sum(n for status, n in tally.writes.items() if status != 201)
    assert failed <= killed
    assert set() == {status for status in tally.writes if status not in (201, 503)}
    # A write answered 503 either happened, whole, or did not happen at all.
    async with admin.connect() as conn:
        for user in tally.failed_writes:
            rows = (
                await conn.execute(
                    select(User.email, User.name, User.is_active).where(User.email_key == user["email"].lower())
                )
            ).all()
            assert rows in ([], [(user["email"], user["name"], user["is_active"])])


async def test_clients_that_retry_with_idempotency_keys_through_killed_connections_write_each_user_once(
    service: Server, healthy_proxy: TcpProxy, admin: AsyncEngine, db_url: URL, ledger: Ledger
) -> None:
    """Connections KILLed under load; clients retry each POST and PATCH with its key until answered: one write each."""
    stop = asyncio.Event()
    answered: dict[str, dict[str, Any]] = {}  # by email: the user as last answered
    retried: Counter[str] = Counter()

    async def until_answered(client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        for _ in range(100):
            try:
                response = await client.request(method, path, json=body, headers=key)
            except httpx.TransportError as exc:
                retried[type(exc).__name__] += 1
            else:
                if response.status_code < 500:
                    ledger.record(response)
                    return response
                retried[str(response.status_code)] += 1
            await asyncio.sleep(0.05)
        pytest.fail(f"{method} {path} was never answered")

    async def client_loop() -> None:
        async with service.client(timeout=10) as client:
            while not stop.is_set():
                user = new_user()
                created = await until_answered(client, "POST", USERS, user)
                assert 201 == created.status_code, created.text
                path = f"{USERS}/{created.json()['id']}"
                patched = await until_answered(client, "PATCH", path, {"name": f"Renamed {user['name']}"})
                assert 200 == patched.status_code, patched.text
                answered[user["email"]] = patched.json()

    load = asyncio.gather(*(client_loop() for _ in range(6)))
    killed = await kill_three_times_then_stop(admin, str(db_url.database), stop)
    await load
    print(f"killed {killed} connections; {len(answered)} users created and renamed; retried {dict(retried)}")

    assert killed > 0 and len(answered) > 10
    async with admin.connect() as conn:
        for email, user in answered.items():
            rows = (await conn.execute(select(User.id, User.name).where(User.email_key == email.lower()))).all()
            assert [(user["id"], user["name"])] == [tuple(row) for row in rows]


async def test_concurrent_requests_with_one_key_across_two_workers_write_once(
    service: Server, admin: AsyncEngine
) -> None:
    """20 requests at once with one key, on 20 connections to both workers: one user; the rest replays or 409."""
    body, key = new_user(), {"Idempotency-Key": str(uuid.uuid4())}

    async def post() -> httpx.Response:
        async with service.client(timeout=10) as client:
            return await client.post(USERS, json=body, headers=key)

    responses = await asyncio.gather(*(post() for _ in range(20)))

    originals = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert 1 == len(originals), [r.status_code for r in responses]
    assert {originals[0].content} == {r.content for r in replays}
    assert set() == {r.status_code for r in responses if r not in originals and r not in replays} - {409}
    assert 1 == await count_users(admin, body["email"])


# --- Production: connections idle past a proxy's or the server's timeout -------------------


async def test_connections_cut_by_an_idle_proxy_are_replaced_unseen(
    service: Server, healthy_proxy: TcpProxy, ledger: Ledger
) -> None:
    """After a NAT or load balancer dropped the idle pooled connections, reads and writes succeed."""
    user_id = await some_user(service, ledger)
    await every_endpoint_once(service, ledger, user_id)
    healthy_proxy.idle_cut = 3.0
    await asyncio.sleep(4.0)
    assert 0 == len(healthy_proxy.links)  # every pooled connection was cut

    for name, response, _ in await every_endpoint_once(service, ledger, user_id):
        assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"


async def test_connections_past_the_server_wait_timeout_are_replaced_unseen(
    db_url: URL, ledger: Ledger, tmp_path: Path
) -> None:
    """After the server closed connections idle past its wait_timeout, reads and writes succeed."""
    # The session's wait_timeout, set by the driver at connect (the URL passes it to aiomysql):
    # the server closes these connections and no one else's.
    url = db_url.update_query_dict({"init_command": "SET SESSION wait_timeout = 3"})
    async with Server(tmp_path, DATABASE_URL=render(url)) as server:
        user_id = await some_user(server, ledger)
        await every_endpoint_once(server, ledger, user_id)
        await asyncio.sleep(4.5)
        for name, response, _ in await every_endpoint_once(server, ledger, user_id):
            assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    assert "Traceback" not in server.log()


async def test_no_answer_was_a_500_and_no_traceback_was_logged(service: Server) -> None:
    """Through all of the above the service answered no 500 and logged no stack trace."""
    log = service.log()
    assert " 500 " not in log
    assert "Traceback" not in log


# --- Production: SIGTERM under load --------------------------------------------------------


async def test_sigterm_under_load_answers_every_accepted_request_and_closes_the_pool(
    db_url: URL, ledger: Ledger, tmp_path: Path
) -> None:
    """On SIGTERM, requests already accepted get their whole answer, workers exit in time, pools close."""
    async with Server(tmp_path, DATABASE_URL=render(db_url)) as server:
        user_ids = [await some_user(server, ledger) for _ in range(3)]

        # Creations whose body is still arriving when the signal comes: accepted for certain.
        async def slow_create() -> tuple[httpx.Response, float]:
            body = httpx.Request("POST", "/", json=new_user()).read()

            async def trickle() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 8):  # over about 3 s
                    yield body[i : i + 8]
                    await asyncio.sleep(3 * 8 / len(body))

            async with server.client(timeout=30) as client:
                response = await client.post(USERS, content=trickle(), headers={"Content-Type": "application/json"})
                return response, time.monotonic()

        stop = asyncio.Event()
        load = asyncio.create_task(run_load(server, ledger, user_ids, stop))
        slow = [asyncio.create_task(slow_create()) for _ in range(4)]
        await asyncio.sleep(1.5)
        # From here on the load's clients send nothing new; what they sent is in flight.
        stop.set()
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        slow_answers = await asyncio.gather(*slow)
        tally = await load
        returncode = await server.wait_exit(30)
        exited = time.monotonic() - signalled
    log = server.log()
    print(log[-3000:])
    print(
        f"reads {dict(tally.reads)}; writes {dict(tally.writes)}; unanswered {tally.unanswered}; "
        f"exited {exited:.2f} s after SIGTERM"
    )
    for response, answered in slow_answers:
        ledger.record(response)
        assert 201 == response.status_code, response.text
        assert answered > signalled  # still sending its body when the signal came
    assert [] == tally.unanswered
    assert set() == {status for status in [*tally.reads, *tally.writes] if status >= 500}
    assert 0 == returncode
    assert exited < 20  # graceful_timeout
    assert 2 == log.count("database pool closed")
    for failure in ("Traceback", "WORKER TIMEOUT", "SIGKILL", "Cancel"):
        assert failure not in log


async def test_a_request_begun_in_a_stopping_workers_idle_grace_gets_its_whole_answer(tmp_path: Path) -> None:
    """A request that arrives on an idle keep-alive connection after SIGTERM, and is still arriving when the
    grace for idle connections ends (IDLE_CLOSE_GRACE, 1 s), is answered whole, with Connection: close."""
    async with Server(tmp_path, workers=1) as server:
        assert server.process is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
            assert 200 == (await read_response(reader))[0]
            server.process.send_signal(signal.SIGTERM)  # SHUTDOWN_DELAY is 0: the worker stops at once
            await asyncio.sleep(0.5)  # this connection is idle, in its grace
            body = json.dumps(new_user()).encode()
            head = (
                f"POST {USERS} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body[:10])
            await asyncio.sleep(1.2)  # the grace has ended, with the request half sent
            writer.write(body[10:])
            status, headers, answer = await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.transport.abort()

    assert 201 == status, answer
    assert "close" == headers["connection"]


# --- Production: workers recycled under load --------------------------------------------

WRK_COUNTS = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
   if status > 299 then statuses[status] = (statuses[status] or 0) + 1 end
end
function done(summary, latency, requests)
   local e = summary.errors
   local seen = {}
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do seen[status] = (seen[status] or 0) + count end
   end
   local parts = {}
   for status, count in pairs(seen) do table.insert(parts, string.format('"%d":%d', status, count)) end
   io.write(string.format('WRK_JSON {"requests":%d,"connect":%d,"read":%d,"write":%d,"status":%d,', summary.requests,
      e.connect, e.read, e.write, e.status))
   io.write(string.format('"timeout":%d,"slowest_ms":%d,"statuses":{%s}}\\n', e.timeout, latency.max / 1000,
      table.concat(parts, ",")))
end
"""


async def test_workers_recycled_under_load_lose_no_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """64 connections for 30 s while each worker recycles every 1,000 requests: no socket error, no non-2xx."""
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed (apt-get install wrk): the recycling test did not run")
    script = tmp_path / "counts.lua"
    script.write_text(WRK_COUNTS)
    # A worker stops and another boots about once a second here, while the one left serves the
    # 64 connections with its 15. On a busy machine a statement can then outlast DB_TIMEOUT (1 s)
    # and be answered 503, as a starved worker should answer (seen with four CPU hogs beside the
    # test). Generous limits leave what this test is about: the requests recycling itself might lose.
    async with Server(
        tmp_path, MAX_REQUESTS="1000", MAX_REQUESTS_JITTER="100", DB_TIMEOUT="5", DB_POOL_TIMEOUT="5"
    ) as server:
        boots = worker_boots(server)
        process = await asyncio.create_subprocess_exec(
            wrk, "-t2", "-c64", "-d30s", "--timeout", "15s", "-s", str(script),
            "-H", f"Authorization: Bearer {KEYS[0]}", f"{server.url}{USERS}?limit=1",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
        recycled = worker_boots(server) - boots
        # What the workers said of any answer that was not a 2xx.
        complaints = [line for line in server.log().splitlines() if '"level": "INFO"' not in line]
    counts = json.loads(output.split("WRK_JSON ", 1)[1].splitlines()[0])
    report(capsys, f"[recycling] {recycled} workers recycled; wrk: {counts}")

    assert recycled >= 5
    assert counts["requests"] > 5_000
    assert {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0} == {
        name: counts[name] for name in ("connect", "read", "write", "timeout", "status")
    }, "\n".join(complaints)


# --- Production: nothing answered 201 was lost ---------------------------------------------


async def test_every_user_answered_201_is_stored_as_answered(admin: AsyncEngine, ledger: Ledger) -> None:
    """Every creation answered 201 during all of the above is in the database, as it was answered."""
    assert len(ledger.created) > 20
    async with admin.connect() as conn:
        rows = (
            await conn.execute(
                select(User.id, User.email, User.name, User.is_active, User.created_at).where(
                    User.id.in_(list(ledger.created))
                )
            )
        ).all()
    stored = {row.id: row for row in rows}
    assert set(ledger.created) == set(stored)
    for user_id, answered in ledger.created.items():
        row = stored[user_id]
        assert (answered["email"], answered["name"], answered["is_active"]) == (row.email, row.name, row.is_active)
        assert answered["created_at"] == row.created_at.isoformat(timespec="microseconds")
