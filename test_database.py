"""The database connection in process: dead connections, time limits, and which errors are outages."""

import logging
import re
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, insert, make_url, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Message, Receive, Scope, Send

import crud
import main
from conftest import (
    LEAKS,
    USERS,
    assert_503_problem,
    assert_problem,
    create,
    timed,
)
from database import unavailable
from models import User
from settings import settings

# --- The database connection: faults and time limits, in process ---------------------------


def die_after(engine: AsyncEngine, verb: str) -> list[str]:
    """Make the first statement starting with verb lose its connection once it has run; return a log of it.

    The statement has run and, in autocommit, is committed: only its answer is lost, as when
    the server is killed or the network cut right after it. The error is the driver's own
    for a lost connection, which SQLAlchemy recognises as a disconnect.
    """
    died: list[str] = []
    dbapi = engine.dialect.loaded_dbapi

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def lose_the_answer(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(verb) and not died:
            died.append(statement)
            if engine.dialect.name == "sqlite":
                raise dbapi.OperationalError("no active connection")
            raise dbapi.OperationalError(2013, "Lost connection to server during query")

    return died


async def test_delete_whose_first_try_landed_before_the_connection_died_is_204(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A DELETE retried on a fresh connection after its first try landed answers 204, not 404."""
    user = await create(client)
    died = die_after(engine, "DELETE")

    response = await client.delete(f"{USERS}/{user['id']}")

    assert 1 == len(died)
    assert 204 == response.status_code, response.text
    assert_problem(await client.get(f"{USERS}/{user['id']}"), 404)


async def test_read_whose_connection_died_is_retried_on_a_fresh_one(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A read that loses its connection is run once more, unseen by the client."""
    user = await create(client)
    died = die_after(engine, "SELECT")

    response = await client.get(f"{USERS}/{user['id']}")

    assert 1 == len(died)
    assert 200 == response.status_code, response.text
    assert user == response.json()


async def test_create_whose_connection_died_is_503_and_not_repeated(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A create whose answer was lost is not run again (it may have landed): 503, and one user at most."""
    died = die_after(engine, "INSERT")

    response = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})

    assert 1 == len(died)
    assert_problem(response, 503)
    assert 1 == len((await client.get(USERS)).json()["items"])


async def test_the_connection_is_back_in_the_pool_before_the_response_starts(
    lifespan_state: dict[str, Any], engine: AsyncEngine
) -> None:
    """A route's connection is returned before its answer is sent, so a slow reader holds none."""
    checked_out_at_start: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                checked_out_at_start.append(engine.pool.checkedout())  # type: ignore[attr-defined]
            await send(message)

        scope["state"] = dict(lifespan_state)
        await main.app(scope, receive, watch)

    transport = httpx.ASGITransport(app=app, client=("2001:db8::1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        created = await client.post(USERS, json={"email": "slow-reader@example.com", "name": "Ada"})
        await client.get(f"{USERS}/{created.json()['id']}")
        await client.get(USERS)

    assert 201 == created.status_code, created.text
    assert [0, 0, 0] == checked_out_at_start


async def test_the_statements_of_one_request_share_one_db_timeout(
    client: httpx.AsyncClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DB_TIMEOUT bounds a request's database work as a whole: two slow statements cannot take it twice."""
    user = await create(client)
    monkeypatch.setattr(main, "settings", settings.model_copy(update={"db_timeout": 0.5}))

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def slow_statement(*args: Any) -> None:
        time.sleep(0.3)  # a statement that takes 0.3 s, under the limit on its own

    one, _ = await timed(client.get(f"{USERS}/{user['id']}"))
    two, took = await timed(client.patch(f"{USERS}/{user['id']}", json={"name": "Changed"}))  # a read and an UPDATE

    assert 200 == one.status_code, one.text
    assert_problem(two, 503)
    assert took < 0.9


async def test_health_answers_at_once_while_the_pool_is_saturated(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """/health checks on a connection of its own: user traffic holding every pooled one does not delay it."""
    capacity = settings.db_pool_size + settings.db_max_overflow
    async with AsyncExitStack() as held:
        for _ in range(capacity):
            await held.enter_async_context(engine.connect())
        health, health_took = await timed(client.get("/health"))
        user, user_took = await timed(client.get(f"{USERS}/1"))

    assert 200 == health.status_code, health.text
    assert capacity == health.json()["pool"]["checked_out"]
    assert health_took < 0.5
    # A user request waits its turn for DB_POOL_TIMEOUT, then 503; within the 2 s either way.
    assert_503_problem(user, user_took)


async def test_access_log_escapes_control_characters_in_the_path(client: httpx.AsyncClient) -> None:
    """A %0A in the path cannot forge a second line in the request log."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("users.access").addHandler(handler)
    try:
        await client.get("/nowhere%0A2026-12-01 INFO users.access: GET /admin 200")
    finally:
        logging.getLogger("users.access").removeHandler(handler)

    assert 1 == len(lines)
    assert "\n" not in lines[0]
    assert "/nowhere\\n2026-12-01" in lines[0]


# --- An outage or a bug: 503 only for the first ---------------------------------------------


class Kept(logging.Handler):
    """Keep every record logged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_schema_that_lags_the_code_is_500_not_503_and_is_logged_once_with_its_traceback(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """A column the code reads but the database lacks is a bug a retry cannot mend: 500, never "retry shortly"."""
    await create(client)
    async with engine.connect() as conn:
        await conn.execute(text("ALTER TABLE users RENAME COLUMN is_active TO active"))
    kept = Kept()
    logging.getLogger("users").addHandler(kept)
    try:
        response = await client.get(USERS)
    finally:
        logging.getLogger("users").removeHandler(kept)

    assert_problem(response, 500)
    assert "retry-after" not in response.headers
    assert not LEAKS.search(response.text), response.text
    tracebacks = [record for record in kept.records if record.exc_info]
    assert [f"unhandled error in GET {USERS}"] == [record.getMessage().partition(" (")[0] for record in tracebacks]
    assert [] == [record.getMessage() for record in kept.records if "unavailable" in record.getMessage()]


def requests_of(response: httpx.Response, series: str) -> float:
    """The value of one series in a scrape, 0 when it is not there yet."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", response.text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def real_error(database_url: str, kind: str) -> Exception:
    """The error the real database raises, through SQLAlchemy, for one kind of failure."""
    url = make_url(database_url)
    sync = create_engine(url.set(drivername="sqlite" if url.get_backend_name() == "sqlite" else "mysql+pymysql"))
    sqlite = url.get_backend_name() == "sqlite"
    try:
        with sync.connect() as holder, sync.connect() as other:
            if kind == "unknown column":
                other.execute(text("SELECT no_such_column FROM users"))
            elif sqlite:  # "lock": a writer holds the file, another finds it busy at once
                holder.exec_driver_sql("BEGIN IMMEDIATE")
                other.exec_driver_sql("PRAGMA busy_timeout = 0")
                other.execute(text("DELETE FROM users"))
            else:  # "lock": a row lock held past the other's (shortest) lock wait
                holder.execute(
                    insert(User).values(
                        email="l@x.io",
                        email_key="l@x.io",
                        name="L",
                        is_active=True,
                        created_at=datetime.now(UTC),
                        updated_at=datetime.now(UTC),
                        version=1,
                    )
                )
                holder.execute(text("SELECT * FROM users FOR UPDATE"))
                other.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
                other.execute(text("DELETE FROM users"))
    except DBAPIError as exc:
        return exc
    finally:
        sync.dispose()
    pytest.fail(f"{kind}: the database raised nothing")


@pytest.mark.parametrize(("kind", "cause"), [("lock", "lock"), ("unknown column", None)])
async def test_a_lock_the_database_could_not_get_is_an_outage_and_an_unknown_column_is_not(
    lifespan_state: dict[str, Any], database_url: str, kind: str, cause: str | None
) -> None:
    """database.unavailable() calls a lock wait or a busy database an outage (503), a missing column a bug (500)."""
    assert cause == unavailable(real_error(database_url, kind))


# --- PATCH on a row that keeps changing ------------------------------------------------------


async def test_patch_without_if_match_on_a_row_that_keeps_changing_gives_up_with_a_503_of_its_own(
    client: httpx.AsyncClient, engine: AsyncEngine, database_url: str
) -> None:
    """Bounded: after UPDATE_TRIES lost compare-and-swaps, 503 "kept changing", counted as contention, at once."""
    user = await create(client)
    url = make_url(database_url)
    other_writer = create_engine(
        url.set(drivername="sqlite" if url.get_backend_name() == "sqlite" else "mysql+pymysql")
    )
    tries: list[str] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def another_writer_wins_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE users"):
            tries.append(statement)
            with other_writer.begin() as other:
                other.execute(update(User).values(version=User.version + 1))

    before = requests_of(await client.get("/metrics"), 'db_unavailable_responses_total{cause="contention"}')
    try:
        response, took = await timed(client.patch(f"{USERS}/{user['id']}", json={"name": "Mine"}))
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", another_writer_wins_first)
        other_writer.dispose()
    after = requests_of(await client.get("/metrics"), 'db_unavailable_responses_total{cause="contention"}')

    body = assert_problem(response, 503)
    assert "1" == response.headers["retry-after"]
    assert f"User {user['id']} kept changing" in body["detail"]
    assert crud.UPDATE_TRIES == len(tries)
    assert 1 == after - before
    assert took < settings.db_timeout


async def test_a_foreign_key_holds_on_sqlite_as_on_mariadb(engine: AsyncEngine) -> None:
    """A row that names a parent that does not exist is refused by either database, not only by MariaDB."""
    async with engine.connect() as conn:
        await conn.execute(text("CREATE TABLE fk_parent (id INTEGER PRIMARY KEY)"))
        await conn.execute(
            text("CREATE TABLE fk_child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES fk_parent (id))")
        )
        try:
            with pytest.raises(IntegrityError):
                await conn.execute(text("INSERT INTO fk_child (id, parent_id) VALUES (1, 42)"))
        finally:
            await conn.execute(text("DROP TABLE fk_child"))
            await conn.execute(text("DROP TABLE fk_parent"))
