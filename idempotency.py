"""Idempotency-Key: the first answer to a keyed POST or PATCH, kept and replayed to its retries.

draft-ietf-httpapi-idempotency-key-header, as API.md states it: the key, the write and its
answer land together in one transaction; a retry with the key gets that answer again, marked
Idempotent-Replayed; keys belong to the API key that sent them and expire after
IDEMPOTENCY_TTL_HOURS, when every worker purges them a batch at a time.
"""

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from hashlib import blake2b
from typing import Annotated, Any

from fastapi import Header, HTTPException, Request, Response
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import Row, bindparam, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from crud import broken_unique_constraint, table_of
from database import read, set_isolation
from models import IdempotencyKey as Kept
from problems import problem
from replicas import HEADER as CONSISTENCY_TOKEN
from replicas import Replicas
from settings import settings

log = logging.getLogger("users.idempotency")

# A structured-field string ("...") as the draft writes it, or bare as Stripe's clients send it.
KEY = re.compile(r'"([A-Za-z0-9._:-]{1,255})"|([A-Za-z0-9._:-]{1,255})')
# draft-ietf-httpapi-idempotency-key-header, as the routes declare it.
IdempotencyKeyHeader = Annotated[
    str | SkipJsonSchema[None],
    Header(
        alias="Idempotency-Key",
        description="Makes a retry safe: the first answer is kept for IDEMPOTENCY_TTL_HOURS and "
        "replayed to every request with the same key. 1 to 255 of `A-Za-z0-9-_.:`, bare or quoted.",
        # Documented, not validated by FastAPI: a malformed key is 400 (API.md), not 422.
        json_schema_extra={"pattern": f"^(?:{KEY.pattern})$", "maxLength": 257},
    ),
]
# The errors kept with a key (API.md); a 422 or a 5xx is not, so the fixed or retried request runs.
KEPT_ERRORS = {404, 409, 412}
# The headers of an answer that are kept with it and replayed.
KEPT_HEADERS = ("Location", "ETag")

SELECT_KEPT = select(
    Kept.id, Kept.fingerprint, Kept.status, Kept.location, Kept.etag, Kept.body, Kept.consistency_token, Kept.created_at
)
SELECT_KEPT = SELECT_KEPT.where(Kept.owner == bindparam("owner"), Kept.key == bindparam("key"))
INSERT_KEPT = insert(Kept)
UPDATE_KEPT = update(Kept).where(Kept.id == bindparam("kept_id"))
DELETE_KEPT = delete(Kept).where(Kept.id == bindparam("kept_id"))
CLAIM = "uq_idempotency_keys_owner_key"
# What a request asked for, as the bytes its fingerprint is a digest of.
ASKED = json.JSONEncoder(ensure_ascii=False)


async def answer_once(
    conn: AsyncConnection,
    request: Request,
    key_header: str,
    asked: dict[str, Any],
    work: Callable[[], Awaitable[Response]],
) -> Response:
    """Answer a request with an Idempotency-Key: the first time by running work(), then by replaying that answer.

    The key is claimed, the write made and its answer kept in one transaction, so that they
    land together or not at all. A second request with the key, on any worker or container,
    waits at the claim (the unique index) until the first one commits, then replays its answer.
    `asked`: what the request asks for, beyond its method and path (its body, its If-Match).
    """
    match = KEY.fullmatch(key_header)
    if match is None:
        raise HTTPException(400, "An Idempotency-Key is 1 to 255 characters of A-Z a-z 0-9 - _ . : (bare or quoted)")
    # Whose key: the API key that the key check matched, so that no client can replay another's answer.
    where = {"owner": request.state.key_owner, "key": match[1] or match[2]}
    asked_for = ASKED.encode([request.method, request.url.path, asked]).encode()
    fingerprint = blake2b(asked_for, digest_size=32).hexdigest()  # 64 hex digits, the column's width
    replicas: Replicas = request.state.replicas
    kept = (await read(conn, SELECT_KEPT, where)).first()
    if kept is not None and kept.created_at > key_expiry():
        return await replay(kept, fingerprint, conn, replicas)

    await conn.commit()  # ends the autocommit read, so the connection may leave autocommit
    # READ COMMITTED, so that PATCH's compare-and-swap sees each new version; SQLite has only this one.
    await set_isolation(conn, "SERIALIZABLE" if conn.dialect.name == "sqlite" else "READ COMMITTED")
    answer: Response | None = None  # stays None if the claim loses
    try:
        # The transaction: the claim, the write and the answer kept, committed together.
        async with conn.begin():
            if kept is not None:  # expired: the key is new again
                await conn.execute(DELETE_KEPT, {"kept_id": kept.id})
            claim = {**where, "fingerprint": fingerprint, "status": 0, "body": "", "created_at": datetime.now(UTC)}
            kept_id = (await conn.execute(INSERT_KEPT, claim)).lastrowid
            try:
                answer = await work()
            except HTTPException as exc:
                if exc.status_code not in KEPT_ERRORS:
                    raise
                answer = problem(exc.status_code, exc.detail)
            kept_answer = {"status": answer.status_code, "body": bytes(answer.body).decode()}
            kept_answer |= {name.lower(): answer.headers.get(name) for name in KEPT_HEADERS}
            await conn.execute(UPDATE_KEPT, {"kept_id": kept_id, **kept_answer})
    except IntegrityError as exc:
        if broken_unique_constraint(table_of(Kept), exc) != CLAIM:
            raise
        # The claim lost: another request with this key has committed its answer meanwhile.
    finally:
        if not conn.invalidated:  # back to autocommit, for the statements after this and the pool
            await set_isolation(conn, "AUTOCOMMIT")
    if answer is not None:
        if answer.status_code < 300:
            # Read after the commit, which gives the write its GTID; kept for the replays, in a
            # write of its own. Should that fail, the write is made all the same: the replays
            # then name the primary's state as they find it, which includes it.
            token = answer.headers[CONSISTENCY_TOKEN] = await replicas.token(conn)
            if token != replicas.no_position:
                with suppress(DBAPIError):
                    await conn.execute(UPDATE_KEPT, {"kept_id": kept_id, "consistency_token": token})
        return answer
    kept = (await read(conn, SELECT_KEPT, where)).first()
    if kept is None:
        raise HTTPException(409, "A request with this Idempotency-Key is still being processed; retry shortly")
    return await replay(kept, fingerprint, conn, replicas)


