"""GETs read from MariaDB replicas, with read-your-writes by a Consistency-Token (API.md, "Replicas ...").

It owns the replicas' engines; each worker's check, every CHECK_INTERVAL, of each replica's lag,
which keeps a replica out of rotation while it lags past REPLICA_MAX_LAG or does not answer; the
choice of a replica for a read; the token's format, parsing and wait (MASTER_GTID_WAIT); and the
fallback to the primary, within the request, when a replica fails. Without DATABASE_REPLICA_URLS
a write's token is a constant and every read goes to the primary: no round trip is added.

The token is `1.<deployment>.<position>`: the format; a digest of the primary's host, port and
database (never its credentials), the same in every container of a deployment with no state
shared, and another in another deployment, whose tokens are then read from the primary (alone,
MASTER_GTID_WAIT cannot tell: it compares sequence numbers, and every MariaDB starts in domain 0);
and the primary's @@gtid_binlog_pos just after the write, or `none` where it was not read.

The lag is measured by GTID, which needs no privilege (SHOW REPLICA STATUS needs SLAVE MONITOR,
and its Seconds_Behind_Master is NULL while a replication thread is stopped): how long ago the
primary was first seen at a position the replica has not applied; 0 when it has applied them all.
"""

import asyncio
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from hashlib import blake2b
from typing import Annotated, Concatenate, NamedTuple, ParamSpec, TypeVar

from fastapi import Header, HTTPException, Request, Response
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from database import create_engine
from observability import DB_READS, DB_REPLICA_IN_ROTATION, DB_REPLICA_LAG
from settings import Settings

log = logging.getLogger("users.replicas")

# Seconds between two checks of the replicas in each worker: a replica that starts lagging past
# REPLICA_MAX_LAG, or stops answering, is out of rotation at most this much later.
CHECK_INTERVAL = 0.25
# Seconds a replica may take to answer a read (beyond the token's wait) or a check. Short, so that
# a read it fails falls back to the primary and still answers within 2 s; long enough for a busy
# worker's own event loop to get round to the answer.
REPLICA_TIMEOUT = 0.5
# The primary's positions kept for the lag, at most one per check: minutes of a replica that is out.
KEPT_POSITIONS = 1000

HEADER = "Consistency-Token"
MAX_TOKEN = 256
# A token's form in the contract (API.md): anything else is 400; a token of this form that is not
# one of this deployment's, or that MariaDB could not read, is read from the primary.
OPAQUE = re.compile(r"[A-Za-z0-9._:,-]{1,256}")
# One GTID: domain, server id (32-bit each) and sequence number (64-bit); the ranges, which a
# pattern cannot say, parse_token() checks before any SQL.
GTID = r"(?:0|[1-9][0-9]{0,9})-(?:0|[1-9][0-9]{0,9})-(?:0|[1-9][0-9]{0,19})"
TOKEN = re.compile(rf"1\.([0-9a-f]{{12}})\.(none|{GTID}(?:,{GTID})*)")
ConsistencyTokenHeader = Annotated[
    str | SkipJsonSchema[None],
    Header(
        alias=HEADER,
        description="The Consistency-Token of a write's answer, sent back unchanged: this read then "
        "sees that write, or a later state.",
        # Documented, not validated by FastAPI: a malformed token is 400 (API.md), not 422.
        json_schema_extra={"pattern": f"^{OPAQUE.pattern}$", "maxLength": MAX_TOKEN},
    ),
]

POSITION = text("SELECT @@gtid_binlog_pos")
# On a replica: what it has applied, which is what MASTER_GTID_WAIT compares with.
REPLICA_STATE = text("SELECT @@gtid_slave_pos, VERSION()")
GTID_WAIT = text("SELECT MASTER_GTID_WAIT(:position, :seconds)")

# Where a read went instead of a replica: no position to wait for or not applied in time; the replica failed.
FALLBACKS = ("primary_token", "primary_fallback")
P = ParamSpec("P")
T = TypeVar("T")
# A connection to the primary, lent for as long as the `async with` lasts (main.connect()).
Lend = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
# A read: crud.get_row, crud.get_page, run on the connection given first.
Work = Callable[Concatenate[AsyncConnection, P], Awaitable[T]]


