"""Alembic's environment: the database is settings.py's DATABASE_URL, the tables are models.py's."""

import asyncio
import logging
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import models
from logs import log_formatter
from settings import settings

config = context.config
# schema.py runs migrations inside the app's process, whose logging is the app's: it says no.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)
    if settings.environment == "production":
        # Every line on stderr in production is one JSON object (logs.py), the migrate step's too.
        for handler in logging.getLogger().handlers:
            handler.setFormatter(log_formatter(settings.environment))


def number_revision(migration_context: MigrationContext, revision: Any, directives: list[MigrationScript]) -> None:
    """Give a new revision the next number after head (0002, 0003, ...), so that ids and file names read in order."""
    head = ScriptDirectory.from_config(config).get_current_head()
    directives[0].rev_id = f"{int(head or 0) + 1:04d}"


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Write UTCDateTime in a revision as the column type it stores, so that no revision imports models.py."""
    if type_ == "type" and isinstance(obj, models.UTCDateTime):
        autogen_context.imports.add("from sqlalchemy.dialects import mysql")
        return "sa.DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')"
    return False


def configure(**options: Any) -> None:
    context.configure(
        target_metadata=models.Base.metadata,
        compare_type=True,
        process_revision_directives=number_revision,
        render_item=render_item,
        **options,
    )


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name in ("mysql", "mariadb"):
        # Several containers may migrate at once (an init container in each pod): one runs the
        # revisions, the others wait here, then find the database at head. Held until disconnect.
        if connection.scalar(text("SELECT GET_LOCK(CONCAT('alembic:', DATABASE()), 600)")) != 1:
            raise RuntimeError("another `alembic upgrade` held the migration lock for 10 minutes")
        connection.commit()
    # SQLite alters a table only by copying it: batch mode writes revisions that way.
    configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(settings.database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    # `alembic upgrade head --sql`: the SQL for an empty database, for a DBA to review or run.
    configure(url=settings.database_url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_migrations_online())
