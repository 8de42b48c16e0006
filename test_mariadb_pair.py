"""The MariaDB facts behind reads from replicas with read-your-writes (API.md, "Replicas and read-your-writes").

A write's Consistency-Token is the primary's GTID after it; a GET that sends it back waits on a
replica with MASTER_GTID_WAIT; a replica that lags, or is killed, gets no reads. These tests pin
what MariaDB 10.11 and aiomysql do at each of those steps, on a real primary and replica that
mariadb_pair.MariaDBPair starts for this module, through SQLAlchemy's asyncio engine in
autocommit, as the service connects. Each test leaves the replica running and caught up.
"""

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pymysql  # type: ignore[import-untyped]  # PyMySQL ships no type hints
import pytest
import uvloop
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from mariadb_pair import PRIMARY_SERVER_ID, MariaDBPair, program

GTID = re.compile(r"(\d+)-(\d+)-(\d+)")
# The primary's GTID domain: MariaDB's default; 7 is a domain no server of the pair writes.
DOMAIN = 0
# A sequence number the primary will not reach during the tests.
FAR_AHEAD = 10**9
# API.md's REPLICA_WAIT default.
REPLICA_WAIT = 0.25


@pytest.fixture(scope="module")
def pair() -> Iterator[MariaDBPair]:
    """A primary and its replica, with a table of items, for the whole module."""
    if program("mariadbd") is None or program("mariadb-install-db") is None:
        pytest.skip("mariadbd and mariadb-install-db are not on PATH: the MariaDB replication tests did not run")
    with MariaDBPair(gtid_domain_id=DOMAIN) as pair:
        pair.primary.query("CREATE TABLE test.items (id BIGINT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(50))")
        pair.wait_replica_caught_up()
        yield pair


@pytest.fixture(autouse=True)
def replica_restored(pair: MariaDBPair) -> Iterator[None]:
    """After each test, the replica running again, replicating at once, and caught up."""
    yield
    assert pair.replica.process is not None
    if pair.replica.process.poll() is None:
        pair.resume_replica()
    else:
        pair.restart_replica()
    status = pair.replica_status()
    if ("Yes", "Yes", 0) != (status["Slave_IO_Running"], status["Slave_SQL_Running"], status["SQL_Delay"]):
        pair.set_replica_delay(0)  # restarts both replication threads, whichever a test stopped
    pair.wait_replica_caught_up()


