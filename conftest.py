"""What the tests share: the databases, the app in process, the servers they start, a TCP proxy.

MariaDB is the database TEST_MYSQL_URL names (for example
mysql+aiomysql://root@127.0.0.1:3306/test_users), and databases the tests create beside it
(test_users_production_<pid>, ...) and drop again; without TEST_MYSQL_URL every test that
needs MariaDB is skipped, and says so. Redis is REDIS_TEST_URL (redis://127.0.0.1:6379/0 by
default), under key prefixes of the tests' own that they delete again; without it the Redis
tests are skipped. Servers run as subprocesses, gunicorn as deployed and uvicorn as in
development, each in a folder of its own, on ports the kernel picks, on uvloop (or on asyncio
with TEST_EVENT_LOOP=asyncio) and with TEST_MYSQL_URL's driver (aiomysql, or asyncmy).
"""

import asyncio
import ipaddress
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import URL, delete, func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.types import Receive, Scope, Send

import main
from models import Base, User
from settings import Settings, settings

HERE = Path(__file__).parent
TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "")
# The event loop of the servers the tests start: EVENT_LOOP's default (uvloop) unless this says asyncio.
TEST_EVENT_LOOP = os.environ.get("TEST_EVENT_LOOP", "")
REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")
# The API keys of the servers the tests start (the ASGI app keeps the test process's own).
KEYS = ("test-key-old", "test-key-new")
USERS = "/api/v1/users"
RFC3339_MICROSECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)")
# What no error answer may contain: a traceback, SQL, or the name of a driver or of its errors.
LEAKS = re.compile(
    r"Traceback|File \"|sqlalchemy|aiomysql|pymysql|aiosqlite|sqlite3|OperationalError|ProgrammingError|"
    r"IntegrityError|Errno|duplicate entry|unique constraint|\bSELECT\b|\bINSERT\b|\bUPDATE\b|\bDELETE FROM\b|"
    r"no such table|\(\d{4}, ",
    re.IGNORECASE,
)

# --- Fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a test database: a new SQLite file, or TEST_MYSQL_URL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
    if not TEST_MYSQL_URL:
        pytest.skip("TEST_MYSQL_URL is not set: the MySQL/MariaDB half of the suite did not run")
    return TEST_MYSQL_URL


async def recreate_tables(url: str) -> None:
    """Drop and create the tables, so each test starts from the schema in models.py."""
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()


