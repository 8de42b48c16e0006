"""The replica killed (or paused) under load: wrk on GET by id against the service reading from it.

    python bench/replica_drill.py            # kill the replica at 5 s, start it again at 12 s
    python bench/replica_drill.py --pause    # SIGSTOP it at 5 s, SIGCONT at 12 s

It starts a MariaDB primary and replica (mariadb_pair.py, as bench/run.py --replica does),
seeds them, and starts the service under gunicorn as deployed (2 workers, production settings,
DATABASE_REPLICA_URLS set), then runs wrk (GET by a random id, 64 connections, 20 s, --timeout 2s)
and prints, second by second, where the GETs were read (db_reads_total from /metrics), how many
workers read from the replica, its lag, and each server's Com_select; then wrk's errors and the
slowest answer in the service's own log. Everything it writes goes to bench/results/.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime

from run import API_KEY, METRICS_KEY, RESULTS, Server, replica_pair, seed, wrk_command, wrk_result

WHERE = ("replica", "primary", "primary_token", "primary_fallback")


def scrape(server: Server) -> dict[str, float]:
    """Reads by where served, workers reading from the replica, its lag: from the service's /metrics."""
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()

    def values(name: str) -> list[float]:
        return [float(n) for n in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)]

    found = dict(zip(WHERE, [0.0] * 4, strict=True))
    found |= {w: float(n) for w, n in re.findall(r'^db_reads_total\{served_by="(\w+)"\} (\S+)$', text, re.MULTILINE)}
    found["in_rotation"] = sum(values("db_replica_in_rotation"))
    found["lag"] = max(values("db_replica_lag_seconds"), default=0.0)
    return found


def com_select(server) -> int | None:
    """The server's SELECTs so far; None when it does not answer (killed)."""
    if not server.accepts_connections():
        return None
    return int(server.query("SHOW GLOBAL STATUS LIKE 'Com_select'")[0]["Value"])


def drill(pair, server: Server, users: int, pause: bool) -> None:
    """wrk for 20 s; the replica out at 5 s and back at 12 s; a line of figures each second."""
    scenario = {"conns": 64, "kind": "get", "arg": str(users)}
    first = last = scrape(server)
    counts = [com_select(pair.primary), com_select(pair.replica)]
    wrk = subprocess.Popen(wrk_command(server, scenario, 20, "drill"), stdout=subprocess.PIPE, text=True)
    started, paused = time.monotonic(), False
    print(f"replica {'paused' if pause else 'killed'} at 5 s, back at 12 s; each line is the second before it")
    print("  t  replica  primary  primary_token  primary_fallback  workers on it  lag s  Com_select primary/replica")
    for second in range(1, 21):
        time.sleep(max(0.0, started + second - time.monotonic()))
        if second == 5:
            pair.pause_replica() if pause else pair.kill_replica()
            paused = pause
        elif second == 12:
            pair.resume_replica() if pause else pair.restart_replica()
            paused = False
        now = scrape(server)
        moved = []
        for i, server_ in enumerate((pair.primary, None if paused else pair.replica)):
            count = com_select(server_) if server_ is not None else None
            # A restarted server counts from 0 again.
            since = None if count is None or counts[i] is None else count - counts[i] if count >= counts[i] else count
            moved.append("-" if since is None else str(since))
            counts[i] = count if count is not None else counts[i]
        reads = "  ".join(f"{now[w] - last[w]:{len(w) if len(w) > 7 else 7}.0f}" for w in WHERE)
        print(f"{second:3d}  {reads}  {now['in_rotation']:13.0f}  {now['lag']:5.2f}  {'/'.join(moved)}", flush=True)
        last = now
    result = wrk_result(wrk)
    entries = [json.loads(line) for line in server.log_path.read_text(errors="replace").splitlines() if line[:1] == "{"]
    durations = [e["duration_ms"] for e in entries if e.get("path", "").startswith("/api/v1/users/")]
    errors = f"connect {result['connect']}, read {result['read']}, write {result['write']}"
    print(
        f"\nwrk: {result['requests']} requests in 20 s, non-2xx {result['status']}, socket errors "
        f"{result['socket_errors']} ({errors}), timeouts {result['timeout']}, p99 {result['p99_us'] / 1000:.1f} ms"
    )
    print(f"the service's log: {len(durations)} GETs, 5xx {server.count_5xx(0)}, slowest {max(durations):.1f} ms")
    print(f"reads by where served, over the run: { {w: last[w] - first[w] for w in WHERE} }")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause", action="store_true", help="SIGSTOP the replica instead of killing it")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--port", type=int, default=18450)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with replica_pair() as pair:
        seed(pair.primary.url("bench", driver="pymysql"), args.users)
        pair.wait_replica_caught_up(within=300)
        env = {
            **os.environ,
            "ENVIRONMENT": "production",
            "DATABASE_URL": pair.primary.url("bench"),
            "DATABASE_REPLICA_URLS": pair.replica.url("bench"),
            "API_KEYS": API_KEY,
            "METRICS_KEYS": METRICS_KEY,
            "RATE_LIMIT": "100000000",
            "WEB_CONCURRENCY": "2",
            "MAX_REQUESTS": "0",
        }
        server = Server("ours+replica", "main:app", args.port, 2, env, RESULTS / f"replica-drill-{stamp}.log")
        try:
            server.wait_ready()
            drill(pair, server, args.users, args.pause)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
