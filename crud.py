"""The database work every resource shares, written once: plain functions that take the table's class.

A table qualifies when it has an integer primary key `id`, `created_at` and `updated_at`, and a
`version` that every update bumps: the ETag, and the compare-and-swap that makes If-Match exact
without a transaction or a lock. Each function runs on the caller's connection (in autocommit,
unless the caller began a transaction) and raises the HTTPException its answer is: 404 for a
missing row, 409 for a unique constraint the caller named, 412 for an If-Match or
If-None-Match that does not hold, 503 for a row that kept changing under an update.
"""

import re
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Any, NamedTuple

from fastapi import Header, HTTPException, Query
from sqlalchemy import (
    CursorResult,
    Delete,
    Insert,
    Select,
    Table,
    UniqueConstraint,
    Update,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from database import read
from models import Base
from observability import DB_UNAVAILABLE

Row = dict[str, Any]

# Tries of an update's read and compare-and-swap before it gives up on a row that keeps changing:
# far more than the writers one row meets at once, each of whom wins a try.
UPDATE_TRIES = 20


class Statements(NamedTuple):
    one: Select[Any]
    page: Select[Any]
    insert: Insert
    update: Update


@cache
def statements(model: type[Base]) -> Statements:
    """The statements on model's table, built once with their values as parameters: no request pays to build one."""
    table = table_of(model)
    by_id = table.c.id == bindparam("row_id")
    return Statements(
        one=select(table).where(by_id),
        page=select(table).where(table.c.id > bindparam("after")).order_by(table.c.id).limit(bindparam("limit")),
        insert=insert(table),
        # No values(): the columns set are the keys of the parameters each execution passes.
        update=update(table).where(by_id, table.c.version == bindparam("row_version")),
    )


@cache
def delete_statement(model: type[Base], of_versions: bool, not_of_versions: bool) -> Delete:
    """DELETE by id, of the versions given (If-Match), or of none of them (If-None-Match); built once each."""
    table = table_of(model)
    statement = delete(table).where(table.c.id == bindparam("row_id"))
    if of_versions:
        statement = statement.where(table.c.version.in_(bindparam("versions", expanding=True)))
    if not_of_versions:
        statement = statement.where(table.c.version.not_in(bindparam("not_versions", expanding=True)))
    return statement


def table_of(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def etag(row: Row) -> str:
    """The row's strong entity tag: its version, quoted."""
    return f'"{row["version"]}"'


def entity_tags(header: str | None, *, weak: bool = False) -> set[str] | None:
    """The entity tags in an If-Match or If-None-Match header ("*" included); None when absent or empty.

    If-Match compares strongly: a weak tag (W/"3") matches nothing. If-None-Match compares
    weakly: W/"3" is "3". An empty header is an empty list, which RFC 9110 lets a recipient
    treat as absent.
    """
    if not header or not header.strip():
        return None
    tags = (tag.strip() for tag in header.split(","))
    return {tag.removeprefix("W/") for tag in tags} if weak else {tag for tag in tags if not tag.startswith("W/")}


class Preconditions(NamedTuple):
    """What If-Match and If-None-Match ask of a row's version (RFC 9110, 13.1); None for a header not sent."""

    match: set[str] | None = None  # "*": any row
    none_match: set[str] | None = None  # "*": no row

    @classmethod
    def of(cls, if_match: str | None, if_none_match: str | None = None) -> "Preconditions":
        return cls(entity_tags(if_match), entity_tags(if_none_match, weak=True))

    def refused(self, model: type[Base], row: Row) -> HTTPException | None:
        """The 412 for the row, if its version fails If-Match or If-None-Match."""
        tag, name = etag(row), f"{model.__name__} {row['id']}"
        if self.match is not None and "*" not in self.match and tag not in self.match:
            return HTTPException(412, f"{name} has changed: its ETag is now {tag}")
        if self.none_match is not None and ("*" in self.none_match or tag in self.none_match):
            return HTTPException(412, f"{name} is at {tag}, which If-None-Match excludes")
        return None

    @property
    def any_version(self) -> bool:
        """Whether the request may write over a version it did not see: If-Match absent, or `*`."""
        return self.match is None or "*" in self.match


def versions(tags: set[str]) -> list[int]:
    """The versions these entity tags name; strong comparison is byte for byte, so '"01"' names none."""
    return [int(tag[1:-1]) for tag in tags if re.fullmatch(r'"[1-9][0-9]{0,17}"', tag)]


def as_dicts(result: CursorResult[Any]) -> list[Row]:
    """The result's rows as dicts of their columns, zipped with its keys: cheaper than .mappings() (bench/README)."""
    keys = result.keys()
    return [dict(zip(keys, row, strict=True)) for row in result]


async def get_row(conn: AsyncConnection, model: type[Base], row_id: int, *, retry: bool = True) -> Row:
    """Read one row as a dict; 404 when there is none."""
    rows = as_dicts(await read(conn, statements(model).one, {"row_id": row_id}, retry=retry))
    if not rows:
        raise HTTPException(404, f"{model.__name__} {row_id} does not exist")
    return rows[0]


async def get_page(
    conn: AsyncConnection, model: type[Base], cursor: str | None, limit: int
) -> tuple[list[Row], str | None]:
    """Read up to limit rows after the cursor's, in id order; and the cursor of the next page, if more remain.

    Keyset pagination: the index on id finds the first row of any page at once, however deep.
    """
    after = int.from_bytes(urlsafe_b64decode(cursor + "="), "big", signed=True) if cursor else 0
    # One more row than asked for says whether there is a next page.
    rows = as_dicts(await read(conn, statements(model).page, {"after": after, "limit": limit + 1}))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], urlsafe_b64encode(rows[limit - 1]["id"].to_bytes(8, "big", signed=True)).decode().rstrip("=")


# The opaque cursor: the last id's 8 bytes in URL-safe base64, unpadded; the pattern admits exactly
# the strings get_page() decodes (8 bytes), so a malformed cursor is a 422 before any read.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]$"
# Enough for dozens of entity tags. Within it any value is taken: one that names no current
# version is answered 412, malformed or not (API.md).
MAX_IF_MATCH = 1024
Cursor = Annotated[
    str | None,
    Query(max_length=11, pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page."),
]
IfMatch = Annotated[
    str | None, Header(max_length=MAX_IF_MATCH, description="Only if the resource's ETag is one of these (`*`: any).")
]
IfNoneMatch = Annotated[
    str | None, Header(max_length=MAX_IF_MATCH, description="Only if the resource's ETag is none of these (`*`: none).")
]


async def insert_row(
    conn: AsyncConnection, model: type[Base], values: Mapping[str, Any], conflicts: Mapping[str, str]
) -> Row:
    """Insert a row at version 1; 409 with conflicts[name] when it breaks the unique constraint of that name.

    Not retried: had it landed before its connection died, a second try would insert it twice.
    A client that sends an Idempotency-Key can retry it safely.
    """
    now = datetime.now(UTC)
    row = {**values, "created_at": now, "updated_at": now, "version": 1}
    try:
        row["id"] = (await conn.execute(statements(model).insert, row)).lastrowid
    except IntegrityError as exc:
        raise conflict(model, exc, conflicts) from None
    return row


async def update_row(
    conn: AsyncConnection,
    model: type[Base],
    row_id: int,
    wanted: Mapping[str, Any],
    preconditions: Preconditions,
    conflicts: Mapping[str, str],
    *,
    in_transaction: bool = False,
) -> Row:
    """Set the wanted values, if the preconditions hold; of two writers on one version, exactly one wins.

    A read, then an UPDATE that is a compare-and-swap on the version read: a write that lands
    in between makes it miss, never overwritten, and no transaction or lock is needed. Without
    If-Match (or with `*`) the loser reads again and retries, so the last write wins; with a
    tag, it gets 412, as does a request whose If-None-Match names the version it would change.
    Values that are already in place are not an update: the row comes back with the same
    version and updated_at. in_transaction: the caller's transaction dies with a dead
    connection, so nothing may be tried again on a fresh one.
    """
    for _ in range(UPDATE_TRIES):
        row = await get_row(conn, model, row_id, retry=not in_transaction)
        if refused := preconditions.refused(model, row):
            raise refused
        changed = {field: value for field, value in wanted.items() if row[field] != value}
        if not changed:
            return row
        values = {**changed, "updated_at": datetime.now(UTC), "version": row["version"] + 1}
        try:
            result = await conn.execute(
                statements(model).update, {**values, "row_id": row_id, "row_version": row["version"]}
            )
        except IntegrityError as exc:
            raise conflict(model, exc, conflicts) from None
        except DBAPIError as exc:
            # Safe to repeat only when any version will do: had the first try landed, the next
            # finds the values in place. With a tag, it would wrongly answer 412.
            if in_transaction or not (exc.connection_invalidated and preconditions.any_version):
                raise
            await conn.rollback()  # lets go of the dead connection
            continue
        if result.rowcount == 1:
            return {**row, **values}
        if not preconditions.any_version:
            raise HTTPException(412, f"{model.__name__} {row_id} changed while this request was applied")
    DB_UNAVAILABLE.labels("contention").inc()
    raise HTTPException(
        503,
        f"{model.__name__} {row_id} kept changing while this update was applied; retry shortly",
        {"Retry-After": "1"},
    )


async def delete_row(conn: AsyncConnection, model: type[Base], row_id: int, preconditions: Preconditions) -> None:
    """Delete the row, if the preconditions hold: one DELETE, conditional on the version; 404 or 412 when none went."""
    match, none_match = preconditions
    params: dict[str, Any] = {"row_id": row_id}
    if match is not None and "*" not in match:
        params["versions"] = versions(match)
    if none_match is not None and "*" not in none_match:
        params["not_versions"] = versions(none_match)
    deleted = first_try_may_have_landed = False
    # If-None-Match: * holds for no existing row: nothing to delete, only the miss to explain.
    if none_match is None or "*" not in none_match:
        statement = delete_statement(model, "versions" in params, "not_versions" in params)
        try:
            deleted = (await conn.execute(statement, params)).rowcount == 1
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            await conn.rollback()  # lets go of the dead connection
            first_try_may_have_landed = True
            deleted = (await conn.execute(statement, params)).rowcount == 1
    if deleted:
        return
    # The read after it only explains the miss; nothing is written after the DELETE.
    if rows := as_dicts(await read(conn, statements(model).one, {"row_id": row_id})):
        raise preconditions.refused(model, rows[0]) or HTTPException(412, f"{model.__name__} {row_id} has changed")
    # Gone: this request's own first try may have deleted it, and then it succeeded.
    if not first_try_may_have_landed:
        raise HTTPException(404, f"{model.__name__} {row_id} does not exist")


# MySQL and MariaDB name the index, last in the message ("Duplicate entry 'x' for key
# 'users.uq_users_email_key'"; MySQL 8 puts the table before it); the value before it is the
# client's, so only the end is read. SQLite names the columns ("UNIQUE constraint failed: users.email_key").
MYSQL_DUPLICATE = re.compile(r"for key '(?:[^'.]*\.)?([^'.]+)'$")
SQLITE_UNIQUE = re.compile(r"^UNIQUE constraint failed: (.+)$")


def conflict(model: type[Base], exc: IntegrityError, conflicts: Mapping[str, str]) -> HTTPException:
    """The 409 for the unique constraint exc broke, if the caller named it; else exc itself, re-raised: a bug."""
    name = broken_unique_constraint(table_of(model), exc)
    if name is None or name not in conflicts:
        raise exc
    return HTTPException(409, conflicts[name])


def broken_unique_constraint(table: Table, exc: IntegrityError) -> str | None:
    """The name of the unique constraint of table that exc reports broken, if it is one."""
    args = getattr(exc.orig, "args", ())
    message = str(args[-1]) if args else ""
    if found := MYSQL_DUPLICATE.search(message):
        return found[1]
    if found := SQLITE_UNIQUE.search(message):
        columns = {column.rpartition(".")[2] for column in found[1].split(", ")}
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint) and {c.name for c in constraint.columns} == columns:
                return str(constraint.name)
    return None