@pytest.fixture
async def lifespan_state(database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    """Run the app's own lifespan against the test database; yield its state."""
    await recreate_tables(database_url)
    # The same settings the service read at import, pointed at the test database.
    monkeypatch.setattr(main, "settings", settings.model_copy(update={"database_url": database_url}))
    async with main.app.router.lifespan_context(main.app) as state:
        assert state is not None
        yield dict(state)


def asgi_client(state: dict[str, Any]) -> httpx.AsyncClient:
    """An HTTP client for the app, as a server would run it after the lifespan started."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # What a server does with the lifespan's state: a shallow copy into every request.
        scope["state"] = dict(state)
        await main.app(scope, receive, send)

    # Each client is a new address, so the rate limit one test used up never reaches the next.
    address = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) | secrets.randbits(64))
    keys = settings.api_keys
    headers = {"Authorization": f"Bearer {keys[0].get_secret_value()}"} if keys else {}
    transport = httpx.ASGITransport(app=app, client=(str(address), 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers)


@pytest.fixture
async def client(lifespan_state: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over an empty users table."""
    async with lifespan_state["engine"].connect() as conn:
        await conn.execute(delete(User))  # the demo users the lifespan adds in development
    async with asgi_client(lifespan_state) as client:
        yield client


@pytest.fixture
def engine(lifespan_state: dict[str, Any]) -> AsyncEngine:
    """The app's engine, to set up rows the API cannot create (old timestamps)."""
    engine: AsyncEngine = lifespan_state["engine"]
    return engine


async def create(client: httpx.AsyncClient, email: str = "ada@example.com", **fields: Any) -> dict[str, Any]:
    """Create a user through the API and return it; fail the test unless that is a 201."""
    response = await client.post(USERS, json={"email": email, "name": "Ada Lovelace", **fields})
    assert 201 == response.status_code, response.text
    user: dict[str, Any] = response.json()
    return user


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check that the response is an RFC 9457 problem with this status; return its body."""
    assert status == response.status_code, response.text
    assert "application/problem+json" == response.headers["content-type"]
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert status == body["status"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# --- Servers, a TCP proxy and databases of the tests' own ----------------------------------


def free_port() -> int:
    """A port no one listens on, picked by the kernel, for a server to listen on next."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Read beside settings.py, by gunicorn.conf.py, its workers or uvicorn: a test sets them itself.
SERVER_VARIABLES = {"RATE_LIMIT_TABLE", "WEB_CONCURRENCY", "PORT", "FORWARDED_ALLOW_IPS", "PROMETHEUS_MULTIPROC_DIR"}


def service_env(folder: Path, **overrides: str) -> dict[str, str]:
    """The environment of a service process: these settings, none of the test process's own."""
    own = {name.upper() for name in Settings.model_fields} | SERVER_VARIABLES
    return {
        **{k: v for k, v in os.environ.items() if k not in own},
        "PYTHONPATH": str(HERE),
        "DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'users.db'}",
        "API_KEYS": ",".join(KEYS),
        **({"EVENT_LOOP": TEST_EVENT_LOOP} if TEST_EVENT_LOOP else {}),
        **overrides,
    }


async def migrate(env: dict[str, str], folder: Path) -> None:
    """Run `alembic upgrade head` on the database of this environment, as a deploy does before the app starts."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(HERE / "alembic.ini"), "upgrade", "head",
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert 0 == process.returncode, output.decode()


class Server:
    """gunicorn with gunicorn.conf.py in production, as deployed, or uvicorn in development, as on a laptop.

    A subprocess in a folder of its own (no .env there), on SQLite unless DATABASE_URL says
    otherwise, its output in a file. Every request comes from 127.0.0.1, so the rate limit is
    out of reach unless a test sets RATE_LIMIT.
    """

    def __init__(self, folder: Path, program: str = "gunicorn", workers: int = 2, **env: str) -> None:
        self.port = free_port()
        self.log_path = folder / f"{program}-{self.port}.log"
        if program == "gunicorn":
            # --no-control-socket: gunicorn's control socket in ~/.gunicorn is one for every instance.
            self.command = [
                sys.executable, "-m", "gunicorn", "-c", str(HERE / "gunicorn.conf.py"), "main:app",
                "--no-control-socket",
            ]  # fmt: skip
            env = {"ENVIRONMENT": "production", "WEB_CONCURRENCY": str(workers), "PORT": str(self.port), **env}
        else:
            self.command = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(self.port), "--no-access-log"]
        # A file of its own: two servers in one folder are two containers, each with its own disk.
        database = f"sqlite+aiosqlite:///{folder / f'users-{self.port}.db'}"
        # SHUTDOWN_DELAY 0: a test that stops a server waits for no balancer.
        defaults = {"DATABASE_URL": database, "RATE_LIMIT": "1000000", "SHUTDOWN_DELAY": "0"}
        self.env = service_env(folder, **{**defaults, **env})
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "Server":
        """Bring its database to head, as a deploy does first; start the server and wait until /health answers."""
        await self.migrate()
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def migrate(self) -> None:
        """Run `alembic upgrade head` on the server's database, with its environment: compose's migrate service."""
        await migrate(self.env, self.log_path.parent)

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, cwd=self.log_path.parent, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self) -> None:
        assert self.process is not None
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(150):
                if self.process.returncode is not None:
                    pytest.fail(f"{self.command[2]} exited with {self.process.returncode}:\n{self.log()}")
                with suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        pytest.fail(f"{self.command[2]} did not answer /health within 30 s:\n{self.log()}")

    async def wait_exit(self, within: float) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), within)

    async def exit_code(self, within: float) -> int:
        """Start a server that is expected to refuse to start; return its exit code."""
        await self.start()
        try:
            return await self.wait_exit(within)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM, as an orchestrator stops a container; SIGKILL after 30 s."""
        if self.process is None or self.process.returncode is not None:
            return
        with suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await self.wait_exit(30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def workers(self, count: int) -> list[int]:
        """The process ids of gunicorn's workers, once count of them have started their app."""
        for _ in range(100):
            pids = self.children()
            if len(pids) == count and self.log().count("Application startup complete") >= count:
                return pids
            await asyncio.sleep(0.1)
        pytest.fail(f"gunicorn did not start {count} workers within 10 s:\n{self.log()}")

    def children(self) -> list[int]:
        assert self.process is not None
        pid = self.process.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, key: str | None = KEYS[0], **kwargs: Any) -> httpx.AsyncClient:
        """A client of this server that sends key as its bearer key (none when None)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)


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


class TcpProxy:
    """Forward TCP to a server (MariaDB, Redis); cut (refuse and reset), stall (forward nothing), or restore.

    With idle_cut set, connections idle that many seconds are reset, as a NAT gateway or a
    load balancer does.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.port = 0  # the kernel picks one at start; restore listens on it again
        self.upstream = (upstream_host, upstream_port)
        self.links: set[Link] = set()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.swallow = False
        self.server: asyncio.Server | None = None
        self.idle_cut: float | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "TcpProxy":
        await self.listen()
        self.tasks.add(asyncio.create_task(self.cut_idle_links()))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self.accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for link in list(self.links):
            link.reset()
        self.links.clear()
        self.flowing.set()

    def stall(self, swallow: bool = False) -> None:
        """Keep accepting connections and bytes, and forward nothing, in either direction.

        What waited is delivered once restored, as by a frozen server; with swallow=True what
        is sent meanwhile is lost, as on a dead route.
        """
        self.swallow = swallow
        self.flowing.clear()

    async def restore(self) -> None:
        self.flowing.set()
        if self.server is None:
            await self.listen()

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
            if self.swallow and not self.flowing.is_set():
                continue
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


async def on_mysql_server(*statements: str) -> None:
    """Run statements on the MariaDB server of TEST_MYSQL_URL, in no database."""
    engine = create_async_engine(make_url(TEST_MYSQL_URL).set(database=""), poolclass=NullPool)
    async with engine.connect() as conn:
        for statement in statements:
            await conn.execute(text(statement))
    await engine.dispose()


@asynccontextmanager
async def fresh_database(name: str) -> AsyncIterator[URL]:
    """A new, empty MariaDB database beside TEST_MYSQL_URL's, dropped at the end; skip without TEST_MYSQL_URL."""
    if not TEST_MYSQL_URL:
        pytest.skip("TEST_MYSQL_URL is not set: this MariaDB test did not run")
    base = make_url(TEST_MYSQL_URL)
    # The process id keeps two runs side by side apart.
    url = base.set(database=f"{base.database or 'test'}_{name}_{os.getpid()}")
    await on_mysql_server(
        f"DROP DATABASE IF EXISTS `{url.database}`",
        f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
    )
    try:
        yield url
    finally:
        await on_mysql_server(f"DROP DATABASE IF EXISTS `{url.database}`")


def render(url: URL) -> str:
    """The URL with its password, for a service's DATABASE_URL."""
    return url.render_as_string(hide_password=False)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length: its status, headers and body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def auth_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[0]}"}


