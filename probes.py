"""The probes load balancers and orchestrators poll: /health, /livez, /readyz; and the drain on SIGTERM.

None needs a key and none is rate limited. The database is checked on each worker's probe
engine, a connection of its own, so that a check never waits in line behind user traffic.
"""

import asyncio
import logging
import signal
from types import FrameType
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from database import pool_status, read
from openapi import problem_responses
from problems import Checks, Pool, problem
from settings import settings

log = logging.getLogger("users.probes")

router = APIRouter(tags=["health"])
# No key, and the schema says so (security: []): orchestrators probe them (API.md).
NO_KEY: dict[str, list[str]] = {"security": []}


class Health(BaseModel):
    status: Literal["ok"]
    checks: Checks = Field(examples=[{"database": "ok"}])
    pool: Pool = Field(examples=[{"size": 10, "checked_out": 1, "overflow": 0, "max_overflow": 5}])


class Live(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ok"]
    checks: Checks = Field(examples=[{"database": "ok", "worker": "serving"}])


@router.get("/health", responses={200: {"model": Health}, **problem_responses(503)}, openapi_extra=NO_KEY)
async def health(request: Request) -> JSONResponse:
    """Report whether the database answers within DB_TIMEOUT, and this worker's pool figures."""
    pool = pool_status(request.state.engine, settings.db_max_overflow)
    if not await database_answers(request):
        return problem(
            503, "The database is not answering.", {"Retry-After": "1"}, checks={"database": "unavailable"}, pool=pool
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok"}, "pool": pool})


@router.get("/livez", responses=problem_responses(), openapi_extra=NO_KEY)
async def livez() -> Live:
    """Say the process is serving; no I/O, so a database outage never restarts it."""
    return Live(status="ok")


@router.get("/readyz", responses={200: {"model": Ready}, **problem_responses(503)}, openapi_extra=NO_KEY)
async def readyz(request: Request) -> JSONResponse:
    """Report whether this worker should get traffic: it is not shutting down, and the database answers."""
    if request.state.draining.is_set():
        return problem(503, "This worker is shutting down.", {"Retry-After": "1"}, checks={"worker": "draining"})
    if not await database_answers(request):
        return problem(
            503,
            "The database is not answering.",
            {"Retry-After": "1"},
            checks={"database": "unavailable", "worker": "serving"},
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok", "worker": "serving"}})


async def database_answers(request: Request) -> bool:
    """Whether the database answers within DB_TIMEOUT; when it does not, log why.

    The check runs in a task of its own, and the answer does not wait for it past DB_TIMEOUT:
    a check cut off by the limit still closes its connection, and that cleanup (which SQLAlchemy
    shields from cancellation) can outlast the limit on a database that has stopped answering.
    """
    check = asyncio.ensure_future(select_one(request.state.probe_engine))
    # Its outcome, when no one waits for it any more, is logged below already.
    check.add_done_callback(lambda task: task.cancelled() or task.exception())
    try:
        await asyncio.wait_for(asyncio.shield(check), settings.db_timeout)
    except (TimeoutError, PoolTimeoutError, DBAPIError) as exc:
        check.cancel()  # if still running: it finishes its cleanup on its own
        log.error("%s: database unavailable: %s: %s", request.url.path, type(exc).__name__, exc)
        return False
    return True


async def select_one(probe_engine: AsyncEngine) -> None:
    """SELECT 1 on the probe engine's own connection, so that the check never waits behind user traffic."""
    async with asyncio.timeout(settings.db_timeout), probe_engine.connect() as conn:
        await read(conn, select(1), {})


def drain_on_sigterm(delay: float) -> asyncio.Event:
    """On SIGTERM, mark this worker draining at once, and pass the signal on to the server `delay` later.

    Returns the event /readyz answers 503 on. The server (uvicorn, also as gunicorn's worker)
    has installed its own SIGTERM handler before it starts the lifespan; on the signal it stops
    accepting connections within 0.1 s. Held back, the worker goes on serving while /readyz
    answers 503, so that balancers stop sending to it before it closes. uvicorn's handler is
    the only one SIGTERM reaches: uvicorn-worker resets gunicorn's Worker.handle_exit, and
    creates uvicorn's Server where no subclass can replace it.
    """
    draining = asyncio.Event()
    server_stop = signal.getsignal(signal.SIGTERM)
    if not callable(server_stop):  # no server's handler to pass it on to: the tests' in-process app
        return draining
    loop = asyncio.get_running_loop()

    def begin_draining(sig: int, frame: FrameType | None) -> None:
        draining.set()
        loop.call_later(delay, server_stop, sig, frame)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes, even in the event loop's own code: the
        # thread-safe call is the one way in that cannot catch the loop half way.
        loop.call_soon_threadsafe(begin_draining, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return draining
