"""The schema's migrations (migrations/, by Alembic), on SQLite and on MariaDB; nothing of ours is mocked.

Alembic runs as a deploy step runs it, `alembic upgrade head` in a process of its own, on a new
SQLite file or on a new MariaDB database beside TEST_MYSQL_URL's, dropped again; without
TEST_MYSQL_URL the MariaDB tests are skipped, and say so. Gunicorn and `python main.py` run as
test_main.py runs them.
"""

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing, suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, insert, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import schema
from conftest import HERE, TEST_MYSQL_URL, USERS, Server, auth_header, free_port, fresh_database, render, service_env
from models import Base, User

# The tables as earlier versions made them, with no alembic_version: at 8c36b11, the last commit
# before models.py named every constraint (MySQL names an unnamed UNIQUE after its first column:
# email_key, owner), and at 1975d26, the last before migrations. On MySQL, compose's
# initdb/01-schema.sql, which was create_all's DDL; on SQLite, what create_all made.
BEFORE_MIGRATIONS = {
    ("8c36b11", "mysql"): [
        """CREATE TABLE idempotency_keys (
            id BIGINT NOT NULL AUTO_INCREMENT,
            owner VARCHAR(32) NOT NULL,
            `key` VARCHAR(255) NOT NULL,
            fingerprint VARCHAR(64) NOT NULL,
            status INTEGER NOT NULL,
            location VARCHAR(64),
            etag VARCHAR(32),
            body TEXT NOT NULL,
            created_at DATETIME(6) NOT NULL,
            PRIMARY KEY (id),
            UNIQUE (owner, `key`)
        )CHARSET=utf8mb4 COLLATE utf8mb4_bin""",
        "CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at)",
        """CREATE TABLE users (
            id BIGINT NOT NULL AUTO_INCREMENT,
            email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            email_key VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            is_active BOOL NOT NULL,
            created_at DATETIME(6) NOT NULL,
            updated_at DATETIME(6) NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (id),
            UNIQUE (email_key)
        )CHARSET=utf8mb4 COLLATE utf8mb4_bin""",
    ],
    ("8c36b11", "sqlite"): [
        """CREATE TABLE users (
            id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
            email VARCHAR(254) NOT NULL,
            email_key VARCHAR(254) NOT NULL,
            name VARCHAR(100) NOT NULL,
            is_active BOOLEAN NOT NULL,
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            version INTEGER NOT NULL,
            UNIQUE (email_key)
        )""",
        """CREATE TABLE idempotency_keys (
            id INTEGER NOT NULL,
            owner VARCHAR(32) NOT NULL,
            "key" VARCHAR(255) NOT NULL,
            fingerprint VARCHAR(64) NOT NULL,
            status INTEGER NOT NULL,
            location VARCHAR(64),
            etag VARCHAR(32),
            body TEXT NOT NULL,
            created_at DATETIME NOT NULL,
            PRIMARY KEY (id),
            UNIQUE (owner, "key")
        )""",
        "CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at)",
    ],
    ("1975d26", "mysql"): [
        """CREATE TABLE idempotency_keys (
            id BIGINT NOT NULL AUTO_INCREMENT,
            owner VARCHAR(32) NOT NULL,
            `key` VARCHAR(255) NOT NULL,
            fingerprint VARCHAR(64) NOT NULL,
            status INTEGER NOT NULL,
            location VARCHAR(64),
            etag VARCHAR(32),
            body TEXT NOT NULL,
            created_at DATETIME(6) NOT NULL,
            CONSTRAINT pk_idempotency_keys PRIMARY KEY (id),
            CONSTRAINT uq_idempotency_keys_owner_key UNIQUE (owner, `key`)
        )CHARSET=utf8mb4 COLLATE utf8mb4_bin""",
        "CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at)",
        """CREATE TABLE users (
            id BIGINT NOT NULL AUTO_INCREMENT,
            email VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            email_key VARCHAR(254) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            name VARCHAR(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
            is_active BOOL NOT NULL,
            created_at DATETIME(6) NOT NULL,
            updated_at DATETIME(6) NOT NULL,
            version INTEGER NOT NULL,
            CONSTRAINT pk_users PRIMARY KEY (id),
            CONSTRAINT uq_users_email_key UNIQUE (email_key)
        )CHARSET=utf8mb4 COLLATE utf8mb4_bin""",
    ],
    ("1975d26", "sqlite"): [
        """CREATE TABLE users (
            id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
            email VARCHAR(254) NOT NULL,
            email_key VARCHAR(254) NOT NULL,
            name VARCHAR(100) NOT NULL,
            is_active BOOLEAN NOT NULL,
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            version INTEGER NOT NULL,
            CONSTRAINT uq_users_email_key UNIQUE (email_key)
        )""",
        """CREATE TABLE idempotency_keys (
            id INTEGER NOT NULL,
            owner VARCHAR(32) NOT NULL,
            "key" VARCHAR(255) NOT NULL,
            fingerprint VARCHAR(64) NOT NULL,
            status INTEGER NOT NULL,
            location VARCHAR(64),
            etag VARCHAR(32),
            body TEXT NOT NULL,
            created_at DATETIME NOT NULL,
            CONSTRAINT pk_idempotency_keys PRIMARY KEY (id),
            CONSTRAINT uq_idempotency_keys_owner_key UNIQUE (owner, "key")
        )""",
        "CREATE INDEX ix_idempotency_keys_created_at ON idempotency_keys (created_at)",
    ],
}
# A connection of the server's waiting in GET_LOCK: the state MariaDB and MySQL show it in.
WAITING_FOR_THE_LOCK = (
    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE = 'User lock' AND INFO LIKE '%GET_LOCK%'"
)
NO_REVISION = "revision none: an empty database, or one made before migrations"
# Makes a new, empty database of the kind the test runs on, by name; returns its URL.
NewDatabase = Callable[[str], Awaitable[str]]


