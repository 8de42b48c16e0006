"""Add idempotency_keys.consistency_token, the Consistency-Token a replayed answer carries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Nullable: keys kept before it have none, and without replicas none is written (a replay's token,
made again, is the same constant); an expand step alone, which the code before it ignores.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch: SQLite adds a column in place, and MySQL and MariaDB are sent a plain ALTER TABLE.
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.add_column(sa.Column("consistency_token", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.drop_column("consistency_token")
