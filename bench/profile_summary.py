"""Summarise a py-spy profile (`--format raw`) of one worker: where the time per request goes.

    python bench/profile_summary.py bench/results/profile-<stamp>.txt

Each sample is charged to the innermost frame that belongs to a known part of the stack
(frames of asyncio, contextlib and other plumbing are looked through), so the shares add
up to 100 % of the samples in which the worker was running Python (run.py records with
--gil: time in system calls, such as the socket writes, is left out).
"""

import re
import sys
from collections import Counter

# (label, pattern on "function (file:line)"); the first that matches a frame names it.
PARTS = [
    # The json module serves only the log formatter: responses are serialized by pydantic-core.
    ("logging (stdlib logging, the access line, JSON formatter)", r"\(logging/|\(logs\.py|\(json/"),
    ("request ids for X-Request-ID", r"\(secrets\.py"),
    ("driver: aiomysql/asyncmy/pymysql, socket I/O to the database", r"\((aiomysql|asyncmy|pymysql)/"),
    ("SQLAlchemy pool: checkout, checkin, events", r"\(sqlalchemy/(pool|event)/|on_checkout|on_checkin"),
    ("SQLAlchemy: building statements, cache keys, compiling", r"\(sqlalchemy/sql/"),
    ("SQLAlchemy: results (rows, metadata)", r"\(sqlalchemy/engine/(cursor|result|row)\.py"),
    (
        "SQLAlchemy: execution, connection, asyncio adaption",
        r"\(sqlalchemy/(engine|ext/asyncio|connectors|dialects|util)/|greenlet|awaitlet",
    ),
    ("response validation and serialization (pydantic)", r"serialize_response|\(pydantic|_prepare_response_content"),
    (
        "request parsing, dependencies, parameter validation",
        r"solve_dependencies|request_params_to_args|"
        r"\(fastapi/dependencies/|get_body",
    ),
    ("our middleware (access log, API key, rate limit, size limits)", r"Middleware.*\((main|problems)\.py|send_with_"),
    ("our rate limit's table and metrics", r"\((ratelimit|observability)\.py|\(prometheus_client/"),
    ("our route code and the machinery it calls", r"\((main|crud|database|replicas|emails|idempotency)\.py"),
    ("responses (Starlette Response, headers)", r"\(starlette/(responses|datastructures)\.py"),
    ("routing and framework middleware (FastAPI, Starlette)", r"\((fastapi|starlette|anyio)/"),
    ("HTTP server: uvicorn, httptools, socket I/O to clients", r"\(uvicorn|\(httptools|\(uvloop"),
]
PLUMBING = re.compile(
    r"\((asyncio|contextlib|typing|functools|abc|enum|weakref|collections|_weakrefset|threading)"
    r"[/.]|^$|<genexpr>|<listcomp>|<lambda>|<dictcomp>"
)
# Inclusive shares worth a line of their own.
STAGES = [
    ("whole request (uvicorn's run_asgi)", r"^RequestResponseCycle\.run_asgi"),
    ("  middleware stack above the router", r"^ServerErrorMiddleware\.__call__"),
    ("  route: dependencies + handler + serialization", r"^request_response\.<locals>\.app\.<locals>\.app "),
    ("    solving dependencies (parameters; a write's ConnectionDep)", r"^solve_dependencies"),
    ("    the connection: line, limits, checkout, return (main.connect; a GET's in its read)", r"^connect \(main\.py"),
    ("      pool checkout (Engine.connect, in its greenlet)", r"^Engine\.connect \(sqlalchemy"),
    ("    route handler", r"^run_endpoint_function"),
    ("      statements (Connection.execute, in its greenlet)", r"^Connection\.execute \(sqlalchemy"),
    ("      driver: aiomysql/asyncmy, the statements' I/O", r"\((aiomysql|asyncmy)/"),
    ("    the connection's return (its context manager's exit)", r"^_AsyncGeneratorContextManager\.__aexit__"),
    ("      Connection.close, in its greenlet", r"^Connection\.close \(sqlalchemy"),
    ("    response serialization", r"^serialize_response"),
    ("  access log line", r"^Logger\.(info|_log)"),
]

# SQLAlchemy runs each synchronous step of an AsyncConnection in a greenlet of its own, whose
# frames py-spy shows as a stack of their own: each is charged under the frames that await it.
REQUEST = [
    "Runner.run (asyncio/runners.py)",
    "RequestResponseCycle.run_asgi (uvicorn)",
    "ServerErrorMiddleware.__call__ (starlette)",
    "request_response.<locals>.app.<locals>.app (fastapi)",
]
GREENLET_PARENTS = {
    "Engine.connect (sqlalchemy": [*REQUEST, "connect (main.py)"],
    "Connection.execute (sqlalchemy": [*REQUEST, "run_endpoint_function (fastapi)"],
    "Connection.rollback (sqlalchemy": [*REQUEST, "run_endpoint_function (fastapi)"],
    "Connection.begin (sqlalchemy": [*REQUEST, "run_endpoint_function (fastapi)"],
    "Connection.close (sqlalchemy": [
        *REQUEST,
        "_AsyncGeneratorContextManager.__aexit__ (contextlib)",
        "connect (main.py)",
    ],
}


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        if PLUMBING.search(frame):
            continue
        for label, pattern in PARTS:
            if re.search(pattern, frame):
                return label
        return "other: " + re.sub(r":\d+\)$", ")", frame)
    return "event loop (its C code, uvloop's, and callbacks)"


def main(path: str) -> None:
    parts: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        parents = next((p for root, p in GREENLET_PARENTS.items() if frames[0].startswith(root)), None)
        if parents:
            frames = parents + frames
        elif frames == [""]:
            frames = []  # the event loop's own C code (uvloop), holding the GIL
        # Only the worker's request handling; gunicorn's own threads are not per-request work.
        elif not any(f.startswith("Runner.run (asyncio") for f in frames):
            continue
        total += n
        parts[part_of(frames)] += n
        for label, pattern in STAGES:
            if any(re.search(pattern, f) for f in frames):
                stages[label] += n
    if not total:
        raise SystemExit("no samples of a busy worker in this profile")
    print(f"{total} samples of the busy worker\n")
    print("| where (innermost known frame) | share |\n|---|---:|")
    others = 0
    for label, n in parts.most_common():
        if label.startswith("other") and n / total < 0.01:
            others += n
            continue
        print(f"| {label} | {100 * n / total:.1f} % |")
    if others:
        print(f"| other, each under 1 % | {100 * others / total:.1f} % |")
    print("\n| stage (inclusive) | share |\n|---|---:|")
    for label, _ in STAGES:
        print(f"| {label} | {100 * stages[label] / total:.1f} % |")


if __name__ == "__main__":
    main(sys.argv[1])
