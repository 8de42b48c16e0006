"""Benchmark the service against three reference apps, as ratios measured in the same run.

    python bench/run.py            # 3 rounds x 5 scenarios x 4 targets x 8 s, about 12 minutes
    python bench/run.py --quick    # 1 round x 3 s and no memory check: a smoke test

It seeds MariaDB/MySQL with 100,000 users, starts the service under gunicorn as deployed
(gunicorn.conf.py, production settings, API keys, rate limiting, request log) and, under the
same gunicorn settings, the reference apps (REFERENCES: bench/baseline.py, floor.py, peer.py;
--targets picks which), checks that every reference answers as the service does, then runs wrk
against each, alternating the order each round. Absolute figures depend on the machine and on
whatever else runs on it; the ratios to the references are the result, the worker CPU per
request over the floor's first. Needs `wrk` on PATH (Debian/Ubuntu: apt-get install wrk) and a
MySQL-compatible server (BENCH_DATABASE_URL or --database-url; the database is created if missing).
Everything it writes goes to bench/results/. With --replica it starts a MariaDB primary and
replica of its own (mariadb_pair.py) instead, and runs the service twice on them: against the
primary alone, and with the replica (DATABASE_REPLICA_URLS), which its GETs are then read from.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import urlsafe_b64encode
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
API_KEY = "bench-" + secrets.token_hex(8)
METRICS_KEY = "bench-metrics-" + secrets.token_hex(8)

# The reference apps, each a module in bench/ serving `app`, in the order of their ports and columns.
REFERENCES = {
    "floor": "Starlette over SQLAlchemy's asyncio Core: the service's engine settings and statements, nothing else",
    "baseline": "Starlette over a bare aiomysql pool, hand-written SQL",
    "peer": "FastAPI's SQL tutorial with SQLAlchemy's asyncio ORM: a session per request, pydantic models",
}
# The goal: the service's worker CPU per request at most this many times the floor's.
FLOOR_GOAL = 1.5

SEEDED_PAGE = "/api/v1/users?limit=20"
# wrk starts over while one worker holds more than this share of its connections (see start_wrk()).
EVEN = 0.625
TRIES = 20


def cursor_after(last_id: int) -> str:
    return urlsafe_b64encode(last_id.to_bytes(8, "big", signed=True)).decode().rstrip("=")


def scenarios(users: int) -> list[dict]:
    """(key, label, connections, lua scenario, its argument)."""
    return [
        {"key": "get", "label": "get by id", "conns": 32, "kind": "get", "arg": str(users)},
        {"key": "first", "label": "first page", "conns": 32, "kind": "path", "arg": SEEDED_PAGE},
        {
            "key": "deep",
            "label": "deep page",
            "conns": 32,
            "kind": "path",
            "arg": f"{SEEDED_PAGE}&cursor={cursor_after(users - 30)}",
        },
        {"key": "create", "label": "create", "conns": 32, "kind": "create", "arg": "0"},
        # Not in the default run: what an Idempotency-Key costs a create (--scenarios ...,create_key).
        {"key": "create_key", "label": "create with Idempotency-Key", "conns": 32, "kind": "create", "arg": "1"},
        {"key": "overload", "label": "get by id, 256 conns", "conns": 256, "kind": "get", "arg": str(users)},
    ]


# --- Database ------------------------------------------------------------------------------


def server_of(url: str) -> dict[str, Any]:
    """pymysql's arguments for the server of a mysql:// URL, without its database."""
    parts = urlsplit(url)
    return dict(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username,
        password=parts.password or "",
        charset="utf8mb4",
        autocommit=True,
    )


