"""The service as deployed: gunicorn with gunicorn.conf.py on MariaDB, and the database failing.

Needs TEST_MYSQL_URL (for example mysql+aiomysql://root@127.0.0.1:3306/test_users); without it
every test that needs the server is skipped, and says so. The tests use databases of their own
on that server, named after it (test_users_production, ...), and drop them at the end.

Gunicorn runs as a subprocess with 2 workers. Its database traffic goes through
DatabaseProxy, a small TCP proxy these tests own, so they can cut, stall and restore the
database without touching the server others share. Requests go over loopback with httpx.
"""

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import URL, make_url, select, text
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.schema import CreateTable

import main
from models import Base, User

HERE = Path(__file__).parent
TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "")

KEY = "production-test-key"
USERS = "/api/v1/users"
# Ports of the proxy and of the gunicorn instances these tests start.
PROXY_PORT, SERVICE_PORT, SIGTERM_PORT, EMPTY_PORT, BUDGET_PORT, WAIT_TIMEOUT_PORT = range(18220, 18226)
# The contract: with the database gone, every answer within 2 s.
DEADLINE = 2.0


# --- The proxy between the service and the database ----------------------------------------


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset, as a crashed server or a dropped route does."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    last_active: float = field(default_factory=time.monotonic)

    def reset(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                reset(writer)


class DatabaseProxy:
    """Forward TCP to the database; cut (refuse and reset), stall (forward nothing), or restore.

    With idle_cut set, connections idle that many seconds are reset, as a NAT gateway or a
    load balancer does.
    """

    def __init__(self, port: int, upstream_host: str, upstream_port: int) -> None:
        self.port = port
        self.upstream = (upstream_host, upstream_port)
        self.links: set[Link] = set()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.idle_cut: float | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port, reuse_address=True)
        self.tasks.add(asyncio.create_task(self.cut_idle_links()))

    async def close(self) -> None:
        self.cut()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for link in list(self.links):
            link.reset()
        self.links.clear()
        self.flowing.set()

    def stall(self) -> None:
        """Keep accepting connections and bytes, and forward nothing, in either direction."""
        self.flowing.clear()

    async def restore(self) -> None:
        self.flowing.set()
        if self.server is None:
            self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port, reuse_address=True)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(writer)
        self.links.add(link)
        try:
            await self.flowing.wait()  # a stalled database does not even send its greeting
            up_reader, link.server = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(self.pump(reader, link.server, link), self.pump(up_reader, writer, link))
        except (OSError, asyncio.IncompleteReadError):
            link.reset()
        finally:
            self.links.discard(link)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        while data := await reader.read(65536):
            await self.flowing.wait()
            if link not in self.links:
                return
            link.last_active = time.monotonic()
            writer.write(data)
            await writer.drain()
        writer.close()  # end of stream: pass the close on

    async def cut_idle_links(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.idle_cut is not None:
                for link in list(self.links):
                    if time.monotonic() - link.last_active > self.idle_cut:
                        self.links.discard(link)
                        link.reset()


# --- Gunicorn as a subprocess --------------------------------------------------------------


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py main:app`, as in production, with its log in a file."""

    def __init__(self, port: int, database_url: str, log_path: Path, workers: int = 2, **env: str) -> None:
        self.port = port
        self.log_path = log_path
        self.env = {
            # The test process's own settings must not leak into the service.
            **{k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DATABASE_", "API_", "RATE_"))},
            "DATABASE_URL": database_url,
            "ENVIRONMENT": "production",
            "API_KEYS": KEY,
            "WEB_CONCURRENCY": str(workers),
            "PORT": str(port),
            # The rate limit is not under test here, and every request comes from 127.0.0.1.
            "RATE_LIMIT": "1000000",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "main:app", "--no-control-socket"],
                cwd=HERE,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(100):
                assert self.process is not None
                if self.process.poll() is not None:
                    pytest.fail(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        pytest.fail(f"gunicorn did not answer /health within 20 s:\n{self.log()}")

    async def wait_exit(self, within: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, within)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await self.wait_exit(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await self.wait_exit(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)


# --- Fixtures ------------------------------------------------------------------------------


def database_url(name_suffix: str, **changes: Any) -> URL:
    """TEST_MYSQL_URL for a database of these tests' own; skip the test when it is not set."""
    if not TEST_MYSQL_URL:
        pytest.skip("TEST_MYSQL_URL is not set: the production tests (gunicorn on MariaDB) did not run")
    base = make_url(TEST_MYSQL_URL)
    return base.set(database=f"{base.database or 'test'}_{name_suffix}", **changes)


def render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


async def recreate_database(url: URL) -> None:
    """Drop and create the database of `url`, empty."""
    engine = create_async_engine(url.set(database=""), poolclass=NullPool)
    async with engine.connect() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
        await conn.execute(text(f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4"))
    await engine.dispose()


async def drop_database(url: URL) -> None:
    engine = create_async_engine(url.set(database=""), poolclass=NullPool)
    async with engine.connect() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS `{url.database}`"))
    await engine.dispose()


@pytest.fixture(scope="module")
async def db_url() -> AsyncIterator[URL]:
    url = database_url("production")
    await recreate_database(url)
    yield url
    await drop_database(url)


@pytest.fixture(scope="module")
async def admin(db_url: URL) -> AsyncIterator[AsyncEngine]:
    """A direct connection to the test database, past the proxy; NullPool, so a KILL sweep skips it."""
    engine = create_async_engine(db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def proxy(db_url: URL) -> AsyncIterator[DatabaseProxy]:
    proxy = DatabaseProxy(PROXY_PORT, db_url.host or "127.0.0.1", db_url.port or 3306)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="module")
async def service(
    db_url: URL, proxy: DatabaseProxy, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gunicorn]:
    """Gunicorn, 2 workers, reaching the database only through the proxy."""
    url = render(db_url.set(host="127.0.0.1", port=proxy.port))
    server = Gunicorn(SERVICE_PORT, url, tmp_path_factory.mktemp("gunicorn") / "service.log")
    server.start()
    await server.wait_ready()
    yield server
    await server.stop()


@pytest.fixture
async def healthy_proxy(proxy: DatabaseProxy) -> AsyncIterator[DatabaseProxy]:
    """The proxy, restored to forwarding whatever a test did to it."""
    yield proxy
    proxy.idle_cut = None
    await proxy.restore()


@dataclass
class Ledger:
    """Every user whose creation was answered 201, as it was answered."""

    created: dict[int, dict[str, Any]] = field(default_factory=dict)

    def record(self, response: httpx.Response) -> None:
        """Note a creation answered 201, or a later change of one answered 200."""
        method, status = response.request.method, response.status_code
        if (method, status) == ("POST", 201) or (method, status) == ("PATCH", 200):
            body = response.json()
            self.created[body["id"]] = body


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    yield Ledger()


# --- Helpers -------------------------------------------------------------------------------


def new_user() -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    return {"email": f"user-{tag}@example.com", "name": f"User {tag}", "is_active": True}


def assert_503_problem(response: httpx.Response, elapsed: float) -> None:
    """503, problem+json, Retry-After, within the deadline, nothing of the driver's or SQL's text."""
    assert 503 == response.status_code, response.text
    assert elapsed < DEADLINE, f"answered after {elapsed:.2f} s"
    assert "application/problem+json" == response.headers["content-type"]
    assert response.headers["retry-after"].isdigit()
    body = response.text
    for leak in ("Traceback", "SELECT", "INSERT", "pymysql", "aiomysql", "sqlalchemy", "Errno"):
        assert leak not in body


async def timed(coroutine: Any) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await coroutine
    return response, time.perf_counter() - start


async def every_endpoint_once(
    service: Gunicorn, ledger: Ledger, user_id: int
) -> list[tuple[str, httpx.Response, float]]:
    """One call to each endpoint, concurrently, each on its own connection (so both workers answer)."""

    async def call(method: str, path: str, **kwargs: Any) -> tuple[str, httpx.Response, float]:
        async with service.client(timeout=10) as client:
            response, elapsed = await timed(client.request(method, path, **kwargs))
            ledger.record(response)
            return f"{method} {path}", response, elapsed

    return list(
        await asyncio.gather(
            *[call("GET", "/health") for _ in range(4)],
            *[call("GET", f"{USERS}/{user_id}") for _ in range(4)],
            call("GET", USERS),
            call("POST", USERS, json=new_user()),
            call("PATCH", f"{USERS}/{user_id}", json={"name": f"Patched {uuid.uuid4().hex[:8]}"}),
            call("DELETE", f"{USERS}/{2**62}"),
        )
    )


async def some_user(service: Gunicorn, ledger: Ledger) -> int:
    async with service.client() as client:
        response = await client.post(USERS, json=new_user())
    ledger.record(response)
    assert 201 == response.status_code, response.text
    return int(response.json()["id"])


def worker_boots(service: Gunicorn) -> int:
    return service.log().count("Booting worker")


async def wait_until_answering(service: Gunicorn, user_id: int) -> float:
    """Seconds until the service answers /health and a read normally again (at most DEADLINE + 1)."""
    start = time.perf_counter()
    async with service.client(timeout=5) as client:
        while time.perf_counter() - start < DEADLINE + 1:
            health = await client.get("/health")
            read = await client.get(f"{USERS}/{user_id}")
            if health.status_code == read.status_code == 200:
                return time.perf_counter() - start
            await asyncio.sleep(0.05)
    pytest.fail("the service did not answer normally again")


# --- Start ---------------------------------------------------------------------------------


async def test_start_on_empty_database_creates_schema_once_with_4_workers(tmp_path: Path) -> None:
    """Gunicorn with 4 workers on an empty database creates the table once and no worker fails."""
    url = database_url("empty")
    await recreate_database(url)
    server = Gunicorn(EMPTY_PORT, render(url), tmp_path / "empty.log", workers=4)
    try:
        server.start()
        await server.wait_ready()
        async with server.client() as client:
            assert 200 == (await client.get(USERS)).status_code
    finally:
        await server.stop()
        await drop_database(url)
    log = server.log()
    print(log)
    assert 4 == log.count("Application startup complete")
    assert 1 == log.count("database pool budget")
    for failure in ("Traceback", "ERROR", "already exists", "Worker failed to boot"):
        assert failure not in log


async def test_start_refuses_when_pools_exceed_max_connections(tmp_path: Path) -> None:
    """Gunicorn refuses to start when workers x (pool + overflow) exceeds max_connections, and shows the sum."""
    url = database_url("budget")
    await recreate_database(url)
    server = Gunicorn(BUDGET_PORT, render(url), tmp_path / "budget.log", workers=4, DB_POOL_SIZE="100")
    try:
        server.start()
        returncode = await server.wait_exit(30)
    finally:
        await server.stop()
        await drop_database(url)
    log = server.log()
    print(log)
    assert 0 != returncode
    assert "4 workers x (DB_POOL_SIZE 100 + DB_MAX_OVERFLOW 5) = 420 connections >" in log
    assert "Booting worker" not in log


async def test_each_request_is_logged_once_as_json(service: Gunicorn) -> None:
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


# --- compose.yaml's initdb/ ---------------------------------------------------------------

INITDB = HERE / "initdb"


def schema_sql() -> str:
    """initdb/01-schema.sql as it must be: the users table of models.py, as MySQL DDL."""
    ddl = str(CreateTable(Base.metadata.tables[User.__tablename__]).compile(dialect=mysql.dialect())).strip()
    return (
        "-- The users table, generated from models.py; do not edit (test_production.py checks it):\n"
        "-- python -c 'import test_production as t; print(t.schema_sql(), end=\"\")' > initdb/01-schema.sql\n"
        f"{ddl};\n"
    )


def test_initdb_schema_is_generated_from_models() -> None:
    """initdb/01-schema.sql is exactly the DDL SQLAlchemy generates from models.py for MySQL."""
    assert schema_sql() == (INITDB / "01-schema.sql").read_text()


async def test_initdb_creates_the_table_create_all_creates_and_the_demo_users() -> None:
    """The initdb scripts, run as MySQL's entrypoint runs them, give create_all's table and main.py's demo users."""
    by_initdb, by_create_all = database_url("initdb"), database_url("create_all")
    for url in (by_initdb, by_create_all):
        await recreate_database(url)
    engines = [create_async_engine(url, poolclass=NullPool) for url in (by_initdb, by_create_all)]
    try:
        async with engines[0].begin() as conn:
            for script in sorted(INITDB.glob("*.sql")):
                for statement in script.read_text().split(";\n"):
                    if statement.strip():
                        await conn.exec_driver_sql(statement)
            demo = (await conn.execute(select(User.email, User.name).order_by(User.id))).all()
        async with engines[1].begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        tables = []
        for engine in engines:
            async with engine.connect() as conn:
                ddl = (await conn.execute(text("SHOW CREATE TABLE users"))).one()[1]
                tables.append(re.sub(r" AUTO_INCREMENT=\d+", "", ddl))  # the next id is data, not schema
    finally:
        for engine in engines:
            await engine.dispose()
        for url in (by_initdb, by_create_all):
            await drop_database(url)
    assert tables[1] == tables[0]
    assert main.DEMO_USERS == [tuple(row) for row in demo]


# --- 1 and 2: the database unreachable, then back ------------------------------------------


async def test_database_cut_is_503_within_2s_then_back_within_2s(
    service: Gunicorn, healthy_proxy: DatabaseProxy, ledger: Ledger
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

    await healthy_proxy.restore()
    recovered = await wait_until_answering(service, user_id)
    print(f"back after restore: {recovered:.3f} s")
    assert recovered < DEADLINE
    for name, response, _ in await every_endpoint_once(service, ledger, user_id):
        assert response.status_code < 500, f"{name}: {response.status_code}"
    assert boots == worker_boots(service), "a worker was restarted"


@pytest.mark.parametrize("idle", [0.0, 2.5], ids=["busy-connections", "idle-connections"])
async def test_database_stalled_is_503_within_2s_then_back_within_2s(
    service: Gunicorn, healthy_proxy: DatabaseProxy, ledger: Ledger, idle: float
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

    await healthy_proxy.restore()
    recovered = await wait_until_answering(service, user_id)
    print(f"back after restore: {recovered:.3f} s")
    assert recovered < DEADLINE
    for name, response, _ in await every_endpoint_once(service, ledger, user_id):
        assert response.status_code < 500, f"{name}: {response.status_code}"
    assert boots == worker_boots(service), "a worker was restarted"


# --- 3: connections killed by the server under load ----------------------------------------


@dataclass
class Tally:
    reads: Counter[int] = field(default_factory=Counter)
    writes: Counter[int] = field(default_factory=Counter)
    failed_writes: list[dict[str, Any]] = field(default_factory=list)
    # Requests that got no answer at all: (when they were sent, what the client saw).
    unanswered: list[tuple[float, str]] = field(default_factory=list)


async def run_load(service: Gunicorn, ledger: Ledger, user_ids: list[int], until: asyncio.Event) -> Tally:
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
    service: Gunicorn, healthy_proxy: DatabaseProxy, admin: AsyncEngine, db_url: URL, ledger: Ledger
) -> None:
    """Connections KILLed under load: no read fails; a write fails at most once per kill, and atomically."""
    user_ids = [await some_user(service, ledger) for _ in range(5)]
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(service, ledger, user_ids, stop))
    killed = 0
    for _ in range(3):
        await asyncio.sleep(0.7)
        killed += await kill_service_connections(admin, str(db_url.database))
    await asyncio.sleep(0.7)
    stop.set()
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


# --- 4: connections idle past a proxy's or the server's timeout ----------------------------


async def test_connections_cut_by_an_idle_proxy_are_replaced_unseen(
    service: Gunicorn, healthy_proxy: DatabaseProxy, ledger: Ledger
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
    server = Gunicorn(WAIT_TIMEOUT_PORT, render(url), tmp_path / "wait_timeout.log")
    try:
        server.start()
        await server.wait_ready()
        user_id = await some_user(server, ledger)
        await every_endpoint_once(server, ledger, user_id)
        await asyncio.sleep(4.5)
        for name, response, _ in await every_endpoint_once(server, ledger, user_id):
            assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    finally:
        await server.stop()
    assert "Traceback" not in server.log()


async def test_no_answer_was_a_500_and_no_traceback_was_logged(service: Gunicorn) -> None:
    """Through all of the above the service answered no 500 and logged no stack trace."""
    log = service.log()
    assert " 500 " not in log
    assert "Traceback" not in log


# --- 5: SIGTERM under load -----------------------------------------------------------------


async def test_sigterm_under_load_answers_every_accepted_request_and_closes_the_pool(
    db_url: URL, ledger: Ledger, tmp_path: Path
) -> None:
    """On SIGTERM, requests already accepted get their whole answer, workers exit in time, pools close."""
    server = Gunicorn(SIGTERM_PORT, render(db_url), tmp_path / "sigterm.log")
    server.start()
    try:
        await server.wait_ready()
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
    finally:
        await server.stop()
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


# --- 6: nothing answered 201 was lost ------------------------------------------------------


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