@pytest.fixture
async def primary(pair: MariaDBPair) -> AsyncIterator[AsyncEngine]:
    """An engine on the primary, as the service's: each test's connections are new sessions."""
    engine = create_async_engine(pair.primary_url, isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()


@pytest.fixture
async def replica(pair: MariaDBPair) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pair.replica_url, isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()


async def value(conn: AsyncConnection, sql: str, **params: Any) -> Any:
    return (await conn.execute(text(sql), params)).scalar_one()


async def write(primary: AsyncEngine) -> str:
    """Insert an item on the primary; return the GTID of that write."""
    async with primary.connect() as conn:
        await conn.execute(text("INSERT INTO items (name) VALUES ('written')"))
        gtid: str = await value(conn, "SELECT @@last_gtid")
        return gtid


async def gtid_wait(replica: AsyncEngine, position: str | None, seconds: float = REPLICA_WAIT) -> Any:
    """MASTER_GTID_WAIT(position, seconds) on a new connection: 0, -1 or None."""
    async with replica.connect() as conn:
        return await value(conn, "SELECT MASTER_GTID_WAIT(:position, :seconds)", position=position, seconds=seconds)


def mysql_error(exc: OperationalError) -> tuple[int, str]:
    """The MySQL error number and message of the driver's error that SQLAlchemy wrapped."""
    assert isinstance(exc.orig, pymysql.err.OperationalError)
    code, message = exc.orig.args
    return code, message


# --- The token: the primary's GTID after a write ---------------------------------------------


async def test_an_autocommit_write_names_its_gtid_in_last_gtid_of_its_session(
    pair: MariaDBPair, primary: AsyncEngine
) -> None:
    """@@last_gtid is the write's GTID (domain-server_id-sequence), in its session only; @@gtid_binlog_pos has it."""
    async with primary.connect() as conn, primary.connect() as other:
        before = await value(conn, "SELECT @@gtid_binlog_pos")
        assert "" == await value(conn, "SELECT @@last_gtid")
        await conn.execute(text("INSERT INTO items (name) VALUES ('first')"))
        gtid = await value(conn, "SELECT @@last_gtid")

        match = GTID.fullmatch(gtid)
        assert match is not None, gtid
        domain, server_id, sequence = map(int, match.groups())
        assert (DOMAIN, PRIMARY_SERVER_ID) == (domain, server_id)
        assert int(before.rsplit("-", 1)[1]) + 1 == sequence  # one domain, so one GTID in the position
        assert gtid in (await value(conn, "SELECT @@gtid_binlog_pos")).split(",")
        assert "" == await value(other, "SELECT @@last_gtid")
        assert gtid == await value(other, "SELECT @@gtid_binlog_pos")


async def test_a_write_that_changes_no_row_leaves_last_gtid_as_it_was(primary: AsyncEngine) -> None:
    """In ROW format an UPDATE or DELETE of no row, or a refused INSERT, writes no GTID: @@last_gtid stays."""
    async with primary.connect() as conn:
        gtid = await write(primary)  # another session's write, so the primary's position is known
        await conn.execute(text("INSERT INTO items (id, name) VALUES (:id, 'kept')"), {"id": FAR_AHEAD})
        own = await value(conn, "SELECT @@last_gtid")
        assert own != gtid

        await conn.execute(text("UPDATE items SET name = 'x' WHERE id = -1"))
        await conn.execute(text("DELETE FROM items WHERE id = -1"))
        await conn.execute(text("UPDATE items SET name = 'kept' WHERE id = :id"), {"id": FAR_AHEAD})  # same value
        with pytest.raises(IntegrityError, match="1062"):
            await conn.execute(text("INSERT INTO items (id, name) VALUES (:id, 'again')"), {"id": FAR_AHEAD})
        await conn.execute(text("SELECT * FROM items"))

        assert own == await value(conn, "SELECT @@last_gtid")
        assert own == await value(conn, "SELECT @@gtid_binlog_pos")
        await conn.execute(text("DELETE FROM items WHERE id = :id"), {"id": FAR_AHEAD})


async def test_a_transaction_names_its_gtid_in_last_gtid_only_after_commit(primary: AsyncEngine) -> None:
    """Inside BEGIN ... COMMIT @@last_gtid is still the session's earlier one; after COMMIT, the transaction's."""
    async with primary.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.execute(text("INSERT INTO items (name) VALUES ('in a transaction')"))
            assert "" == await value(conn, "SELECT @@last_gtid")
        gtid = await value(conn, "SELECT @@last_gtid")
        assert GTID.fullmatch(gtid) is not None, gtid
        assert gtid == await value(conn, "SELECT @@gtid_binlog_pos")


# --- Waiting for it on the replica: MASTER_GTID_WAIT ------------------------------------------


async def test_master_gtid_wait_is_0_once_the_replica_applied_the_write(
    pair: MariaDBPair, primary: AsyncEngine, replica: AsyncEngine
) -> None:
    """0 when the write is applied, at once or after waiting; the replica's @@gtid_slave_pos is then that GTID."""
    gtid = await write(primary)

    assert 0 == await gtid_wait(replica, gtid, seconds=10)
    assert 0 == await gtid_wait(replica, gtid, seconds=0)
    async with replica.connect() as conn:
        assert gtid == await value(conn, "SELECT @@gtid_slave_pos")


async def test_master_gtid_wait_is_minus_1_after_the_timeout_while_the_sql_thread_is_stopped(
    pair: MariaDBPair, primary: AsyncEngine, replica: AsyncEngine
) -> None:
    """-1 after waiting the whole timeout for a write the replica received but does not apply; 0 once it does."""
    pair.stop_replica_sql_thread()
    gtid = await write(primary)

    started = time.monotonic()
    assert -1 == await gtid_wait(replica, gtid)
    assert REPLICA_WAIT <= time.monotonic() - started
    assert -1 == await gtid_wait(replica, gtid, seconds=0)
    pair.start_replica_sql_thread()
    assert 0 == await gtid_wait(replica, gtid, seconds=10)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        pytest.param("", 0, id="empty: nothing to wait for"),
        pytest.param(f"{DOMAIN}-{PRIMARY_SERVER_ID}-1", 0, id="applied"),
        pytest.param(f" {DOMAIN}-{PRIMARY_SERVER_ID}-1", 0, id="leading space ignored"),
        pytest.param(f"{DOMAIN}-99-1", 0, id="another server_id, same domain: only the sequence number counts"),
        pytest.param(f"{DOMAIN}-{PRIMARY_SERVER_ID}-{FAR_AHEAD}", -1, id="not reached"),
        pytest.param("7-1-1", -1, id="a domain the replica never saw: waits it out"),
        pytest.param(f"{DOMAIN}-{PRIMARY_SERVER_ID}-1,7-1-1", -1, id="every domain of a list must be reached"),
        pytest.param(None, None, id="NULL"),
    ],
)
async def test_master_gtid_wait_of_a_position(replica: AsyncEngine, position: str | None, expected: int | None) -> None:
    """What MASTER_GTID_WAIT returns for positions a token could carry, on the replica."""
    assert expected == await gtid_wait(replica, position)