class Token(NamedTuple):
    deployment: str
    position: str | None  # as MariaDB writes it; None when the token names no position
    sequences: dict[int, int]  # the last sequence number of each domain, all MASTER_GTID_WAIT compares


def parse_token(header: str) -> Token:
    """The token a client sent back; 400 when it is not of the contract's form (OPAQUE)."""
    if not OPAQUE.fullmatch(header):
        raise HTTPException(400, f"A {HEADER} is 1 to 256 of A-Z a-z 0-9 - _ . : , as a write's answer carried it")
    match = TOKEN.fullmatch(header)
    gtids = [tuple(map(int, gtid.split("-"))) for gtid in match[2].split(",")] if match and match[2] != "none" else []
    sequences = {domain: sequence for domain, _, sequence in gtids}
    # Not a token this service makes, numbers past MariaDB's (MASTER_GTID_WAIT refuses them with
    # error 1941), or a domain twice: no position to wait for, and never sent to a replica.
    if match is None or len(sequences) < len(gtids) or any(d >= 2**32 or s >= 2**32 or n >= 2**64 for d, s, n in gtids):
        return Token(match[1] if match else "", None, {})
    return Token(match[1], match[2] if gtids else None, sequences)


def sequences_of(position: str) -> dict[int, int]:
    """A GTID position ("0-1-42,1-2-7") as the last sequence number of each domain."""
    return {int(gtid.split("-")[0]): int(gtid.split("-")[2]) for gtid in position.split(",") if gtid}


def reached(applied: dict[int, int], sequences: dict[int, int]) -> bool:
    """Whether a server that has applied `applied` has every write of `sequences`, as MASTER_GTID_WAIT decides."""
    return all(applied.get(domain, -1) >= sequence for domain, sequence in sequences.items())


def deployment_of(database_url: str) -> str:
    """12 hex digits naming the primary, from its host, port and database in the URL, never its credentials."""
    url = make_url(database_url)
    place = f"{url.host}:{url.port or 3306}/{url.database}" if url.host else str(url.database)
    return blake2b(place.encode(), digest_size=6).hexdigest()


def refuse_unless_mariadb(version: str) -> None:
    """Stop the start when DATABASE_URL's server is not MariaDB: replicas are read and waited on by MariaDB's GTIDs."""
    if "MariaDB" not in version:
        raise RuntimeError(
            f"DATABASE_REPLICA_URLS needs MariaDB, and DATABASE_URL's server is {version} (MySQL): replicas are "
            "waited on by MariaDB's GTIDs; MySQL's (WAIT_FOR_EXECUTED_GTID_SET) is not supported, as no test here "
            "can run it. Leave DATABASE_REPLICA_URLS empty"
        )


class Replica:
    """One replica: its engine, and what this worker's checks found of it."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.name = f"{make_url(url).host}:{make_url(url).port or 3306}"
        self.engine = create_engine(
            url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            recycle=settings.db_pool_recycle,
            pool_timeout=REPLICA_TIMEOUT,
            timeout=REPLICA_TIMEOUT,
            name=f"replica {self.name}",
        )
        self.in_rotation = False
        self.out_because: str | None = "not checked yet"
        self.applied: dict[int, int] = {}  # its @@gtid_slave_pos, at the last check it answered


class NotApplied(Exception):
    """The replica had not applied the token's write within REPLICA_WAIT."""


