"""The tables, portable across SQLite, MySQL 8 and MariaDB: `users`, and the `idempotency_keys` kept for retries."""

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The largest id an id column holds: a signed 64-bit integer (BIGINT on MySQL).
MAX_ID = 2**63 - 1
# SQLite only autoincrements an INTEGER PRIMARY KEY; it is 64-bit there anyway.
BigIntId = BigInteger().with_variant(Integer, "sqlite")
# utf8mb4_bin: every Unicode character (emoji included) stored byte for byte, and compared
# exactly, so `café` and `cafe` stay two addresses (the server's default collation folds accents).
Text254 = String(254).with_variant(mysql.VARCHAR(254, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
Text100 = String(100).with_variant(mysql.VARCHAR(100, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


class UTCDateTime(TypeDecorator[datetime]):
    """Store naive UTC with microseconds; hand back aware UTC datetimes."""

    impl = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    # Every constraint and index named by one rule, the same on every database: a 409 finds the
    # unique constraint a write broke by its name (crud.py), and a migration can name what it alters.
    metadata = MetaData(
        naming_convention={
            "pk": "pk_%(table_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        }
    )


class User(Base):
    __tablename__ = "users"
    # sqlite_autoincrement: SQLite otherwise gives a new row the id of the newest deleted one, and
    # a client holding that user's URL and ETag ("1") would read or write a stranger.
    __table_args__ = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    email: Mapped[str] = mapped_column(Text254)
    # The email lower-cased by the service: its unique index makes uniqueness
    # case-insensitive the same way on every database, and decides races for us.
    email_key: Mapped[str] = mapped_column(Text254, unique=True)
    name: Mapped[str] = mapped_column(Text100)
    is_active: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Bumped by every update; the ETag, and the compare-and-swap that makes If-Match exact.
    version: Mapped[int]


class IdempotencyKey(Base):
    """The answer to the first request that sent an Idempotency-Key, so that its retries get it again."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        # Decides between two requests with one key, on every worker and container: one inserts.
        UniqueConstraint("owner", "key"),
        {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"},
    )

    # A number of its own, so that the purge can delete expired keys in batches by primary key.
    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    # Which API key sent it (a hash of it, never the key): one client never replays another's answer.
    owner: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    # What the request asked for (method, path, body): the same key for another request is 422.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int]
    location: Mapped[str | None] = mapped_column(String(64))
    etag: Mapped[str | None] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    # The Consistency-Token of a 2xx answer (replicas.py), written once the write has committed;
    # NULL without replicas, where a replay's token, made again, is the same constant.
    consistency_token: Mapped[str | None] = mapped_column(String(256))
    # Keys expire IDEMPOTENCY_TTL_HOURS after this; the index finds the expired ones to purge.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