# --- Shared by the production, rate-limit and observability tests ------------------------

# The contract: with the database gone, every answer within 2 s.
DEADLINE = 2.0


def new_user() -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    return {"email": f"user-{tag}@example.com", "name": f"User {tag}", "is_active": True}


def assert_503_problem(response: httpx.Response, elapsed: float) -> None:
    """503, problem+json, Retry-After, within the deadline, nothing of the driver's or SQL's text."""
    assert_problem(response, 503)
    assert elapsed < DEADLINE, f"answered after {elapsed:.2f} s"
    assert response.headers["retry-after"].isdigit()
    assert not LEAKS.search(response.text), response.text


async def timed(coroutine: Any) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await coroutine
    return response, time.perf_counter() - start


@pytest.fixture(scope="module")
async def sqlite_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """Gunicorn with gunicorn.conf.py, 2 workers, ENVIRONMENT=production and two API keys, on SQLite.

    Its rate limit is out of reach: the tests that share it are not about the limit.
    """
    async with Server(tmp_path_factory.mktemp("sqlite_service")) as server:
        yield server


# --- Protection: bursts of requests, to measure the rate limit -----------------------------


@dataclass
class Burst:
    """What the answers to a burst of requests were, and how long the slowest took."""

    statuses: Counter[int] = field(default_factory=Counter)
    slowest: float = 0.0

    @property
    def successes(self) -> int:
        return self.statuses[200]


