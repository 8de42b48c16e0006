"""Instructions per request, counted by valgrind's callgrind: a figure that does not move with the machine's load.

    python bench/instructions.py                      # this folder's service and the floor: get, first, create
    python bench/instructions.py --against 8c36b11    # and the service as of that revision (or from a folder)

wrk's CPU per request (bench/run.py) is the measure of record, but on a shared machine it moves
by several percent between rounds; a change worth 2 % needs many rounds to show. This counts
the instructions a worker runs per request instead: each target (the service from a folder or
a git revision, or bench/floor.py) is driven in one process, with no server and no client
socket, through its ASGI interface: its lifespan, a warm-up, then N requests of one scenario,
one after another, against MariaDB or MySQL at BENCH_DATABASE_URL (seeded as bench/run.py
seeds it). The count for 100 requests is taken from the count for 400, and the difference
divided by 300, so that start-up is left out. PYTHONHASHSEED is fixed: two counts of the same
code then agree to within about half a percent. What it leaves out is the HTTP server's share
(uvicorn, httptools), the same for every target. Needs valgrind (Debian: apt-get install valgrind).
"""

import argparse
import asyncio
import importlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEY = "instructions-key"
SCENARIOS = ("get", "first", "create")


async def drive(app: Any, scenario: str, count: int) -> None:
    """Run the app's lifespan, 30 requests to warm up, then `count` requests of the scenario."""
    state: dict[str, Any] = {}
    sent: list[dict[str, Any]] = []

    async def request(i: int) -> None:
        method, path, query, body = "GET", f"/api/v1/users/{1 + i % 1000}", b"", b""
        if scenario == "first":
            path, query = "/api/v1/users", b"limit=20"
        elif scenario == "create":
            email = f"instructions-{os.getpid()}-{i}@example.com"
            method, path, body = "POST", "/api/v1/users", json.dumps({"email": email, "name": "I"}).encode()
        headers = [(b"host", b"bench"), (b"authorization", f"Bearer {KEY}".encode())]
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": dict(state),
        }
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client never goes away
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        sent.clear()
        await app(scope, receive, send)
        if sent[0]["status"] >= 300:
            raise SystemExit(f"{method} {path}: {sent[0]['status']} {sent[-1].get('body', b'')[:300]!r}")

    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await lifespan.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    task = asyncio.create_task(app(scope, lifespan.get, answers.put))
    if (started := await answers.get())["type"] != "lifespan.startup.complete":
        raise SystemExit(f"the lifespan did not start: {started}")
    for i in range(30 + count):
        await request(i)
    await lifespan.put({"type": "lifespan.shutdown"})
    await answers.get()
    await task


def count(source: Path, app: str, scenario: str, requests: int, database_url: str) -> int:
    """The instructions of one driven process, from callgrind's summary."""
    with tempfile.TemporaryDirectory() as work:
        env = {
            **os.environ,
            "PYTHONHASHSEED": "0",
            "ENVIRONMENT": "production",
            "API_KEYS": KEY,
            "RATE_LIMIT": "100000000",
            "DATABASE_URL": database_url,
            # Under valgrind Python runs some fifty times slower: no time limit may cut a request.
            "DB_TIMEOUT": "60",
            "DB_POOL_TIMEOUT": "60",
            "PROMETHEUS_MULTIPROC_DIR": work,
            "RATE_LIMIT_TABLE": str(Path(work) / "ratelimit"),
            "PYTHONPATH": os.pathsep.join((str(source), str(HERE))),
        }
        Path(env["RATE_LIMIT_TABLE"]).touch()
        out = Path(work) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__]
        command += ["--drive", app, scenario, str(requests)]
        run = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{source} {app} {scenario}: exit {run.returncode}\n{run.stderr[-2000:]}")
        summary = next(line for line in out.read_text().splitlines() if line.startswith(("summary:", "totals:")))
        return int(summary.split()[1])


def per_request(source: Path, app: str, scenario: str, database_url: str) -> int:
    return (count(source, app, scenario, 400, database_url) - count(source, app, scenario, 100, database_url)) // 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV_OR_DIR")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--database-url", default=os.environ.get("BENCH_DATABASE_URL", "mysql://root@127.0.0.1:3306/bench")
    )
    parser.add_argument("--drive", nargs=3, metavar=("APP", "SCENARIO", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:  # inside valgrind, in the target's folder
        app, scenario, requests = args.drive
        import uvloop

        uvloop.run(drive(importlib.import_module(app).app, scenario, int(requests)))
        return

    from run import checkout, seed  # bench/run.py's: the same database, and revisions exported alike

    seed(args.database_url, 100_000)
    database_url = args.database_url.replace("mysql://", "mysql+aiomysql://", 1)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    targets = [("ours", ROOT, "main"), ("floor", ROOT, "floor")]
    targets += [(label, checkout(label, stamp), "main") for label in args.against]
    jobs = [(t, s) for t in targets for s in args.scenarios.split(",")]
    # One valgrind per core: counts do not depend on what else runs.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        counts = list(pool.map(lambda job: per_request(job[0][1], job[0][2], job[1], database_url), jobs))
    floor = {s: n for ((label, _, _), s), n in zip(jobs, counts, strict=True) if label == "floor"}
    print("| target | scenario | instructions per request | over the floor |\n|---|---|---:|---:|")
    for ((label, _, _), scenario), n in zip(jobs, counts, strict=True):
        print(f"| {label} | {scenario} | {n:,} | {n / floor[scenario]:.2f} |")


if __name__ == "__main__":
    main()