def seed(url: str, users: int) -> None:
    """Create the database and tables if missing; leave exactly users 1..N, drop earlier runs' creations."""
    import pymysql

    parts = urlsplit(url)
    db = parts.path.lstrip("/")
    connect = server_of(url)
    with pymysql.connect(**connect) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    # The tables as a deploy makes them: gunicorn refuses to start on a database behind the code.
    env = {**os.environ, "DATABASE_URL": f"mysql+aiomysql://{parts.netloc}/{db}"}
    alembic = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"]
    subprocess.run(alembic, cwd=ROOT, env=env, check=True, capture_output=True)
    with pymysql.connect(database=db, **connect) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM users WHERE id > %s", (users,))
        cur.execute("TRUNCATE TABLE idempotency_keys")
        cur.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM users")
        count, top = cur.fetchone()
        if (count, top) != (users, users):
            print(f"seeding {users} users ...", flush=True)
            cur.execute("TRUNCATE TABLE users")
            # MariaDB's sequence engine makes the rows server-side in a second or two.
            for start in range(1, users + 1, 20000):
                end = min(start + 19999, users)
                cur.execute(
                    "INSERT INTO users (id, email, email_key, name, is_active, created_at, updated_at, version)"
                    " SELECT seq, CONCAT('user', seq, '@example.com'), CONCAT('user', seq, '@example.com'),"
                    " CONCAT('User ', seq), 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1"
                    f" FROM seq_{start}_to_{end}"
                )
        cur.execute(f"ALTER TABLE users AUTO_INCREMENT = {users + 1}")
        cur.execute("ANALYZE TABLE users")
        cur.fetchall()