@pytest.fixture(params=["sqlite", "mysql"])
async def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewDatabase]:
    """Make new, empty databases of one kind: SQLite files, or MariaDB databases dropped at the end."""
    if request.param == "mysql" and not TEST_MYSQL_URL:
        pytest.skip("TEST_MYSQL_URL is not set: this MariaDB test did not run")
    async with AsyncExitStack() as stack:

        async def new(name: str) -> str:
            if request.param == "sqlite":
                return f"sqlite+aiosqlite:///{tmp_path / name}.db"
            return render(await stack.enter_async_context(fresh_database(f"alembic_{name}")))

        yield new


async def alembic(url: str, *arguments: str, folder: Path) -> tuple[int, str]:
    """Run the alembic command on the database at url, as a deploy step does; return its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(HERE / "alembic.ini"), *arguments,
        cwd=folder, env=service_env(folder, DATABASE_URL=url), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    return await process.wait(), output.decode()


async def upgrade(url: str, folder: Path, to: str = "head") -> None:
    code, output = await alembic(url, "upgrade", to, folder=folder)
    assert 0 == code, output


async def on(url: str, *statements: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def describe(conn: Connection) -> dict[str, list[str]]:
    """Each table of ours, as the database states it, in lines whose order is the same wherever columns were added.

    MariaDB's own DDL (SHOW CREATE TABLE), which has every charset, collation and index name; on
    SQLite, what its catalogue says of each column, constraint and index, and AUTOINCREMENT.
    """
    inspector = inspect(conn)
    tables = {}
    for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
        if conn.dialect.name == "sqlite":
            sql = conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = :t"), {"t": table})
            lines = [
                *(f"column {c['name']} {c['type']} nullable={c['nullable']}" for c in inspector.get_columns(table)),
                f"primary key {inspector.get_pk_constraint(table)['constrained_columns']}",
                *(f"unique {u['name']} {u['column_names']}" for u in inspector.get_unique_constraints(table)),
                *(f"index {i['name']} {i['column_names']} unique={i['unique']}" for i in inspector.get_indexes(table)),
                f"autoincrement {'AUTOINCREMENT' in str(sql)}",
            ]
        else:
            ddl = conn.execute(text(f"SHOW CREATE TABLE {table}")).one()[1]
            # The next id is data, not schema; a line's comma only says whether another follows.
            lines = [line.strip().rstrip(",") for line in re.sub(r" AUTO_INCREMENT=\d+", "", ddl).splitlines()]
        tables[table] = sorted(lines)
    return tables


async def tables_of(url: str) -> dict[str, list[str]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(describe)
    finally:
        await engine.dispose()


async def revision_of(url: str) -> str | None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await schema.database_revision(conn)
    finally:
        await engine.dispose()


async def made_by_create_all(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()


# --- The migrations and models.py ----------------------------------------------------------


async def test_upgrade_from_empty_gives_the_tables_models_py_describes(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """`alembic upgrade head` on an empty database makes the tables create_all makes of models.py, to the collation."""
    migrated, created = await new_database("migrated"), await new_database("created")

    await upgrade(migrated, tmp_path)
    await made_by_create_all(created)

    assert schema.head_revision() == await revision_of(migrated)
    assert await tables_of(created) == await tables_of(migrated)
    assert {"users", "idempotency_keys"} == set(await tables_of(migrated))


async def test_alembic_check_finds_no_difference_between_the_migrations_and_models_py(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """Autogenerate, compared with a database at head, has no operation to write: models.py and the migrations agree."""
    url = await new_database("check")
    await upgrade(url, tmp_path)

    code, output = await alembic(url, "check", folder=tmp_path)

    assert 0 == code, output
    assert "No new upgrade operations detected." in output


async def test_downgrade_to_base_leaves_no_table_and_upgrade_works_again(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """Every revision's downgrade undoes its upgrade: at base only Alembic's empty version table is left."""
    url = await new_database("downgrade")
    await upgrade(url, tmp_path)
    at_head = await tables_of(url)

    await upgrade(url, tmp_path)  # a second upgrade finds nothing to do
    code, output = await alembic(url, "downgrade", "base", folder=tmp_path)
    assert 0 == code, output

    assert {} == await tables_of(url)
    assert await revision_of(url) is None
    await upgrade(url, tmp_path)
    assert at_head == await tables_of(url)
    assert schema.head_revision() == await revision_of(url)


async def test_upgrade_offline_prints_the_sql_of_an_empty_database(new_database: NewDatabase, tmp_path: Path) -> None:
    """`alembic upgrade head --sql` prints the tables' DDL for a DBA, and touches no database."""
    url = await new_database("offline")

    code, output = await alembic(url, "upgrade", "head", "--sql", folder=tmp_path)

    assert 0 == code, output
    for statement in ("CREATE TABLE users", "CREATE TABLE idempotency_keys", "ix_idempotency_keys_created_at"):
        assert statement in output
    assert {} == await tables_of(url)


