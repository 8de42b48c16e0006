"""The schema's revision: the one the code needs, the one a database is at, and the check between them.

The revisions are Alembic's, in migrations/ (alembic.ini beside this file). Production brings a
database to them with `alembic upgrade head`, a deploy step, and gunicorn.conf.py refuses to
start on one that is behind; `python main.py` upgrades its own database (upgrade_to_head), and a
development worker gives an empty users table a few demo users (add_demo_users).
"""

from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import emails
from models import User

UPGRADE = "alembic upgrade head"


def alembic_config() -> Config:
    return Config(Path(__file__).with_name("alembic.ini"))


def head_revision() -> str:
    """Return the revision this code needs: the newest in migrations/versions."""
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


async def database_revision(conn: AsyncConnection) -> str | None:
    """Return the revision the database is at; None for an empty one, or one made before migrations."""
    return await conn.run_sync(lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision())


async def check(conn: AsyncConnection) -> str:
    """Say which revision the database is at; raise RuntimeError when it is behind the code's.

    A revision this code does not know is a later release's: each revision keeps the code before
    it working (README.md, Changing the schema), so that a rollback, or an old replica that
    restarts during a deploy, still starts.
    """
    found, needed = await database_revision(conn), head_revision()
    if found == needed:
        return f"database schema at revision {found}, the code's"
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if found in known or found is None:
        raise RuntimeError(
            f"the database schema is at revision {found or 'none: an empty database, or one made before migrations'}; "
            f"the code needs revision {needed}. Run `{UPGRADE}` first (README.md, Changing the schema)"
        )
    return f"database schema at revision {found}, newer than the code's {needed}: a later release migrated it"


def upgrade_to_head() -> None:
    """Bring settings.py's database to the code's revision, for development; in the app's process, with its logging."""
    config = alembic_config()
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


DEMO_USERS = [
    ("ada@example.com", "Ada Lovelace"),
    ("grace@example.com", "Grace Hopper"),
    ("alan@example.com", "Alan Turing"),
]


async def add_demo_users(engine: AsyncEngine) -> None:
    """Give an empty users table a few demo users (development only: production's start with none)."""
    async with engine.connect() as conn:
        if await conn.scalar(select(func.count()).select_from(User)) == 0:
            now = datetime.now(UTC)
            users = [
                {"email": e, "email_key": emails.key(e), "name": n, "is_active": True, "version": 1}
                for e, n in DEMO_USERS
            ]
            # Several workers may find the table empty at once; the unique index lets one seed it.
            with suppress(IntegrityError):
                await conn.execute(insert(User), [{**user, "created_at": now, "updated_at": now} for user in users])