def check_connection_budget(url: str | None, workers: int, env: dict[str, str]) -> None:
    """Stop before measuring if every target's pools together would not fit the server's max_connections.

    Each target's workers hold their pools open between rounds; past the limit the server refuses
    connections (1040), and the run would measure 503s. The pair (--replica) is raised already.
    """
    if url is None:
        return
    import pymysql

    needed = workers * (int(env["DB_POOL_SIZE"]) + int(env["DB_MAX_OVERFLOW"]) + 1) + 10  # + 10: the seeding, a client
    with pymysql.connect(**server_of(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@max_connections")
        (limit,) = cur.fetchone()
    if needed > limit:
        raise SystemExit(
            f"the servers' pools need up to {needed} connections and max_connections is {limit}: "
            f"SET GLOBAL max_connections = {needed} (as root), or run fewer targets (--targets, --against)"
        )


# --- Servers -------------------------------------------------------------------------------


class Server:
    """One gunicorn master with its workers, started the way the service is deployed."""

    def __init__(
        self, name: str, app: str, port: int, workers: int, env: dict[str, str], log: Path, source: Path = ROOT
    ) -> None:
        self.name, self.port, self.log_path = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        config = source / "gunicorn.conf.py"
        command = [str(BIN / "gunicorn")]
        # The same configuration file for the service and the references: same worker class,
        # workers, keep-alive and timeouts. Command-line flags override the file.
        command += ["-c", str(config)] if config.exists() else ["-k", "uvicorn_worker.UvicornWorker"]
        command += ["-w", str(workers), "--bind", f"127.0.0.1:{port}", "--no-control-socket", app]
        self.command, self.env = command, env
        self.log = open(log, "ab")  # noqa: SIM115 (open while the server runs; closed in stop())
        self.process = subprocess.Popen(command, cwd=source, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.workers = workers

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200 and len(self.worker_pids()) == self.workers:
                        time.sleep(1.0)  # let the last worker finish its lifespan
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name} did not become ready; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        pid = self.process.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except FileNotFoundError:
            return []

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) each worker has used so far."""
        cpu = {}
        for pid in self.worker_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        return cpu

    def connections(self) -> dict[int, int]:
        """Client connections each worker has accepted (established TCP sockets on the server's port)."""
        established = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()  # local address, remote address, state, ..., inode
            if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == self.port:
                established.add(f"socket:[{fields[9]}]")
        held = {}
        for pid in self.worker_pids():
            links = []
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):  # closed while we look
                    links.append(os.readlink(fd))
            held[pid] = sum(link in established for link in links)
        return held

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once the workers hold no client connection and have used no CPU for 0.1 s."""
        deadline = time.monotonic() + timeout
        cpu = sum(self.cpu_seconds().values())
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cpu, before = sum(self.cpu_seconds().values()), cpu
            if cpu == before and not any(self.connections().values()):
                return

    def rss_mib(self) -> dict[int, float]:
        result = {}
        for pid in self.worker_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            result[pid] = round(kib / 1024, 1)
        return result

    def log_size(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size

    def count_5xx(self, since: int) -> int:
        """5xx answers in the service's request log written after byte offset since."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return len(re.findall(r'"message": "[A-Z]+ \S+ 5\d\d ', text))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def answer(server: Server, path: str) -> tuple[int, str | None, object]:
    """Status, ETag and JSON body of a GET to server, with our API key."""
    request = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("ETag"), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("ETag"), error.read().decode(errors="replace")


def check_answers(references: list[Server], service: Server) -> None:
    """Stop the run unless every reference answers a user and a page exactly as the service does.

    A reference that answered less (a field left out, a 404) would be measured doing less work.
    """
    for path in ("/api/v1/users/1", SEEDED_PAGE):
        expected = answer(service, path)
        for server in references:
            if server is not service and (got := answer(server, path)) != expected:
                raise SystemExit(
                    f"{server.name} answers GET {path} with\n  {got}\nwhere {service.name} answers\n  {expected}"
                )
    print(
        f"{', '.join(s.name for s in references)}: GET /api/v1/users/1 and {SEEDED_PAGE} answered as by {service.name}"
    )


def checkout(label: str, stamp: str) -> Path:
    """A folder with the service's files: the folder itself, or the git revision exported into bench/results/."""
    if Path(label).is_dir():
        return Path(label).resolve()
    target = RESULTS / f"rev-{label}-{stamp}"
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", label], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def wrk_command(server: Server, scenario: dict, seconds: float, prefix: str) -> list[str]:
    """wrk running one scenario (bench/scenario.lua) against server with our API key."""
    return [
        "wrk",
        "-t2",
        f"-c{scenario['conns']}",
        f"-d{seconds:g}s",
        "--timeout",
        "2s",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "-s",
        str(HERE / "scenario.lua"),
        server.url,
        "--",
        scenario["kind"],
        scenario["arg"],
        prefix,
    ]


def start_wrk(
    server: Server, scenario: dict, seconds: float, prefix: str
) -> tuple[subprocess.Popen, dict[int, float], int, dict]:
    """wrk under way with its connections shared evenly by the workers; the workers' CPU time
    and the request log's size just before it started; how the connections were shared, after
    how many restarts.

    wrk opens all its connections at once and keeps them. On gunicorn's shared listening
    socket the worker that wakes first accepts every connection waiting (asyncio accepts up to
    the backlog per wake-up), so now and then one worker gets them all and serves alone on one
    core: a measurement of the kernel's timing, not of the server. So wrk starts over, up to
    TRIES times, until no worker holds more than EVEN of the connections; the same for every
    server. Each try has its own prefix: a create must not reuse the emails of a stopped try.
    Each try first waits until the workers are idle: a stopped try leaves requests that the
    workers finish after wrk has gone, whose CPU time and any 5xx would count in the next try,
    and the worker still busy with them sees the next connections first. Measured against one
    idle service, 47 of 80 tries were even with a wait for the connections to close (at most 4
    uneven in a row), 36 of 80 without it (7 in a row).
    """
    for restarts in range(TRIES):
        server.wait_idle()
        cpu, offset = server.cpu_seconds(), server.log_size()
        command = wrk_command(server, scenario, seconds, f"{prefix}-{restarts}")
        wrk = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 3
        while sum((held := server.connections()).values()) < scenario["conns"] and time.monotonic() < deadline:
            time.sleep(0.02)
        even = max(held.values()) <= EVEN * scenario["conns"]
        if even or server.workers == 1 or restarts == TRIES - 1:
            return wrk, cpu, offset, {"restarts": restarts, "even": even, "held": sorted(held.values())}
        wrk.kill()
        wrk.wait()
    raise AssertionError("unreachable")


def wrk_result(wrk: subprocess.Popen) -> dict:
    output = wrk.communicate()[0]
    if wrk.returncode:
        raise subprocess.CalledProcessError(wrk.returncode, wrk.args, output)
    line = next(line for line in output.splitlines() if line.startswith("WRK_JSON "))
    result = json.loads(line.removeprefix("WRK_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["socket_errors"] = result["connect"] + result["read"] + result["write"]
    return result


# --- The run -------------------------------------------------------------------------------


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024**2
    return f"{os.cpu_count()} cores ({cpu}), {memory} GiB, {platform.system()} {platform.release()}"


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "main.py", "models.py") else ""
    return git("rev-parse", "--short", "HEAD") + dirty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s, no memory check: a smoke test")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/bench")
    )
    parser.add_argument(
        "--drivers",
        default="aiomysql",
        help="comma-separated SQLAlchemy MySQL asyncio drivers for the service "
        "(aiomysql, asyncmy); each is one target, all against the same references (on aiomysql)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(REFERENCES),
        help=f"comma-separated reference apps to run beside the service, of {', '.join(REFERENCES)}",
    )
    parser.add_argument("--port", type=int, default=18400, help="first of the ports the servers use")
    parser.add_argument("--scenarios", default="get,first,deep,create,overload")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory check")
    parser.add_argument("--skip-current", action="store_true", help="with --against: only those, not this folder")
    parser.add_argument(
        "--replica",
        action="store_true",
        help="start a MariaDB primary and replica (mariadb_pair.py) instead of using --database-url, and run "
        "this folder's service twice: on the primary alone, and reading from the replica too",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="REV_OR_DIR",
        help="also run the service as of this git revision, or from this folder, as a further "
        "target: before/after figures from one run",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="afterwards, record the first service worker with py-spy for this long "
        "under the get-by-id load, and summarise where the time goes",
    )
    args = parser.parse_args()
    references = [name for name in REFERENCES if name in args.targets.split(",")]
    if unknown := set(args.targets.split(",")) - set(REFERENCES) - {""}:
        parser.error(f"--targets: no reference app named {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds, args.duration, args.no_memory = 1, 3, True

    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = secrets.token_hex(3)
    with contextlib.ExitStack() as stack:
        pair = stack.enter_context(replica_pair()) if args.replica else None
        if pair is not None:
            args.database_url = pair.primary.url("bench", driver="pymysql")
        seed(args.database_url, args.users)
        if pair is not None:
            pair.wait_replica_caught_up(within=300)
        run(args, stamp, run_id, references, pair)


@contextlib.contextmanager
def replica_pair():
    """A MariaDB primary and its replica (mariadb_pair.py), sized for the seeded users and every server's pools."""
    sys.path.insert(0, str(ROOT))
    from mariadb_pair import MariaDBPair

    print("starting a MariaDB primary and replica ...", flush=True)
    with MariaDBPair(database="bench") as pair:
        for server in (pair.primary, pair.replica):
            # The pair starts small, for tests; the seeded users and their index stay in memory here as
            # on the machine's own server, and every target's pools fit.
            server.query("SET GLOBAL innodb_buffer_pool_size = 268435456")
            server.query("SET GLOBAL max_connections = 1000")
        yield pair


def run(args, stamp: str, run_id: str, references: list[str], pair) -> None:
    base_url = urlsplit(args.database_url)._replace(scheme="mysql").geturl()

    common = {
        **os.environ,
        "DB_POOL_SIZE": os.environ.get("DB_POOL_SIZE", "10"),
        "DB_MAX_OVERFLOW": os.environ.get("DB_MAX_OVERFLOW", "5"),
        "WEB_CONCURRENCY": str(args.workers),
        # Worker recycling off: at these rates max_requests would restart a worker every few
        # seconds, measuring start-up instead of serving, and hide the memory growth measured here.
        "MAX_REQUESTS": "0",
    }
    sources = {"": ROOT} if not args.skip_current else {}
    sources.update({label: checkout(label, stamp) for label in args.against})
    servers: list[Server] = []
    try:
        variants = [
            (label, source, driver, replica)
            for label, source in sources.items()
            for driver in args.drivers.split(",")
            # The replica for this folder's service only: an older revision may not know the setting.
            for replica in ([False, True] if pair is not None and not label else [False])
        ]
        for i, (label, source, driver, replica) in enumerate(variants):
            env = {
                **common,
                "ENVIRONMENT": "production",
                "DATABASE_URL": base_url.replace("mysql://", f"mysql+{driver}://", 1),
                "API_KEYS": API_KEY,
                # Switched on, as deployed, but high enough never to answer 429 here.
                "RATE_LIMIT": "100000000",
                "LOG_LEVEL": "INFO",
            }
            if replica:
                env["DATABASE_REPLICA_URLS"] = pair.replica.url("bench", driver=driver)
                env["METRICS_KEYS"] = METRICS_KEY  # for reads_served() at the end
            # The request log goes to stderr, as in a container; here it is redirected to a file.
            tag = f"{'@' + Path(label).name if label else ''}{'+replica' if replica else ''}"
            name = f"ours{tag}[{driver}]"
            log = RESULTS / f"server{tag.replace('@', '-').replace('+', '-')}-{driver}-{stamp}.log"
            port = args.port + len(REFERENCES) + i
            servers.append(Server(name, "main:app", port, args.workers, env, log, source))
        # gunicorn.conf.py reads settings.py, and checks the database with DATABASE_URL, for the references too.
        # PYTHONPATH: the apps from bench/, and models.py (the floor's and the peer's tables) from the root.
        reference_env = {
            **common,
            "DATABASE_URL": base_url.replace("mysql://", "mysql+aiomysql://", 1),
            "PYTHONPATH": os.pathsep.join((str(HERE), str(ROOT))),
        }
        for name in references:
            port = args.port + list(REFERENCES).index(name)
            log = RESULTS / f"{name}-{stamp}.log"
            servers.append(Server(name, f"{name}:app", port, args.workers, reference_env, log))
        check_connection_budget(base_url if pair is None else None, len(servers) * args.workers, common)
        for server in servers:
            server.wait_ready()
        ours = [s for s in servers if s.name not in REFERENCES]
        check_answers([s for s in servers if s.name in REFERENCES], ours[0] if ours else servers[0])

        plan = [s for s in scenarios(args.users) if s["key"] in args.scenarios.split(",")]
        served = {s.name: 0 for s in ours}
        memory: dict[str, dict] = {s.name: {} for s in ours}

        def measure(server: Server, scenario: dict, seconds: float, prefix: str) -> dict:
            wrk, cpu, offset, split = start_wrk(server, scenario, seconds, prefix)
            result = {**wrk_result(wrk), **split}
            # Worker CPU per request does not depend on what else runs on the machine, as
            # requests per second do: the steadier figure for comparing two versions.
            used = [seconds - cpu.get(pid, 0) for pid, seconds in server.cpu_seconds().items()]
            result["cpu_us"] = sum(used) / max(result["requests"], 1) * 1e6
            result["busiest_worker"] = max(used) / max(sum(used), 1e-9)
            if server in ours:
                result["5xx"] = server.count_5xx(offset)
                served[server.name] += result["requests"]
            return result

        # Every scenario once, briefly: connections opened, caches filled, and the memory of
        # 128 requests at once per worker (the overload scenario) taken, a high-water mark the
        # workers keep. The memory check compares against this point (10,000 to 20,000 requests).
        print(f"warming up {', '.join(s.name for s in servers)} ...", flush=True)
        for server in servers:
            for scenario in plan:
                measure(server, scenario, 2, f"{run_id}-warm")
            if server in ours:
                memory[server.name]["early"] = {"requests": served[server.name], "rss": server.rss_mib()}

        runs: list[dict] = []
        for round_ in range(args.rounds):
            # Every other round runs the servers and the scenarios in reverse order, so that none
            # always goes first or always follows the same one (the deep page always after the
            # first page, and after the last round's creates, came out 0.79 to 0.89 of it in two
            # runs, where alternating the two by hand gave the same CPU per request).
            forward = round_ % 2 == 0
            for scenario in plan if forward else plan[::-1]:
                for server in servers if forward else servers[::-1]:
                    # The scenario too: create and create_key must not reuse each other's emails.
                    prefix = re.sub(r"[^A-Za-z0-9]+", "-", f"{run_id}-{server.name}-{scenario['key']}-{round_}")
                    result = measure(server, scenario, args.duration, prefix)
                    runs.append({"round": round_, "scenario": scenario["key"], "target": server.name, **result})
                    print(
                        f"round {round_ + 1}/{args.rounds} {scenario['label']:<22} {server.name:<16} "
                        f"{result['rps']:8.0f} req/s  p99 {result['p99_us'] / 1000:7.1f} ms  "
                        f"non-2xx {result['status']}  socket errors {result['socket_errors']}  "
                        f"timeouts {result['timeout']}  CPU {result['cpu_us']:.0f} µs/req, "
                        f"{result['busiest_worker']:.0%} of it in the busiest worker; connections per worker "
                        f"{'/'.join(map(str, result['held']))} after {result['restarts']} restarts",
                        flush=True,
                    )
                    time.sleep(0.5)

        get = next(s for s in scenarios(args.users) if s["key"] == "get")
        for server in ours if args.rounds and not args.no_memory else ():
            while served[server.name] < 100_000:
                measure(server, get, 10, f"{run_id}-mem")
            memory[server.name]["late"] = {"requests": served[server.name], "rss": server.rss_mib()}

        profile = None
        if args.profile:
            profile = record_profile(ours[0], get, args.profile, stamp)

        report = render(args, stamp, plan, servers, runs, memory, profile)
        if pair is not None:
            report += "\n\n" + "\n".join(reads_served(s) for s in servers if "METRICS_KEYS" in s.env)
        print()
        print(report)
        (RESULTS / f"run-{stamp}.md").write_text(report)
        (RESULTS / f"run-{stamp}.json").write_text(
            json.dumps(
                {"args": vars(args), "runs": runs, "memory": memory, "commands": {s.name: s.command for s in servers}},
                indent=1,
            )
        )
        print(f"\nwritten: bench/results/run-{stamp}.md and .json")
    finally:
        for server in servers:
            server.stop()


def record_profile(server: Server, scenario: dict, seconds: float, stamp: str) -> str:
    """Sample one worker with py-spy under load; return the summary."""
    out = RESULTS / f"profile-{stamp}.txt"
    load, *_ = start_wrk(server, scenario, seconds + 4, "profile")
    try:
        time.sleep(2)
        pid = server.worker_pids()[0]
        subprocess.run(
            [
                str(BIN / "py-spy"),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                # Only while the worker holds the GIL, that is runs Python: a sample taken while
                # it waits in send() measures the scheduler (the database or wrk woken on the same
                # 2 cores), not our code.
                "--gil",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    finally:
        load.communicate()
    summary = subprocess.run(
        [sys.executable, str(HERE / "profile_summary.py"), str(out)], capture_output=True, text=True, check=True
    ).stdout
    return f"py-spy, {seconds:.0f} s of one worker under `get by id`, 32 connections ({out.name}):\n\n{summary}"


def reads_served(server: Server) -> str:
    """Where the server's GETs were read over the whole run, from its /metrics (db_reads_total)."""
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    served = re.findall(r'^db_reads_total\{served_by="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return f"{server.name}, GET reads over the whole run by where served: " + ", ".join(
        f"{where} {float(count):,.0f}" for where, count in served
    )


def render(args, stamp, plan, servers, runs, memory, profile) -> str:
    def pick(target: str, key: str) -> list[dict]:
        return [r for r in runs if r["target"] == target and r["scenario"] == key]

    def ratios(target: str, key: str, field: str, other: str = "baseline", other_key: str | None = None) -> list[float]:
        return [
            a[field] / b[field]
            for a, b in zip(pick(target, key), pick(other, other_key or key), strict=True)
            if b[field]
        ]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    names = [s.name for s in servers]
    ours = [name for name in names if name not in REFERENCES]
    present = [name for name in REFERENCES if name in names]
    # Every ratio is ours / theirs: CPU per request above 1 costs more, req/s below 1 serves fewer.
    headers = [f"**CPU/req / {name}**" if name == "floor" else f"CPU/req / {name}" for name in present]
    headers += [f"req/s / {name}" for name in present]
    lines = [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"command: python bench/run.py {' '.join(sys.argv[1:])}".rstrip(),
        f"service revision: {git_revision()}; {args.rounds} rounds x {args.duration:g} s per target and "
        f"scenario, targets alternated; {args.workers} gunicorn workers each; wrk -t2, --timeout 2s",
        *(f"{name}: bench/{name}.py, {REFERENCES[name]}" for name in present),
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | non-2xx | 5xx | socket errors | timeouts "
        f"| worker CPU µs/req | {' | '.join(headers)} |",
        f"|---|---|{'---:|' * (8 + len(headers))}",
    ]
    for scenario in plan:
        for server in servers:
            rs = pick(server.name, scenario["key"])
            if not rs:
                continue
            fivexx = "" if server.name in REFERENCES else str(sum(r["5xx"] for r in rs))
            cells = []
            for field in ("cpu_us", "rps"):
                for other in present:
                    value = median(ratios(server.name, scenario["key"], field, other)) if other != server.name else None
                    cell = "" if value is None else f"{value:.2f}"
                    cells.append(f"**{cell}**" if cell and field == "cpu_us" and other == "floor" else cell)
            lines.append(
                f"| {scenario['label']} ({scenario['conns']}) | {server.name} | {median([r['rps'] for r in rs]):.0f} "
                f"| {median([r['p50_us'] for r in rs]) / 1000:.1f} | {median([r['p99_us'] for r in rs]) / 1000:.1f} "
                f"| {sum(r['status'] for r in rs)} | {fivexx} "
                f"| {sum(r['socket_errors'] for r in rs)} | {sum(r['timeout'] for r in rs)} "
                f"| {median([r['cpu_us'] for r in rs]):.0f} | {' | '.join(cells)} |"
            )
    lines += [
        "",
        "Figures are medians over the rounds; errors are totals; ratios are the row's target over the column's, "
        "the median of the per-round ratios. "
        "Worker CPU per request (user + system time of the gunicorn workers / requests) hardly depends on the "
        "load others put on the machine; req/s does. "
        f"wrk was started over {sum(r['restarts'] for r in runs)} times in all, in "
        f"{sum(r['restarts'] > 0 for r in runs)} of the {len(runs)} measurements, because one worker had accepted "
        f"more than {EVEN:.1%} of its connections; {sum(not r['even'] for r in runs)} measurements stayed that "
        f"uneven after {TRIES} tries and are counted as they are.",
        "",
        "| target | check | measured | goal | |",
        "|---|---|---:|---|---|",
    ]
    keys = {s["key"] for s in plan}
    for name in ours:
        checks = []
        if "floor" in present:
            for key in ("get", "first", "create"):
                if key in keys:
                    value = median(ratios(name, key, "cpu_us", "floor"))
                    # Three digits: 1.504 shown as "1.50" would read as a pass.
                    goal = f"<= {FLOOR_GOAL:.2f}"
                    checks.append((f"{key} CPU/req / floor", f"{value:.3f}", goal, value <= FLOOR_GOAL))
        if "baseline" in present:
            for key, goal in (("get", 0.40), ("first", 0.50), ("create", 0.40)):
                if key in keys:
                    value = median(ratios(name, key, "rps"))
                    checks.append((f"{key} req/s / baseline", f"{value:.3f}", f">= {goal:.2f}", value >= goal))
        if {"deep", "first"} <= keys:
            value = median(ratios(name, "deep", "rps", other=name, other_key="first"))
            checks.append(("deep page req/s / own first page", f"{value:.2f}", ">= 0.90", value >= 0.90))
            # The same, by worker CPU per request: what a deep page costs the service itself.
            value = median(ratios(name, "first", "cpu_us", other=name, other_key="deep"))
            label = "deep page: own first page CPU/req / deep CPU/req"
            checks.append((label, f"{value:.2f}", ">= 0.90", value >= 0.90))
        if "overload" in keys:
            rs = pick(name, "overload")
            # non-2xx counts the 5xx too.
            bad = sum(r["status"] + r["socket_errors"] + r["timeout"] for r in rs)
            checks.append(("overload errors: non-2xx + socket errors + timeouts", str(bad), "0", bad == 0))
            if "baseline" in present:
                value = median(ratios(name, "overload", "p99_us"))
                checks.append(("overload p99 / baseline p99", f"{value:.2f}", "<= 3", value <= 3))
        mem = memory.get(name, {})
        if "early" in mem and "late" in mem:
            early, late = mem["early"], mem["late"]
            # A worker that was replaced in between (max_requests, a crash) has no comparable figure.
            same = early["rss"].keys() == late["rss"].keys()
            growth = max(late["rss"][pid] / rss for pid, rss in early["rss"].items()) if same else float("inf")
            checks.append(
                (
                    f"RSS per worker after {late['requests']:,} requests / after {early['requests']:,}",
                    f"{growth:.2f} ({', '.join(f'{v:.0f}' for v in early['rss'].values())} -> "
                    f"{', '.join(f'{v:.0f}' for v in late['rss'].values())} MiB)",
                    "<= 1.10, same workers",
                    growth <= 1.10,
                )
            )
        for label, measured, goal, ok in checks:
            lines.append(f"| {name} | {label} | {measured} | {goal} | {'pass' if ok else '**FAIL**'} |")
    if profile:
        lines += ["", profile]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