async def burst(urls: list[str], count: int, *, concurrency: int = 8, forwarded_for: bool = False) -> Burst:
    """Send count GETs of a page of users, in turn to each of urls, each on a new connection.

    New connections, so that the kernel hands them to every gunicorn worker in turn, not to
    whichever worker accepted a keep-alive connection first.
    """
    result = Burst()
    queue = iter(range(count))
    headers = {"Authorization": f"Bearer {KEYS[0]}", "Connection": "close"}

    async def client_loop(client: httpx.AsyncClient) -> None:
        for n in queue:
            extra = {"X-Forwarded-For": f"203.0.113.{n % 250}, 198.51.100.{n % 200}"} if forwarded_for else {}
            start = time.perf_counter()
            response = await client.get(f"{urls[n % len(urls)]}{USERS}?limit=1", headers={**headers, **extra})
            result.slowest = max(result.slowest, time.perf_counter() - start)
            result.statuses[response.status_code] += 1

    async with httpx.AsyncClient(timeout=10) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return result


def writes(pid: int) -> int:
    """How many write system calls process pid has made: at least one per response it sent."""
    count = re.search(r"syscw: (\d+)", Path(f"/proc/{pid}/io").read_text())
    assert count is not None
    return int(count[1])


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print to the terminal even while pytest captures output, so CI logs show the figure."""
    with capsys.disabled():
        print(f"\n[protection] {line}")


METRICS_KEY = "test-metrics-key"


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a scrape in Prometheus's text format: name, labels, value."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def requests_counted(text: str, route: str) -> float:
    return sum(
        value for name, labels, value in samples(text) if name == "http_requests_total" and labels["route"] == route
    )


async def scrape(server: Server) -> str:
    async with server.client(METRICS_KEY) as client:
        response = await client.get("/metrics")
    assert 200 == response.status_code, response.text
    return response.text


# --- Production: gunicorn on MariaDB, behind the proxy (test_production.py, test_observability.py) ---


@pytest.fixture(scope="module")
async def db_url() -> AsyncIterator[URL]:
    async with fresh_database("production") as url:
        yield url


@pytest.fixture(scope="module")
async def admin(db_url: URL) -> AsyncIterator[AsyncEngine]:
    """A direct connection to the test database, past the proxy; NullPool, so a KILL sweep skips it."""
    engine = create_async_engine(db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def proxy(db_url: URL) -> AsyncIterator[TcpProxy]:
    async with TcpProxy(db_url.host or "127.0.0.1", db_url.port or 3306) as proxy:
        yield proxy


@pytest.fixture(scope="module")
async def service(db_url: URL, proxy: TcpProxy, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """Gunicorn, 2 workers, reaching the database only through the proxy."""
    url = render(db_url.set(host="127.0.0.1", port=proxy.port))
    async with Server(tmp_path_factory.mktemp("service"), DATABASE_URL=url) as server:
        yield server


@pytest.fixture
async def healthy_proxy(proxy: TcpProxy) -> AsyncIterator[TcpProxy]:
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


async def some_user(service: Server, ledger: Ledger) -> int:
    """Create a user as a client told to retry would: with an Idempotency-Key, again after a 503.

    A pooled connection that an earlier drill killed, used again within IDLE_PING_AFTER, fails
    the one write sent on it (503), as the README says; the retry creates the user once.
    """
    body, key = new_user(), {"Idempotency-Key": str(uuid.uuid4())}
    async with service.client() as client:
        for _ in range(5):
            response = await client.post(USERS, json=body, headers=key)
            if response.status_code != 503:
                break
            await asyncio.sleep(0.1)
    ledger.record(response)
    assert 201 == response.status_code, response.text
    return int(response.json()["id"])


def worker_boots(service: Server) -> int:
    return service.log().count("Booting worker")


async def wait_until_answering(service: Server, user_id: int) -> float:
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


async def count_users(engine: AsyncEngine, email: str) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(select(func.count()).select_from(User).where(User.email_key == email.lower()))
    return int(count or 0)