# --- Databases made before migrations ------------------------------------------------------


async def add_users(url: str, *emails: str) -> None:
    """Insert users with these addresses as stored, keyed as the code before revision 0002 keyed them: str.lower()."""
    engine = create_async_engine(url, poolclass=NullPool)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(User),
                [
                    {
                        "email": email,
                        "email_key": email.lower(),
                        "name": email[:100],
                        "is_active": True,
                        "created_at": now,
                        "updated_at": now,
                        "version": 1,
                    }
                    for email in emails
                ],
            )
    finally:
        await engine.dispose()


async def rows_of(url: str, query: str) -> list[tuple[object, ...]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(query))]
    finally:
        await engine.dispose()


async def made_before_migrations(url: str, commit: str) -> None:
    """Make the tables as the service at this commit did, with users 1 and 2 (3 was deleted)."""
    await on(url, *BEFORE_MIGRATIONS[commit, "sqlite" if url.startswith("sqlite") else "mysql"])
    await add_users(url, "ada@example.com", "grace@example.com", "alan@example.com")
    await on(url, "DELETE FROM users WHERE id = 3")


@pytest.mark.parametrize("commit", ["8c36b11", "1975d26"])
async def test_database_made_before_migrations_is_adopted_with_its_rows(
    new_database: NewDatabase, tmp_path: Path, commit: str
) -> None:
    """`alembic upgrade head` on the tables an earlier version made leaves them as on a fresh database, rows kept."""
    old, fresh = await new_database("old"), await new_database("fresh")
    await made_before_migrations(old, commit)

    await upgrade(old, tmp_path)
    await upgrade(fresh, tmp_path)

    assert await tables_of(fresh) == await tables_of(old)
    assert schema.head_revision() == await revision_of(old)
    # The rows kept, and the deleted user's id not given again: the next one is 4.
    await add_users(old, "katherine@example.com")
    assert [(1, "ada@example.com"), (2, "grace@example.com"), (4, "katherine@example.com")] == await rows_of(
        old, "SELECT id, email FROM users ORDER BY id"
    )


