"""Rewrite stored addresses in one spelling: emails.canonical() and emails.key() of each.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

Before this revision the service stored an address as sent, but for its host name's case: the
local part NFC or NFD, the host name Unicode or an IDNA A-label, and keyed it by str.lower() of
that, so that `José@exämple.com`, its NFD spelling and `José@xn--exmple-cua.com` could be three
users. From it on, every spelling of an address has one stored form and one key (emails.py). This
revision reads every user, in batches by id, and rewrites those stored in another spelling:

- Rows that are now one address (the same new key): one row has the key, the row that holds it
  already if one does (it is in the canonical form, and every spelling finds it today), else the
  oldest (the smallest id). The others keep their email and key as they were: their old keys
  differ from the new one by not being NFC or by an A-label, and key() never gives either, so no
  new write can collide with them, and nothing is lost. Each such group's ids are logged as a
  warning, for an operator to merge. Should the key be held by a row that cannot be converted
  (below), the whole group is left as it is, and logged.
- Rows whose address the validator now refuses (RFC 5893's Bidi Rule across the host name's
  labels, a key over 254 characters, ...) are left as they are, and their ids logged.
- A row whose email changes is updated as any write is: its version (the ETag) is bumped and
  its updated_at set. One whose key alone changes is not: nothing a client sees changed.

It runs in the transaction alembic gives each revision on MariaDB and SQLite: the rows and
alembic_version's step to 0002 are committed together, or not at all. Offline, `alembic upgrade
head --sql` writes nothing for it: that SQL is an empty database's, which has no rows.

The revision imports emails.py rather than a copy of canonical() and key() frozen at this
revision: it derives a column from the code's own rule, and what the unique index must hold is
the key the code at head computes, which a frozen copy would stop being once emails.py changes.
Run later with a later emails.py, it gives that version's forms, which is what the code at head
needs (a later change of the rule brings its own revision to rewrite the rows again, and running
this one first is harmless: a canonical form is its own canonical form). The cost is that a
change of canonical() or key()'s names or signatures must keep this file working; the migration
tests run it from an empty database and from rows in the old spellings, so CI would say so.

Downgrade does nothing: the code before reads a stored address whatever its spelling, and the
canonical forms are valid addresses to it.
"""

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import context, op

import emails

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("migrations")

# Rows read, and ids looked up or written, per statement.
BATCH = 1000
# The columns this revision reads and writes, as they are at it; a revision never imports models.py.
users = sa.table(
    "users",
    sa.column("id", sa.BigInteger()),
    sa.column("email", sa.String()),
    sa.column("email_key", sa.String()),
    sa.column("updated_at", sa.DateTime()),
    sa.column("version", sa.Integer()),
)


@dataclass(frozen=True)
class Change:
    email: str
    key: str
    new_email: str
    new_key: str


def upgrade() -> None:
    if context.is_offline_mode():
        return
    conn = op.get_bind()
    changes, refused = read_users(conn)
    held, cannot = holders(conn, {change.new_key for change in changes.values()}), set(refused)
    groups: defaultdict[str, list[int]] = defaultdict(list)
    for user_id, change in changes.items():
        groups[change.new_key].append(user_id)

    writes = []
    for new_key, ids in groups.items():
        holder = held.get(new_key)
        if holder is None:
            keeper: int | None = min(ids)
        elif holder in ids or (holder not in changes and holder not in cannot):
            keeper = holder  # already keyed so: it stays this address's user
        else:
            keeper = None  # held by a row that cannot be converted, or moves to another key
        if keeper is None:
            log.warning(
                "users %s: their address's new key is held by user %d, which cannot be converted;"
                " left as they are, for an operator to resolve",
                ", ".join(map(str, sorted(ids))),
                holder,
            )
            continue
        members = sorted({*ids, *([holder] if holder is not None else [])})
        if len(members) > 1:
            log.warning(
                "users %s are one address now: user %d has it; the others keep their spelling and key,"
                " for an operator to merge",
                ", ".join(map(str, members)),
                keeper,
            )
        if keeper in changes:
            writes.append((keeper, changes[keeper]))
    for start in range(0, len(refused), BATCH):
        log.warning(
            "left as they are, as the service now refuses their addresses: users %s",
            ", ".join(map(str, refused[start : start + BATCH])),
        )
    write(conn, writes)
    log.info("%d users rewritten in their address's one spelling or key", len(writes))


def downgrade() -> None:
    pass


def read_users(conn: sa.Connection) -> tuple[dict[int, Change], list[int]]:
    """Read every user, in batches by id; return the rows whose email or key changes, and the ids of those refused."""
    changes: dict[int, Change] = {}
    refused: list[int] = []
    after = 0
    query = sa.select(users.c.id, users.c.email, users.c.email_key).order_by(users.c.id).limit(BATCH)
    while batch := conn.execute(query.where(users.c.id > after)).all():
        for user_id, email, key in batch:
            try:
                new_email = emails.canonical(email)
            except ValueError:
                refused.append(user_id)
                continue
            if (new_email, emails.key(new_email)) != (email, key):
                changes[user_id] = Change(email, key, new_email, emails.key(new_email))
        after = batch[-1].id
    return changes, refused


def holders(conn: sa.Connection, keys: set[str]) -> dict[str, int]:
    """Return which user holds each of these keys now, where one does."""
    found: dict[str, int] = {}
    wanted = sorted(keys)
    for start in range(0, len(wanted), BATCH):
        chunk = wanted[start : start + BATCH]
        rows = conn.execute(sa.select(users.c.email_key, users.c.id).where(users.c.email_key.in_(chunk)))
        # Only exact matches: MariaDB's PAD SPACE collations compare "a" and "a " equal.
        found.update((key, user_id) for key, user_id in rows if key in keys)
    return found


def write(conn: sa.Connection, writes: list[tuple[int, Change]]) -> None:
    """Store each row's new email and key; bump the version and updated_at of those whose email changes."""
    now = datetime.now(UTC).replace(tzinfo=None)  # naive UTC, as models.UTCDateTime stores it
    row = users.c.id == sa.bindparam("b_id")
    email_too = (
        sa.update(users)
        .where(row)
        .values(
            email=sa.bindparam("b_email"), email_key=sa.bindparam("b_key"), version=users.c.version + 1, updated_at=now
        )
    )
    key_only = sa.update(users).where(row).values(email_key=sa.bindparam("b_key"))
    emailed = [{"b_id": i, "b_email": c.new_email, "b_key": c.new_key} for i, c in writes if c.new_email != c.email]
    keyed = [{"b_id": i, "b_key": c.new_key} for i, c in writes if c.new_email == c.email]
    for statement, rows in ((email_too, emailed), (key_only, keyed)):
        for start in range(0, len(rows), BATCH):
            conn.execute(statement, rows[start : start + BATCH])