async def replay(kept: Row[Any], fingerprint: str, conn: AsyncConnection, replicas: Replicas) -> Response:
    """The answer kept with an Idempotency-Key, again; 422 if the key was sent with another request."""
    if kept.fingerprint != fingerprint:
        raise HTTPException(422, "This Idempotency-Key was sent with another request; a new request needs a new key")
    headers = {"Idempotent-Replayed": "true"}
    if kept.location:
        headers["Location"] = kept.location
    if kept.etag:
        headers["ETag"] = kept.etag
    if 200 <= kept.status < 300:
        # None kept: no replicas then, or the first answer's token could not be kept; the primary's
        # state now includes the write all the same.
        headers[CONSISTENCY_TOKEN] = kept.consistency_token or await replicas.token(conn)
    media_type = "application/problem+json" if kept.status >= 400 else "application/json"
    return Response(kept.body, kept.status, headers, media_type=media_type)


def owner(api_key: bytes) -> str:
    """Whose keys: a digest of the API key, never the key, 32 hex digits (the column's width).

    The digest of `Bearer <key>`, as the header was hashed before any spelling was accepted: a
    client that retries across that deploy finds the keys it kept.
    """
    return blake2b(b"Bearer " + api_key, digest_size=16).hexdigest()


def key_expiry() -> datetime:
    """The creation time before which an Idempotency-Key has expired."""
    return datetime.now(UTC) - timedelta(hours=settings.idempotency_ttl_hours)


# Seconds between two purges of expired Idempotency-Keys, on average, in each worker.
PURGE_INTERVAL = 300.0
# Keys one DELETE removes at most, so that no purge holds locks that user writes wait on for long.
PURGE_BATCH = 500


async def purge_expired_keys(engine: AsyncEngine) -> None:
    """Now and then, delete the Idempotency-Keys older than IDEMPOTENCY_TTL_HOURS; runs in every worker.

    That is safe with any number of workers: each batch is deleted by primary key in a
    statement of its own, so two workers on the same batch delete it once between them.
    """
    while True:
        # Jittered, so that the workers of a fleet started together do not purge together.
        await asyncio.sleep(PURGE_INTERVAL * random.uniform(0.5, 1.5))
        try:
            async with asyncio.timeout(PURGE_INTERVAL / 10):
                await delete_expired_keys(engine)
        except (TimeoutError, PoolTimeoutError, DBAPIError) as exc:
            log.warning("purging expired idempotency keys failed, next time then: %s", type(exc).__name__)


async def delete_expired_keys(engine: AsyncEngine, batch: int = PURGE_BATCH) -> int:
    """Delete expired Idempotency-Keys, a batch at a time; return how many."""
    select_batch = select(Kept.id).where(Kept.created_at < bindparam("cutoff")).order_by(Kept.created_at).limit(batch)
    deleted = 0
    async with engine.connect() as conn:
        while True:
            ids = (await conn.execute(select_batch, {"cutoff": key_expiry()})).scalars().all()
            if ids:  # in autocommit, each batch is committed on its own
                await conn.execute(delete(Kept).where(Kept.id.in_(ids)))
            deleted += len(ids)
            if len(ids) < batch:
                return deleted
