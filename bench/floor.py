"""The SQLAlchemy floor: Starlette over SQLAlchemy's asyncio Core, the service's statements, nothing else.

The service runs its database work through `AsyncConnection` by design, and that layer has a
cost of its own over the bare driver (bench/baseline.py). This app pays that cost and no more:
the service's engine settings (autocommit, no reset or rollback on return), its tables
(models.py) and its statements, built once with bound parameters, a connection per request,
and the same JSON as the service; no middleware, no keys, no validation, no logging. What the
service costs above it is the service's own. Run by bench/run.py under the same gunicorn
configuration as the service; DATABASE_URL, DB_POOL_SIZE and DB_MAX_OVERFLOW as for the service.

JSON: the standard library's, through Starlette's JSONResponse, as the raw baseline does, so
that the floor differs from the baseline by SQLAlchemy alone.
"""

import json
import os
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models import User

COLUMNS = (User.id, User.email, User.name, User.is_active, User.created_at, User.updated_at, User.version)
SELECT_USER = select(*COLUMNS).where(User.id == bindparam("user_id"))
SELECT_PAGE = select(*COLUMNS).where(User.id > bindparam("after")).order_by(User.id).limit(bindparam("limit"))
INSERT_USER = insert(User)


def user_json(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": row[0],
        "email": row[1],
        "name": row[2],
        "is_active": bool(row[3]),
        # Aware UTC datetimes (models.UTCDateTime), written as the service writes them.
        "created_at": row[4].isoformat(timespec="microseconds"),
        "updated_at": row[5].isoformat(timespec="microseconds"),
    }


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    size = int(os.environ.get("DB_POOL_SIZE", 10))
    # main.create_engine()'s choices that change what a request costs: each statement its own
    # transaction, and nothing sent to the server when a connection goes back to the pool.
    engine = create_async_engine(
        os.environ["DATABASE_URL"],
        isolation_level="AUTOCOMMIT",
        pool_reset_on_return=None,
        skip_autocommit_rollback=True,
        pool_size=size,
        max_overflow=int(os.environ.get("DB_MAX_OVERFLOW", 5)),
        connect_args={"charset": "utf8mb4"},
    )
    app.state.engine = engine
    yield
    await engine.dispose()


async def get_user(request: Request) -> Response:
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as conn:
        row = (await conn.execute(SELECT_USER, {"user_id": request.path_params["user_id"]})).first()
    if row is None:
        return JSONResponse({"detail": "not found"}, 404)
    return JSONResponse(user_json(row), headers={"ETag": f'"{row[6]}"'})


async def list_users(request: Request) -> Response:
    limit = int(request.query_params.get("limit", 20))
    cursor = request.query_params.get("cursor")
    after = int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True) if cursor else 0
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as conn:
        rows = (await conn.execute(SELECT_PAGE, {"after": after, "limit": limit + 1})).all()
    items = [user_json(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = urlsafe_b64encode(items[-1]["id"].to_bytes(8, "big", signed=True)).decode().rstrip("=")
    return JSONResponse({"items": items, "next_cursor": next_cursor})


async def create_user(request: Request) -> Response:
    body = json.loads(await request.body())
    now = datetime.now(UTC)
    email, name, is_active = body["email"], body["name"], body.get("is_active", True)
    values = {"email": email, "email_key": email.lower(), "name": name, "is_active": is_active}
    values |= {"created_at": now, "updated_at": now, "version": 1}
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as conn:
        try:
            user_id = (await conn.execute(INSERT_USER, values)).lastrowid
        except IntegrityError:
            return JSONResponse({"detail": "taken"}, 409)
    user = user_json((user_id, email, name, is_active, now, now))
    return JSONResponse(user, 201, {"Location": f"/api/v1/users/{user_id}", "ETag": '"1"'})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    lifespan=lifespan,
    routes=[
        Route("/health", health),
        Route("/api/v1/users", list_users),
        Route("/api/v1/users", create_user, methods=["POST"]),
        Route("/api/v1/users/{user_id:int}", get_user),
    ],
)