async def test_table_with_other_columns_is_not_adopted_and_the_error_says_so(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """A users table that this service did not make stops the upgrade, naming the table and its columns."""
    url = await new_database("foreign")
    await on(url, "CREATE TABLE users (id INTEGER PRIMARY KEY, login VARCHAR(20))")

    code, output = await alembic(url, "upgrade", "head", folder=tmp_path)

    assert 0 != code
    assert "table users has the columns ['id', 'login']" in output
    assert await revision_of(url) is None


async def test_an_upgrade_waits_while_another_runs_on_mariadb(tmp_path: Path) -> None:
    """On MariaDB `alembic upgrade` waits for the migration lock (an init container in each pod), then migrates."""
    async with fresh_database("alembic_lock") as url:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as holder:
                # What a running upgrade holds, until it disconnects.
                assert 1 == await holder.scalar(text("SELECT GET_LOCK(CONCAT('alembic:', DATABASE()), 0)"))
                waiting = asyncio.create_task(alembic(render(url), "upgrade", "head", folder=tmp_path))
                for _ in range(300):
                    if await holder.scalar(text(WAITING_FOR_THE_LOCK)):
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail(f"alembic never waited for the lock: {await waiting}")
                assert await schema.database_revision(holder) is None
        finally:
            await engine.dispose()
        code, output = await waiting

    assert 0 == code, output
    assert "Running upgrade  -> 0001" in output


# --- Addresses stored before revision 0002 ------------------------------------------------

# Rows as the code before revision 0002 stored them (the address as sent, keyed by str.lower()),
# with ids 1 to 10, and each one's email, key and version after `alembic upgrade head`.
STORED_BEFORE = [
    ("ada@example.com", ("ada@example.com", "ada@example.com", 1)),  # one spelling already: untouched
    ("Zoe\u0308@example.com", ("Zo\u00eb@example.com", "zo\u00eb@example.com", 2)),  # NFD
    ("ada@xn--exmple-cua.com", ("ada@ex\u00e4mple.com", "ada@ex\u00e4mple.com", 2)),  # an A-label
    ("Grace@EXAMPLE.org", ("Grace@example.org", "grace@example.org", 2)),  # an upper-case host name
    # One address twice, NFD and with an A-label: the older has it, the other is left as it was.
    ("Jose\u0301@exa\u0308mple.com", ("Jos\u00e9@ex\u00e4mple.com", "jos\u00e9@ex\u00e4mple.com", 2)),
    ("Jos\u00e9@xn--exmple-cua.com", ("Jos\u00e9@xn--exmple-cua.com", "jos\u00e9@xn--exmple-cua.com", 1)),
    # One address twice, the younger in its one spelling already: it keeps the key, the older is left.
    ("Rene\u0301e@example.com", ("Rene\u0301e@example.com", "rene\u0301e@example.com", 1)),
    ("Ren\u00e9e@example.com", ("Ren\u00e9e@example.com", "ren\u00e9e@example.com", 1)),
    # Refused now: a right-to-left host name with a label that breaks RFC 5893's Bidi Rule.
    (
        "ada@\u05e9\u05dc\u05d5\u05dd.0.com",
        ("ada@\u05e9\u05dc\u05d5\u05dd.0.com", "ada@\u05e9\u05dc\u05d5\u05dd.0.com", 1),
    ),
    # J̌ has no composed form, but its lower case has: the key alone changes, and the version does not.
    ("J\u030cane@example.com", ("J\u030cane@example.com", "\u01f0ane@example.com", 1)),
]


async def test_addresses_stored_before_are_rewritten_in_their_one_spelling(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """Revision 0002 stores each address as emails.py does now; rows that are now one address, or refused, are left."""
    url = await new_database("spellings")
    await upgrade(url, tmp_path, to="0001")
    await add_users(url, *(email for email, _ in STORED_BEFORE))

    code, output = await alembic(url, "upgrade", "head", folder=tmp_path)

    assert 0 == code, output
    rows = await rows_of(url, "SELECT id, email, email_key, version, updated_at > created_at FROM users ORDER BY id")
    expected = [(n, *after, after[2] > 1) for n, (_, after) in enumerate(STORED_BEFORE, 1)]
    assert expected == [(id_, email, key, version, bool(later)) for id_, email, key, version, later in rows]
    for warning in (
        "users 5, 6 are one address now: user 5 has it",
        "users 7, 8 are one address now: user 8 has it",
        "left as they are, as the service now refuses their addresses: users 9",
        "5 users rewritten",
    ):
        assert warning in output
    code, output = await alembic(url, "check", folder=tmp_path)
    assert 0 == code, output


async def test_rows_whose_new_key_is_held_by_a_row_that_cannot_be_converted_are_left(
    new_database: NewDatabase, tmp_path: Path
) -> None:
    """A refused row written with another address's key by hand: that address's rows keep theirs, and are logged."""
    url = await new_database("held")
    await upgrade(url, tmp_path, to="0001")
    refused, decomposed = "ada@\u05e9\u05dc\u05d5\u05dd.0.com", "Zoe\u0308@example.com"
    await add_users(url, refused, decomposed)
    await on(url, "UPDATE users SET email_key = 'zo\u00eb@example.com' WHERE id = 1")

    code, output = await alembic(url, "upgrade", "head", folder=tmp_path)

    assert 0 == code, output
    assert [(1, refused, "zo\u00eb@example.com"), (2, decomposed, decomposed.lower())] == await rows_of(
        url, "SELECT id, email, email_key FROM users ORDER BY id"
    )
    assert "users 2: their address's new key is held by user 1, which cannot be converted" in output
    assert "0 users rewritten" in output


async def test_rewrite_reaches_every_row_across_batches(new_database: NewDatabase, tmp_path: Path) -> None:
    """More rows than a batch, each stored decomposed: every one is rewritten in NFC, and none is missed."""
    url = await new_database("batches")
    await upgrade(url, tmp_path, to="0001")
    count = 2 * ScriptDirectory.from_config(schema.alembic_config()).get_revision("0002").module.BATCH + 345
    await add_users(url, *(unicodedata.normalize("NFD", f"us\u00e9r{n}@ex\u00e4mple.com") for n in range(count)))

    await upgrade(url, tmp_path)

    rows = await rows_of(url, "SELECT email, email_key FROM users ORDER BY id")
    assert [(f"us\u00e9r{n}@ex\u00e4mple.com",) * 2 for n in range(count)] == rows


# --- The code and the database's revision --------------------------------------------------


@pytest.mark.parametrize("state", ["empty", "made before migrations"])
async def test_gunicorn_refuses_to_start_on_a_database_behind_the_code_and_says_what_to_run(
    new_database: NewDatabase, tmp_path: Path, state: str
) -> None:
    """Gunicorn on a database not at head exits before any worker boots, naming both revisions and the command."""
    url = await new_database("behind")
    if state == "made before migrations":
        await made_before_migrations(url, "8c36b11")
    before = await tables_of(url)

    server = Server(tmp_path, workers=2, DATABASE_URL=url)
    code = await server.exit_code(within=60)

    log = server.log()
    print(log)
    assert 0 != code
    refusal = next(json.loads(line) for line in log.splitlines() if "Run `alembic upgrade head`" in line)
    assert "ERROR" == refusal["level"]  # a JSON line, as every line in production is
    assert f"the database schema is at {NO_REVISION}; the code needs revision {schema.head_revision()}" in log
    assert "Run `alembic upgrade head` first" in log
    assert "Booting worker" not in log
    assert before == await tables_of(url)  # the app never alters a schema at start


@pytest.mark.parametrize("revision", ["head", "later"])
async def test_gunicorn_starts_on_a_database_at_head_or_at_a_later_releases_revision(
    new_database: NewDatabase, tmp_path: Path, revision: str
) -> None:
    """Gunicorn starts at head, and at a revision it does not know (a later release's), so that a rollback starts."""
    url = await new_database("started")
    await upgrade(url, tmp_path)
    if revision == "later":
        await on(url, "UPDATE alembic_version SET version_num = '9999'")

    # Started as it is, with no deploy step before it.
    server = Server(tmp_path, workers=2, DATABASE_URL=url)
    await server.start()
    try:
        await server.wait_ready()
        async with server.client() as client:
            assert 200 == (await client.get(USERS)).status_code
    finally:
        await server.stop()

    expected = {
        "head": f"database schema at revision {schema.head_revision()}, the code's",
        "later": f"database schema at revision 9999, newer than the code's {schema.head_revision()}",
    }
    assert expected[revision] in server.log()


@pytest.mark.parametrize("state", ["empty folder", "users.db made before migrations"])
async def test_python_main_py_brings_its_own_database_to_head(tmp_path: Path, state: str) -> None:
    """`python main.py`, the README's run command, upgrades ./users.db to head itself, rows kept, and serves it."""
    database = tmp_path / "users.db"
    if state != "empty folder":
        await made_before_migrations(f"sqlite+aiosqlite:///{database}", "8c36b11")
    port = free_port()
    env = {k: v for k, v in service_env(tmp_path, PORT=str(port)).items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "main.py"), cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(150):
                with suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            response = await client.get(f"{USERS}/2", headers=auth_header())
    finally:
        process.terminate()
        await process.wait()

    assert 200 == response.status_code, response.text
    assert "grace@example.com" == response.json()["email"]
    with closing(sqlite3.connect(database)) as conn:
        assert [(schema.head_revision(),)] == conn.execute("SELECT version_num FROM alembic_version").fetchall()