@pytest.mark.parametrize("position", ["garbage", "0-1", "0-1-x", "1-2-3-4", "0-1-1 ", "0-1-18446744073709551616"])
async def test_master_gtid_wait_of_a_malformed_position_is_error_1941(replica: AsyncEngine, position: str) -> None:
    """A position that is no GTID list is OperationalError 1941, "Could not parse GTID list", and not a disconnect."""
    with pytest.raises(OperationalError) as caught:
        await gtid_wait(replica, position)

    assert (1941, "Could not parse GTID list") == mysql_error(caught.value)
    assert not caught.value.connection_invalidated


async def test_master_gtid_wait_on_the_primary_waits_out_even_its_own_writes(
    primary: AsyncEngine,
) -> None:
    """The primary replicates from no one (@@gtid_slave_pos is empty): its MASTER_GTID_WAIT is -1 for its own GTID."""
    gtid = await write(primary)

    assert -1 == await gtid_wait(primary, gtid)
    async with primary.connect() as conn:
        assert "" == await value(conn, "SELECT @@gtid_slave_pos")
        assert gtid == await value(conn, "SELECT @@gtid_current_pos")


# --- The replica's lag: SHOW REPLICA STATUS ---------------------------------------------------


async def test_a_caught_up_replica_is_0_seconds_behind_at_the_primarys_position(
    pair: MariaDBPair, primary: AsyncEngine, replica: AsyncEngine
) -> None:
    """Both threads running, Seconds_Behind_Master 0, @@gtid_slave_pos = @@gtid_current_pos = the primary's position."""
    gtid = await write(primary)
    pair.wait_replica_caught_up()

    status = pair.replica_status()
    assert ("Yes", "Yes", 0, "Slave_Pos") == (
        status["Slave_IO_Running"],
        status["Slave_SQL_Running"],
        status["Seconds_Behind_Master"],
        status["Using_Gtid"],
    )
    async with replica.connect() as conn:
        positions = await conn.execute(text("SELECT @@gtid_slave_pos, @@gtid_current_pos, @@gtid_binlog_pos"))
        assert (gtid, gtid, "") == tuple(positions.one())
        assert 1 == await value(conn, "SELECT @@read_only")


async def test_master_delay_shows_in_seconds_behind_master_while_the_write_waits(
    pair: MariaDBPair, primary: AsyncEngine, replica: AsyncEngine
) -> None:
    """With MASTER_DELAY 5 a write waits on the replica, and Seconds_Behind_Master counts its age, up to 5."""
    pair.set_replica_delay(5)
    gtid = await write(primary)
    written = time.monotonic()

    assert -1 == await gtid_wait(replica, gtid)
    await asyncio.sleep(2.2 - (time.monotonic() - written))
    status = pair.replica_status()
    assert 2 <= status["Seconds_Behind_Master"] <= 5
    assert (5, "Waiting until MASTER_DELAY seconds after master executed event") == (
        status["SQL_Delay"],
        status["Slave_SQL_Running_State"],
    )
    assert 0 <= status["SQL_Remaining_Delay"] <= 3
    assert gtid == status["Gtid_IO_Pos"]  # received, not applied
    pair.set_replica_delay(0)
    assert 0 == await gtid_wait(replica, gtid, seconds=10)


async def test_seconds_behind_master_is_null_while_a_replication_thread_is_stopped(
    pair: MariaDBPair, primary: AsyncEngine, replica: AsyncEngine
) -> None:
    """Seconds_Behind_Master is None with the SQL thread stopped, as with the IO thread stopped, lagging or not."""
    pair.stop_replica_sql_thread()
    status = pair.replica_status()
    assert ("Yes", "No", None) == (
        status["Slave_IO_Running"],
        status["Slave_SQL_Running"],
        status["Seconds_Behind_Master"],
    )
    gtid = await write(primary)
    for _ in range(100):  # until the IO thread has received it
        if gtid == pair.replica_status()["Gtid_IO_Pos"]:
            break
        await asyncio.sleep(0.05)
    assert gtid == pair.replica_status()["Gtid_IO_Pos"]
    async with replica.connect() as conn:
        assert gtid != await value(conn, "SELECT @@gtid_slave_pos")
    assert None is pair.replica_status()["Seconds_Behind_Master"]

    pair.set_replica_delay(0)  # both threads again
    pair.replica.query("STOP REPLICA IO_THREAD")
    status = pair.replica_status()
    assert ("No", "Yes", None) == (
        status["Slave_IO_Running"],
        status["Slave_SQL_Running"],
        status["Seconds_Behind_Master"],
    )


