"""Create the tables, or adopt those of a database made before migrations.

Revision ID: 0001
Revises:
Create Date: 2026-12-06

Before migrations the tables were made by create_all (in development, and in gunicorn's master)
or by compose's initdb/01-schema.sql, and no alembic_version was. A table found here is adopted
with its rows: on MySQL and MariaDB its indexes are renamed to the names models.py's convention
gives them (initdb's unique indexes were named email_key and owner); on SQLite, which renames no
constraint in place, it is made anew and its rows copied. Either way it ends exactly as this
revision creates it, so that `alembic upgrade head` is the one command for every database.
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import SchemaItem

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The types of models.py as they are at this revision; a revision never imports models.py.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def text_bin(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def users() -> list[SchemaItem]:
    return [
        sa.Column("id", Id, nullable=False),
        sa.Column("email", text_bin(254), nullable=False),
        sa.Column("email_key", text_bin(254), nullable=False),
        sa.Column("name", text_bin(100), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email_key", name=op.f("uq_users_email_key")),
    ]


def idempotency_keys() -> list[SchemaItem]:
    return [
        sa.Column("id", Id, nullable=False),
        sa.Column("owner", sa.String(32), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("location", sa.String(64), nullable=True),
        sa.Column("etag", sa.String(32), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("owner", "key", name=op.f("uq_idempotency_keys_owner_key")),
        sa.Index(op.f("ix_idempotency_keys_created_at"), "created_at"),
    ]


UTF8MB4_BIN = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
# Each table's columns, constraints and indexes, and its options.
TABLES: dict[str, tuple[Callable[[], list[SchemaItem]], dict[str, Any]]] = {
    "users": (users, {**UTF8MB4_BIN, "sqlite_autoincrement": True}),
    "idempotency_keys": (idempotency_keys, UTF8MB4_BIN),
}


def upgrade() -> None:
    # Offline (`alembic upgrade head --sql`) there is no database to look at: the SQL is an empty one's.
    found = set() if context.is_offline_mode() else set(sa.inspect(op.get_bind()).get_table_names())
    for name in TABLES:
        if name not in found:
            create(name)
        elif op.get_bind().dialect.name == "sqlite":
            adopt_on_sqlite(name)
        else:
            adopt_on_mysql(name)


def downgrade() -> None:
    op.drop_table("users")
    op.drop_table("idempotency_keys")


def create(name: str) -> None:
    items, options = TABLES[name]
    op.create_table(name, *items(), **options)


def as_created(name: str) -> sa.Table:
    """The table as create() makes it, in a metadata of its own, to read its columns and index names from."""
    items, options = TABLES[name]
    return sa.Table(name, sa.MetaData(), *items(), **options)


def check_columns(name: str) -> None:
    """Refuse a table whose columns are not this revision's: it was not made by this service."""
    found = [column["name"] for column in sa.inspect(op.get_bind()).get_columns(name)]
    expected = [column.name for column in as_created(name).columns]
    if found != expected:
        raise RuntimeError(
            f"table {name} has the columns {found}, not {expected}: it cannot be adopted; "
            "bring it to these columns by hand, then run `alembic upgrade head` again"
        )


def adopt_on_mysql(name: str) -> None:
    """Rename the table's indexes to the names this revision gives them, found by the columns they cover."""
    check_columns(name)
    table = as_created(name)
    indexes: list[sa.UniqueConstraint | sa.Index] = [c for c in table.constraints if isinstance(c, sa.UniqueConstraint)]
    indexes += table.indexes
    wanted: dict[tuple[str | None, ...], str] = {
        tuple(column.name for column in index.columns): str(index.name) for index in indexes
    }
    quote = op.get_bind().dialect.identifier_preparer.quote
    for index in sa.inspect(op.get_bind()).get_indexes(name):
        new = wanted.get(tuple(index["column_names"]))
        if new and index["name"] != new:
            op.execute(f"ALTER TABLE {quote(name)} RENAME INDEX {quote(str(index['name']))} TO {quote(new)}")


def adopt_on_sqlite(name: str) -> None:
    """Make the table anew, under its own name, and copy its rows into it."""
    check_columns(name)
    inspector = sa.inspect(op.get_bind())
    quote = op.get_bind().dialect.identifier_preparer.quote
    columns = ", ".join(quote(column["name"]) for column in inspector.get_columns(name))
    old = f"{name}_before_migrations"
    # Index names are the database's, not the table's: the new table's would clash with the old's.
    for index in inspector.get_indexes(name):
        op.drop_index(str(index["name"]), table_name=name)
    op.rename_table(name, old)
    create(name)
    op.execute(f"INSERT INTO {quote(name)} ({columns}) SELECT {columns} FROM {quote(old)}")
    if as_created(name).dialect_options["sqlite"]["autoincrement"]:
        # The old table's high-water mark, not the copy's: a deleted user's id is never given again.
        op.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :name").bindparams(name=name))
        op.execute(sa.text("UPDATE sqlite_sequence SET name = :name WHERE name = :old").bindparams(name=name, old=old))
    op.drop_table(old)