class Replicas:
    """This worker's replicas of the primary (DATABASE_REPLICA_URLS); without any, a write's token is a constant."""

    def __init__(self, settings: Settings, primary: AsyncEngine) -> None:
        self.primary = primary
        self.deployment = deployment_of(settings.database_url)
        # The token of a write whose position was not read: its reads go to the primary.
        self.no_position = f"1.{self.deployment}.none"
        self.wait, self.max_lag = settings.replica_wait, settings.replica_max_lag
        self.replicas = [Replica(url.get_secret_value(), settings) for url in settings.database_replica_urls]
        self.engines = {f"replica {replica.name}": replica.engine for replica in self.replicas}
        # When the primary was first seen at each position, oldest first; see the module's docstring.
        self.positions: deque[tuple[float, dict[int, int]]] = deque(maxlen=KEPT_POSITIONS)
        self.turn = itertools.count()
        self.checking: asyncio.Task[None] | None = None
        self.primary_failing = False
        # Bound here, in the worker: gunicorn's master, which imports the metrics too, writes none.
        self.count = {where: DB_READS.labels(where).inc for where in ("replica", "primary", *FALLBACKS)}

    async def start(self) -> None:
        """Refuse a primary that is not MariaDB; check the replicas, then again every CHECK_INTERVAL."""
        if not self.replicas:
            return
        try:
            async with asyncio.timeout(REPLICA_TIMEOUT * 4), self.primary.connect() as conn:
                version = await conn.scalar(text("SELECT VERSION()"))
        except (DBAPIError, TimeoutError) as exc:
            # Not a reason to stop a worker; the checks read the primary's position, which MySQL has not.
            log.warning("replicas: the primary does not answer at start (%s); they get reads once it does", exc)
        else:
            refuse_unless_mariadb(version)
        await self.check()
        self.checking = asyncio.create_task(self.check_every_interval())

    async def close(self) -> None:
        if self.checking is not None:
            self.checking.cancel()
            await asyncio.gather(self.checking, return_exceptions=True)
        for replica in self.replicas:
            await replica.engine.dispose()

    # --- Writes: the token -------------------------------------------------------------------

    async def token(self, conn: AsyncConnection) -> str:
        """The Consistency-Token of a write just made on conn: the primary's position now, which includes it."""
        if not self.replicas:
            return self.no_position
        try:
            async with asyncio.timeout(REPLICA_TIMEOUT):
                position = await conn.scalar(POSITION)
        except (DBAPIError, TimeoutError) as exc:
            # The write is made, and is answered so; with this token its reads go to the primary.
            log.warning("replicas: no position for a write's token (%s: %s)", type(exc).__name__, exc)
            return self.no_position
        token = f"1.{self.deployment}.{position}"
        return token if position and len(token) <= MAX_TOKEN else self.no_position

    # --- Reads: which server, and the fallback -----------------------------------------------

    def read(self, primary: Lend, header: str | None) -> "Read":
        """A GET's reads, for the token it sent (400 when malformed, with replicas or without)."""
        return Read(self, primary, None if header is None else parse_token(header))

    def choose(self) -> Replica | None:
        """The next replica in rotation, in turn; None when none is."""
        serving = [replica for replica in self.replicas if replica.in_rotation]
        return serving[next(self.turn) % len(serving)] if serving else None

    def take_out(self, replica: Replica, because: str, detail: object = "") -> None:
        """No more reads for the replica until a check finds it answering, and lagging at most REPLICA_MAX_LAG."""
        if replica.out_because != because:
            detail = f"{type(detail).__name__}: {detail}" if isinstance(detail, Exception) else detail
            log.warning("replica %s is out of rotation: %s (%s)", replica.name, because, detail)
        replica.in_rotation, replica.out_because = False, because
        DB_REPLICA_IN_ROTATION.labels(replica.name).set(0)

    # --- The check, in each worker -------------------------------------------------------------

    async def check_every_interval(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            await self.check()

    async def check(self) -> None:
        """Note the primary's position, then each replica's: its lag, and whether it gets reads."""
        seen = time.monotonic()
        try:
            async with asyncio.timeout(REPLICA_TIMEOUT), self.primary.connect() as conn:
                position = sequences_of(await conn.scalar(POSITION) or "")
        except (DBAPIError, TimeoutError, PoolTimeoutError) as exc:
            # The lag is then measured against the positions seen last; /readyz reports the outage.
            if not self.primary_failing:
                log.warning("replicas: the primary's position cannot be read: %s: %s", type(exc).__name__, exc)
            self.primary_failing = True
        else:
            self.primary_failing = False
            if not self.positions or self.positions[-1][1] != position:
                self.positions.append((seen, position))
        await asyncio.gather(*(self.check_replica(replica) for replica in self.replicas))
        # Positions every replica has applied are needed no more; the newest is, to compare with.
        while len(self.positions) > 1 and all(reached(r.applied, self.positions[0][1]) for r in self.replicas):
            self.positions.popleft()

    async def check_replica(self, replica: Replica) -> None:
        """Measure the replica's lag; put it in rotation, or take it out."""
        try:
            async with asyncio.timeout(REPLICA_TIMEOUT), replica.engine.connect() as conn:
                applied, version = (await conn.execute(REPLICA_STATE)).one()
        except (DBAPIError, TimeoutError, PoolTimeoutError) as exc:
            self.take_out(replica, "it does not answer", exc)
            answered = False
        else:
            if "MariaDB" not in version:
                return self.take_out(replica, f"it is {version}, not MariaDB")
            replica.applied, answered = sequences_of(applied), True
        now = time.monotonic()
        # Since the primary was first seen at a position the replica had not applied, as far as known.
        lag = next((now - seen for seen, position in self.positions if not reached(replica.applied, position)), 0.0)
        DB_REPLICA_LAG.labels(replica.name).set(lag)
        if not answered:
            return
        if lag > self.max_lag:
            self.take_out(replica, f"it lags more than REPLICA_MAX_LAG ({self.max_lag} s)", f"{lag:.1f} s")
        elif replica.out_because is not None:
            log.info("replica %s is in rotation (lag %.2f s)", replica.name, lag)
            replica.in_rotation, replica.out_because = True, None
            DB_REPLICA_IN_ROTATION.labels(replica.name).set(1)


class Read:
    """A GET's reads: each on a replica that has the client's writes, else on the primary."""

    def __init__(self, replicas: Replicas, primary: Lend, token: Token | None) -> None:
        self.replicas, self.primary, self.token = replicas, primary, token

    async def __call__(self, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """work(conn, ...) on a replica, or on the primary; if the replica fails meanwhile, again on the primary.

        A read runs again as a whole: it writes nothing, so running it twice is safe.
        """
        replicas, token = self.replicas, self.token
        if replicas.replicas:
            replica = replicas.choose()
            if token is not None and (token.deployment != replicas.deployment or token.position is None):
                where = "primary_token"  # no position these replicas could wait for
            elif replica is None:
                where = "primary"
            else:
                try:
                    result = await self.on_replica(replica, work, *args, **kwargs)
                except HTTPException:  # the read's own answer (404): served
                    replicas.count["replica"]()
                    raise
                except NotApplied:
                    where = "primary_token"
                except PoolTimeoutError:  # every connection to it busy: no sign that it is out
                    where = "primary_fallback"
                except (DBAPIError, TimeoutError) as exc:
                    replicas.take_out(replica, "it failed a read", exc)
                    where = "primary_fallback"
                else:
                    replicas.count["replica"]()
                    return result
            replicas.count[where]()
        async with self.primary() as conn:
            return await work(conn, *args, **kwargs)

    async def on_replica(self, replica: Replica, work: Work[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """work(conn, ...) on the replica, once it has the token's write; NotApplied if not within REPLICA_WAIT."""
        token, wait = self.token, self.replicas.wait
        # Most tokens name a write the last check found applied already: no wait, no round trip.
        position = token.position if token is not None and not reached(replica.applied, token.sequences) else None
        async with asyncio.timeout(REPLICA_TIMEOUT + (wait if position else 0)), replica.engine.connect() as conn:
            if position and await conn.scalar(GTID_WAIT, {"position": position, "seconds": wait}) != 0:
                raise NotApplied
            return await work(conn, *args, **kwargs)


async def stamp(answer: Response, conn: AsyncConnection, request: Request) -> Response:
    """Give a write's successful answer its Consistency-Token: the primary's state just after the write on conn."""
    replicas: Replicas = request.state.replicas
    answer.headers[HEADER] = await replicas.token(conn)
    return answer