@pytest.fixture
async def app_on_replica(pair: MariaDBPair) -> AsyncIterator[AsyncEngine]:
    """An engine on the replica as a user with the service's privileges only: rows of the test database."""
    pair.primary.query("CREATE USER app@'127.0.0.1'")  # replicated, as the grant is
    pair.primary.query("GRANT SELECT, INSERT, UPDATE, DELETE ON test.* TO app@'127.0.0.1'")
    pair.wait_replica_caught_up()
    engine = create_async_engine(pair.replica_url.replace("root@", "app@"), isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()
    pair.primary.query("DROP USER app@'127.0.0.1'")


async def test_the_service_user_can_wait_on_the_replica_but_not_read_its_status(app_on_replica: AsyncEngine) -> None:
    """MASTER_GTID_WAIT and @@gtid_slave_pos need no privilege; SHOW REPLICA STATUS needs SLAVE MONITOR: 1227."""
    async with app_on_replica.connect() as conn:
        applied = await value(conn, "SELECT @@gtid_slave_pos")
        assert 0 == await value(conn, "SELECT MASTER_GTID_WAIT(:position, 0)", position=applied)
        with pytest.raises(OperationalError) as caught:
            await conn.execute(text("SHOW REPLICA STATUS"))

    denied = "Access denied; you need (at least one of) the SUPER, SLAVE MONITOR privilege(s) for this operation"
    assert (1227, denied) == mysql_error(caught.value)


async def test_a_write_the_service_user_sends_to_the_replica_is_refused_with_1290(app_on_replica: AsyncEngine) -> None:
    """read_only refuses a write from a user without READ ONLY ADMIN, so a misrouted write fails, never diverges."""
    async with app_on_replica.connect() as conn:
        with pytest.raises(OperationalError) as caught:
            await conn.execute(text("INSERT INTO items (name) VALUES ('misrouted')"))

    refused = "The MariaDB server is running with the --read-only option so it cannot execute this statement"
    assert (1290, refused) == mysql_error(caught.value)


# --- A replica killed, or not answering --------------------------------------------------------


async def killed_replica_drill(pair: MariaDBPair) -> None:
    """Kill the replica under a pooled connection, try it and a new one, write meanwhile, restart, catch up."""
    replica = create_async_engine(pair.replica_url, isolation_level="AUTOCOMMIT")
    primary = create_async_engine(pair.primary_url, isolation_level="AUTOCOMMIT")
    try:
        async with replica.connect() as conn:
            await conn.execute(text("SELECT 1"))  # one connection in the pool now
        pair.kill_replica()
        await asyncio.sleep(0.2)  # the kernel has closed the killed server's end of it

        with pytest.raises(OperationalError) as pooled:
            async with replica.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert (2013, "Lost connection to MySQL server during query") == mysql_error(pooled.value)
        assert pooled.value.connection_invalidated

        with pytest.raises(OperationalError) as new:
            async with replica.connect() as conn:
                pass
        assert (2003, "Can't connect to MySQL server on '127.0.0.1'") == mysql_error(new.value)
        assert not new.value.connection_invalidated

        gtid = await write(primary)
        pair.restart_replica()
        assert 0 == await gtid_wait(replica, gtid, seconds=10)
        status = pair.replica_status()
        assert ("Yes", "Yes") == (status["Slave_IO_Running"], status["Slave_SQL_Running"])
    finally:
        await replica.dispose()
        await primary.dispose()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_killed_replica_fails_pooled_connections_with_2013_new_ones_with_2003_and_catches_up_after_restart(
    pair: MariaDBPair, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """A pooled connection's next statement: 2013, invalidated; a new connection: 2003; restarted, it catches up."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(killed_replica_drill(pair))


async def test_a_paused_replica_answers_nothing_within_connect_timeout(pair: MariaDBPair) -> None:
    """A replica that accepts but does not answer: neither a pooled statement nor connect_timeout ends the wait."""
    replica = create_async_engine(pair.replica_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 1})
    try:
        async with replica.connect() as conn:
            await conn.execute(text("SELECT 1"))
        pair.pause_replica()

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5), replica.connect() as conn:
                await conn.execute(text("SELECT 1"))
        # A new connection, from an engine of its own: closing the pooled one now would wait on
        # the paused server too.
        fresh = create_async_engine(pair.replica_url, poolclass=NullPool, connect_args={"connect_timeout": 1})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2), fresh.connect():  # twice connect_timeout
                pass
    finally:
        pair.resume_replica()
        await replica.dispose()
