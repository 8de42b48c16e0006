"""The raw baseline: Starlette over a bare aiomysql pool, hand-written SQL, no validation.

It answers the benchmark's routes with the same JSON as the service and nothing else:
no keys, no rate limit, no logging, no schemas. It is as fast as Python gets on this driver,
so the service is measured as a fraction of it. Run by bench/run.py under the same gunicorn
configuration as the service; DATABASE_URL, DB_POOL_SIZE and DB_MAX_OVERFLOW as for the service.
"""

import json
import os
from base64 import urlsafe_b64decode, urlsafe_b64encode
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiomysql
import pymysql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SELECT = "SELECT id, email, name, is_active, created_at, updated_at, version FROM users"


def user_json(row: tuple) -> dict:
    return {
        "id": row[0],
        "email": row[1],
        "name": row[2],
        "is_active": bool(row[3]),
        # Stored as naive UTC, like the service does.
        "created_at": row[4].isoformat(timespec="microseconds") + "+00:00",
        "updated_at": row[5].isoformat(timespec="microseconds") + "+00:00",
    }


@asynccontextmanager
async def lifespan(app: Starlette):
    url = urlsplit(os.environ["DATABASE_URL"])
    size = int(os.environ.get("DB_POOL_SIZE", 10))
    pool = await aiomysql.create_pool(
        minsize=size,
        maxsize=size + int(os.environ.get("DB_MAX_OVERFLOW", 5)),
        host=url.hostname,
        port=url.port or 3306,
        user=url.username,
        password=url.password or "",
        db=url.path.lstrip("/"),
        charset="utf8mb4",
        autocommit=True,
    )
    app.state.pool = pool
    yield
    pool.close()
    await pool.wait_closed()


async def get_user(request: Request) -> Response:
    async with request.app.state.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(SELECT + " WHERE id = %s", (int(request.path_params["user_id"]),))
        row = await cur.fetchone()
    if row is None:
        return JSONResponse({"detail": "not found"}, 404)
    return JSONResponse(user_json(row), headers={"ETag": f'"{row[6]}"'})


async def list_users(request: Request) -> Response:
    limit = int(request.query_params.get("limit", 20))
    cursor = request.query_params.get("cursor")
    after = int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True) if cursor else 0
    async with request.app.state.pool.acquire() as conn, conn.cursor() as cur:
        await cur.execute(SELECT + " WHERE id > %s ORDER BY id LIMIT %s", (after, limit + 1))
        rows = await cur.fetchall()
    items = [user_json(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = urlsafe_b64encode(items[-1]["id"].to_bytes(8, "big", signed=True)).decode().rstrip("=")
    return JSONResponse({"items": items, "next_cursor": next_cursor})


async def create_user(request: Request) -> Response:
    body = json.loads(await request.body())
    now = datetime.now(UTC).replace(tzinfo=None)
    email, name, is_active = body["email"], body["name"], body.get("is_active", True)
    async with request.app.state.pool.acquire() as conn, conn.cursor() as cur:
        try:
            await cur.execute(
                "INSERT INTO users (email, email_key, name, is_active, created_at, updated_at, version)"
                " VALUES (%s, %s, %s, %s, %s, %s, 1)",
                (email, email.lower(), name, is_active, now, now),
            )
        except pymysql.IntegrityError:
            return JSONResponse({"detail": "taken"}, 409)
        user_id = cur.lastrowid
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
