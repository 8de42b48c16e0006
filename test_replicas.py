"""Reads from MariaDB replicas, and read-your-writes by the Consistency-Token (API.md, "Replicas and read-your-writes").

Against a real primary and replica that mariadb_pair.MariaDBPair starts for this module: the
service in process (the app's own lifespan, as conftest's fixtures run it) for the rules, and
under gunicorn, as deployed, for the replica killed and paused under load. Without replicas, on
SQLite and on MariaDB (TEST_MYSQL_URL), the token is sent and accepted and changes nothing. Each
test leaves the replica running, replicating at once, and caught up. READ_BACK_TRIES sets how
many users the read-your-writes test creates and reads back (40 by default; 1,000 to show it).
"""

import asyncio
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError
from sqlalchemy import event

import main
from conftest import (
    USERS,
    Server,
    asgi_client,
    assert_problem,
    new_user,
    recreate_tables,
    samples,
    scrape,
)
from mariadb_pair import MariaDBPair, program
from replicas import MAX_TOKEN, OPAQUE, TOKEN, deployment_of, refuse_unless_mariadb
from settings import Settings, settings

TOKEN_HEADER = "Consistency-Token"
READ_BACK_TRIES = int(os.environ.get("READ_BACK_TRIES", "40"))
METRICS_KEY = "test-metrics-key"
# The contract: a replica that is out never makes an answer slower than this.
DEADLINE = 2.0


@pytest.fixture(scope="module")
def pair() -> Iterator[MariaDBPair]:
    """A MariaDB primary and its replica, for the whole module."""
    if program("mariadbd") is None or program("mariadb-install-db") is None:
        pytest.skip("mariadbd and mariadb-install-db are not on PATH: the MariaDB replica tests did not run")
    with MariaDBPair(database="replicas_test") as pair:
        yield pair


@pytest.fixture
def healthy_pair(pair: MariaDBPair) -> Iterator[MariaDBPair]:
    """The pair; afterwards the replica runs again, replicating at once, and has caught up."""
    yield pair
    process = pair.replica.process
    if process is None or process.poll() is not None:
        pair.restart_replica()
    else:
        pair.resume_replica()
    pair.set_replica_delay(0)
    pair.wait_replica_caught_up(within=30)


@asynccontextmanager
async def app_on(pair: MariaDBPair, replica_up: bool = True, **changes: Any) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan on the pair's primary with its replica (DATABASE_REPLICA_URLS); yield its state."""
    await recreate_tables(pair.primary_url)
    if replica_up:
        pair.wait_replica_caught_up()
    replica_urls = (SecretStr(pair.replica_url),)
    # The rate limit out of reach: these tests are not about it.
    changed = {"database_url": pair.primary_url, "database_replica_urls": replica_urls, "rate_limit": 10**9, **changes}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "settings", settings.model_copy(update=changed))
        async with main.app.router.lifespan_context(main.app) as state:
            assert state is not None
            yield dict(state)


@pytest.fixture
async def replicated(healthy_pair: MariaDBPair) -> AsyncIterator[dict[str, Any]]:
    """The app on the pair, with the default REPLICA_WAIT and REPLICA_MAX_LAG."""
    async with app_on(healthy_pair) as state:
        yield state


def served(where: str) -> float:
    """This process's count of GET reads served by: replica, primary, primary_token, primary_fallback."""
    return REGISTRY.get_sample_value("db_reads_total", {"served_by": where}) or 0.0


def com_select(server: Any) -> int:
    """The server's count of SELECT statements since it started."""
    [row] = server.query("SHOW GLOBAL STATUS LIKE 'Com_select'")
    return int(row["Value"])


async def created(client: httpx.AsyncClient) -> httpx.Response:
    response = await client.post(USERS, json=new_user())
    assert 201 == response.status_code, response.text
    return response


async def until(condition: Any, within: float = 5.0) -> None:
    """Wait until condition() is true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.05)


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print to the terminal even while pytest captures output, so CI logs show the figure."""
    with capsys.disabled():
        print(f"\n[replicas] {line}")


def in_rotation(state: dict[str, Any]) -> bool:
    return all(replica.in_rotation for replica in state["replicas"].replicas)


# --- Read-your-writes: the token ---------------------------------------------------------------


@pytest.mark.parametrize("max_lag", [1.0, 10.0], ids=["max-lag-1s", "max-lag-10s"])
async def test_a_user_created_is_read_back_at_once_with_its_token_from_a_replica_5_s_behind(
    healthy_pair: MariaDBPair, max_lag: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the write's token, every read-back is 200; without it, a replica 5 s behind answers 404.

    With REPLICA_MAX_LAG 10 the replica stays in rotation though it lags 5 s: without the token
    it answers nearly every read-back 404. With the default 1 s it is out of rotation about a
    second after the first write it has not applied, and the 404s stop.
    """
    async with app_on(healthy_pair, replica_max_lag=max_lag) as state, asgi_client(state) as client:
        healthy_pair.set_replica_delay(5)
        before = {where: served(where) for where in ("replica", "primary", "primary_token")}

        async def read_back(with_token: bool) -> int:
            answer = await created(client)
            headers = {TOKEN_HEADER: answer.headers[TOKEN_HEADER]} if with_token else {}
            return (await client.get(answer.headers["location"], headers=headers)).status_code

        with_token: Counter[int] = Counter()
        without: Counter[int] = Counter()
        started = time.monotonic()
        for first in range(0, READ_BACK_TRIES, 10):  # ten clients at once
            batch = range(first, min(first + 10, READ_BACK_TRIES))
            with_token.update(await asyncio.gather(*(read_back(True) for _ in batch)))
            without.update(await asyncio.gather(*(read_back(False) for _ in batch)))
        seconds = time.monotonic() - started
        counts = {where: served(where) - before[where] for where in before}

    report(
        capsys,
        f"replica 5 s behind, REPLICA_MAX_LAG {max_lag:g} s, {READ_BACK_TRIES} users created and read back at "
        f"once in {seconds:.1f} s: with the token {dict(with_token)}, without it {dict(without)}; reads served "
        f"by {counts}",
    )
    assert {200: READ_BACK_TRIES} == with_token
    assert without[404] >= 1
    assert READ_BACK_TRIES == without[404] + without[200]
    if max_lag == 10.0:  # in rotation all along: every read with the token waited on it, then went to the primary
        assert READ_BACK_TRIES == counts["primary_token"]


async def test_a_token_sent_back_waits_on_the_replica_and_is_read_there(replicated: dict[str, Any]) -> None:
    """A replica replicating at once has the write within REPLICA_WAIT: the read with the token lands on it."""
    async with asgi_client(replicated) as client:
        answer = await created(client)
        before = served("replica"), served("primary_token")
        read = await client.get(answer.headers["location"], headers={TOKEN_HEADER: answer.headers[TOKEN_HEADER]})

    assert 200 == read.status_code, read.text
    assert answer.json() == read.json()
    assert (before[0] + 1, before[1]) == (served("replica"), served("primary_token"))


def another_deployment(token: str) -> str:
    """The same position, as another deployment's service would have named it."""
    other = deployment_of("mysql+aiomysql://app@db.other.example:3306/users")
    return re.sub(r"^1\.[0-9a-f]{12}\.", f"1.{other}.", token)


async def test_a_token_from_another_deployment_is_read_from_the_primary(
    healthy_pair: MariaDBPair, replicated: dict[str, Any]
) -> None:
    """A position this replica has applied, in another deployment's token, is not trusted: the primary answers.

    MASTER_GTID_WAIT compares sequence numbers only, so the replica would pass it; the token's
    deployment is what tells them apart.
    """
    async with asgi_client(replicated) as client:
        early = (await created(client)).headers[TOKEN_HEADER]  # a position the replica will have
        healthy_pair.wait_replica_caught_up()
        healthy_pair.stop_replica_sql_thread()
        user = await created(client)  # not on the replica
        assert 404 == (await client.get(user.headers["location"])).status_code  # the replica still serves
        before = served("primary_token")
        foreign = await client.get(user.headers["location"], headers={TOKEN_HEADER: another_deployment(early)})
        no_position = await client.get(
            user.headers["location"], headers={TOKEN_HEADER: replicated["replicas"].no_position}
        )

    assert (200, 200) == (foreign.status_code, no_position.status_code), (foreign.text, no_position.text)
    assert before + 2 == served("primary_token")


# Not of the contract's form: 1 to 256 characters of A-Za-z0-9-_.:,
# As bytes, as a client may send them: httpx would encode a str as ASCII.
MALFORMED_TOKENS = [b"", b"a token", b"1.0123456789ab.0-1-1;", b'"1.0123456789ab.0-1-1"', b"caf\xe9", b"0" * 257]


@pytest.mark.parametrize("token", MALFORMED_TOKENS)
async def test_a_malformed_token_is_400_with_replicas(replicated: dict[str, Any], token: bytes) -> None:
    """A token not of the contract's form is 400 problem+json, before any SQL."""
    async with asgi_client(replicated) as client:
        answers = [await client.get(path, headers={TOKEN_HEADER.encode(): token}) for path in (USERS, f"{USERS}/1")]

    for answer in answers:
        assert TOKEN_HEADER in assert_problem(answer, 400)["detail"]


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "0",
        "2.{ours}.0-1-1",  # another version of the format
        "1.{ours}",
        "1.{ours}.0-1",
        "1.{ours}.0-1-x",
        "1.{ours}.00-1-1",
        "1.{ours}.0-1-1,",
        "1.{ours}.0-1-18446744073709551616",  # one past the largest sequence number: MariaDB's error 1941
        "1.{ours}.4294967296-1-1",  # one past the largest domain
        "1.{ours}.0-4294967296-1",  # one past the largest server id
        "1.{ours}.0-1-1,0-1-2",  # a domain twice
        "1.{ours}.4294967295-4294967295-18446744073709551615",  # the largest: waited for, in vain
    ],
)
async def test_a_well_formed_token_no_replica_can_interpret_is_read_from_the_primary(
    replicated: dict[str, Any], token: str
) -> None:
    """A token of the right form that is not one a replica can wait for never reaches MariaDB: the primary answers."""
    async with asgi_client(replicated) as client:
        user = await created(client)
        before = served("primary_token")
        token = token.format(ours=replicated["replicas"].deployment)
        read = await client.get(user.headers["location"], headers={TOKEN_HEADER: token})

    assert 200 == read.status_code, read.text
    assert before + 1 == served("primary_token")


@pytest.mark.parametrize("token", MALFORMED_TOKENS)
async def test_a_malformed_token_is_400_without_replicas(client: httpx.AsyncClient, token: bytes) -> None:
    """Without replicas the header is checked all the same, so a client's mistake shows before replicas are added."""
    answer = await client.get(f"{USERS}/1", headers={TOKEN_HEADER.encode(): token})

    assert_problem(answer, 400)


def test_the_schema_documents_the_token_sent_and_the_form_accepted() -> None:
    """Write answers declare the token's exact pattern; the GETs accept the contract's form of it, which is wider."""
    largest = f"1.{'f' * 12}.4294967295-4294967295-18446744073709551615"
    assert TOKEN.fullmatch(largest) and OPAQUE.fullmatch(largest)
    schema = main.app.openapi()
    sent = schema["components"]["headers"][TOKEN_HEADER]["schema"]
    assert (MAX_TOKEN, f"^{TOKEN.pattern}$") == (sent["maxLength"], sent["pattern"])
    for path in (USERS, f"{USERS}/{{user_id}}"):
        [accepted] = [p["schema"] for p in schema["paths"][path]["get"]["parameters"] if p["name"] == TOKEN_HEADER]
        assert (MAX_TOKEN, "^[A-Za-z0-9._:,-]{1,256}$") == (accepted["maxLength"], accepted["pattern"])


# --- Without replicas: a constant token, and not one round trip more ----------------------------


async def test_without_replicas_every_write_answer_carries_a_token_and_reads_accept_it(
    client: httpx.AsyncClient, lifespan_state: dict[str, Any]
) -> None:
    """201, 200 of PATCH and 204 carry the deployment's token; a GET that sends it back is answered as without."""
    answer = await created(client)
    path = answer.headers["location"]
    token = answer.headers[TOKEN_HEADER]
    patched = await client.patch(path, json={"name": "Renamed"})
    read = await client.get(path, headers={TOKEN_HEADER: token})
    page = await client.get(USERS, headers={TOKEN_HEADER: token})
    deleted = await client.delete(path)

    assert f"1.{deployment_of(lifespan_state['engine'].url.render_as_string())}.none" == token
    assert [token, token] == [patched.headers[TOKEN_HEADER], deleted.headers[TOKEN_HEADER]]
    assert (200, 200, 204) == (read.status_code, page.status_code, deleted.status_code)
    assert patched.json() == read.json()
    assert TOKEN_HEADER not in read.headers


async def test_without_replicas_a_write_and_a_read_each_run_one_statement(
    client: httpx.AsyncClient, lifespan_state: dict[str, Any]
) -> None:
    """No round trip for the token without replicas: a create is its INSERT, a read with a token its SELECT."""
    statements: list[str] = []
    engine = lifespan_state["engine"].sync_engine
    listener = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        answer = await created(client)
        create = statements.copy()
        await client.get(answer.headers["location"], headers={TOKEN_HEADER: answer.headers[TOKEN_HEADER]})
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    assert 1 == len(create) and create[0].startswith("INSERT"), create
    assert 2 == len(statements) and statements[1].startswith("SELECT"), statements


async def test_a_replay_carries_the_first_answers_token_without_replicas(client: httpx.AsyncClient) -> None:
    """An Idempotency-Key's replay has the Consistency-Token of the first answer."""
    body, key = new_user(), {"Idempotency-Key": str(uuid.uuid4())}
    first = await client.post(USERS, json=body, headers=key)
    again = await client.post(USERS, json=body, headers=key)

    assert (201, 201, "true") == (first.status_code, again.status_code, again.headers["idempotent-replayed"])
    assert first.headers[TOKEN_HEADER] == again.headers[TOKEN_HEADER]


async def test_a_replay_carries_the_first_answers_token_with_replicas(replicated: dict[str, Any]) -> None:
    """Kept with the answer: the replay names the first write's position, though the primary has moved on since."""
    body, key = new_user(), {"Idempotency-Key": str(uuid.uuid4())}
    async with asgi_client(replicated) as client:
        first = await client.post(USERS, json=body, headers=key)
        later = await created(client)
        again = await client.post(USERS, json=body, headers=key)
        patch_key = {"Idempotency-Key": str(uuid.uuid4())}
        patched = await client.patch(first.headers["location"], json={"name": "Renamed"}, headers=patch_key)
        patched_again = await client.patch(first.headers["location"], json={"name": "Renamed"}, headers=patch_key)

    assert (201, 201, "true") == (first.status_code, again.status_code, again.headers["idempotent-replayed"])
    assert first.headers[TOKEN_HEADER] == again.headers[TOKEN_HEADER] != later.headers[TOKEN_HEADER]
    assert not first.headers[TOKEN_HEADER].endswith(".none")
    assert (200, "true") == (patched_again.status_code, patched_again.headers["idempotent-replayed"])
    assert patched.headers[TOKEN_HEADER] == patched_again.headers[TOKEN_HEADER]


# --- Where GETs are read, and when a replica is out ----------------------------------------------


async def test_gets_land_on_the_replica_as_the_servers_com_select_counts(
    healthy_pair: MariaDBPair, replicated: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Of the SELECTs a burst of GETs makes, the replica runs them all; the primary only the checks' position reads."""
    gets = 300
    async with asgi_client(replicated) as client:
        ids = [(await created(client)).json()["id"] for _ in range(5)]
        healthy_pair.wait_replica_caught_up()
        await until(lambda: in_rotation(replicated))
        primary, replica = com_select(healthy_pair.primary), com_select(healthy_pair.replica)
        started = time.monotonic()
        for n in range(gets):
            answer = await client.get(f"{USERS}/{ids[n % 5]}" if n % 3 else USERS)
            assert 200 == answer.status_code, answer.text
        seconds = time.monotonic() - started
        primary, replica = com_select(healthy_pair.primary) - primary, com_select(healthy_pair.replica) - replica

    # Each check reads the primary's position once and the replica's once: CHECK_INTERVAL is 0.25 s.
    checks = seconds / 0.25 + 2
    report(
        capsys,
        f"{gets} GETs in {seconds:.1f} s: Com_select on the replica +{replica}, on the primary +{primary} "
        f"(the checks: about {checks:.0f} on each)",
    )
    assert gets <= replica <= gets + checks
    assert primary <= checks


async def test_a_replica_lagging_past_replica_max_lag_gets_no_reads_until_it_is_back(
    healthy_pair: MariaDBPair, replicated: dict[str, Any]
) -> None:
    """Its lag shows in the gauge; past REPLICA_MAX_LAG reads go to the primary (200 where it would 404), then back."""
    async with asgi_client(replicated) as client:
        healthy_pair.stop_replica_sql_thread()
        user = await created(client)
        await until(lambda: not in_rotation(replicated), within=3)
        lag = REGISTRY.get_sample_value("db_replica_lag_seconds", {"replica": replicated["replicas"].replicas[0].name})
        before = served("primary"), served("replica")
        read = await client.get(user.headers["location"])
        on_primary = served("primary") - before[0], served("replica") - before[1]
        healthy_pair.start_replica_sql_thread()
        await until(lambda: in_rotation(replicated), within=3)
        replica_reads = served("replica")
        again = await client.get(user.headers["location"])

    assert lag is not None and lag > 1.0
    assert (200, (1, 0)) == (read.status_code, on_primary)
    assert (200, replica_reads + 1) == (again.status_code, served("replica"))


async def test_readyz_depends_on_the_primary_only(healthy_pair: MariaDBPair, replicated: dict[str, Any]) -> None:
    """With the replica killed /readyz is 200, and GETs are answered from the primary."""
    async with asgi_client(replicated) as client:
        user = await created(client)
        healthy_pair.kill_replica()
        ready = await client.get("/readyz")
        read = await client.get(user.headers["location"])

    assert (200, 200) == (ready.status_code, read.status_code)


@pytest.mark.parametrize("failure", ["kill", "pause"])
async def test_a_replica_that_fails_during_a_read_is_read_from_the_primary_in_the_same_request(
    healthy_pair: MariaDBPair, replicated: dict[str, Any], failure: str
) -> None:
    """Killed (its pooled connection lost) or paused (nothing answered): 200 from the primary within 2 s, counted.

    The replica is then out of rotation: the next read goes to the primary without trying it.
    """
    replicas = replicated["replicas"]
    async with asgi_client(replicated) as client:
        user = await created(client)
        healthy_pair.wait_replica_caught_up()
        assert 200 == (await client.get(user.headers["location"])).status_code  # a pooled replica connection now
        # No more checks: the read, not a check, is the first to meet the failure.
        replicas.checking.cancel()
        before = [served(where) for where in ("primary_fallback", "primary", "replica")]
        healthy_pair.kill_replica() if failure == "kill" else healthy_pair.pause_replica()
        started = time.monotonic()
        read = await client.get(user.headers["location"])
        seconds = time.monotonic() - started
        after = await client.get(user.headers["location"])

    assert (200, 200) == (read.status_code, after.status_code), read.text
    assert seconds < DEADLINE
    # The first read met the failure and went to the primary; the next went there at once.
    assert [before[0] + 1, before[1] + 1, before[2]] == [served(w) for w in ("primary_fallback", "primary", "replica")]
    assert not replicas.replicas[0].in_rotation


# --- Under gunicorn, under load -------------------------------------------------------------------


@pytest.fixture(scope="module")
async def replicated_service(pair: MariaDBPair, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Server]:
    """Gunicorn with gunicorn.conf.py, 2 workers, ENVIRONMENT=production, on the pair: GETs read its replica."""
    # Empty, as a first deploy finds it: the server brings it to head first (conftest.Server.migrate).
    pair.primary.query(f"DROP DATABASE {pair.database}")
    pair.primary.query(f"CREATE DATABASE {pair.database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    folder = tmp_path_factory.mktemp("replicated_service")
    server = Server(folder, DATABASE_URL=pair.primary_url, DATABASE_REPLICA_URLS=pair.replica_url)
    server.env["METRICS_KEYS"] = METRICS_KEY
    async with server:
        yield server


async def figures(server: Server) -> dict[str, float]:
    """From a scrape: reads by where they were served, and how many workers read from the replica now."""
    text = await scrape(server)
    found = {labels["served_by"]: value for name, labels, value in samples(text) if name == "db_reads_total"}
    found["in_rotation"] = sum(value for name, _, value in samples(text) if name == "db_replica_in_rotation")
    return found


async def until_scraped(server: Server, condition: Any, within: float = 10.0) -> dict[str, float]:
    """Scrape until condition(figures) holds; return those figures."""
    deadline = time.monotonic() + within
    while not condition(found := await figures(server)):
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)
    return found


async def get_by_id_under_load(server: Server, ids: list[int], stop: asyncio.Event) -> tuple[Counter[Any], float]:
    """GET users by id from 16 clients at once until stop is set; the answers' statuses (or errors), the slowest."""
    outcomes: Counter[Any] = Counter()
    slowest = 0.0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal slowest
        while not stop.is_set():
            started = time.monotonic()
            try:
                outcomes[(await client.get(f"{USERS}/{ids[len(outcomes) % len(ids)]}")).status_code] += 1
            except httpx.TransportError as exc:
                outcomes[type(exc).__name__] += 1
            slowest = max(slowest, time.monotonic() - started)

    async with server.client(timeout=10) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(16)))
    return outcomes, slowest


@pytest.mark.parametrize("failure", ["killed", "paused"])
async def test_a_replica_killed_or_paused_under_load_costs_no_error_and_gets_reads_again_once_back(
    healthy_pair: MariaDBPair, replicated_service: Server, failure: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """GETs by id under load while the replica is killed (or paused) and comes back: every answer 200 within 2 s.

    Meanwhile the reads go to the primary; once it is back, both workers put it in rotation again
    and it serves reads again.
    """
    server = replicated_service
    async with server.client() as client:
        ids = [(await created(client)).json()["id"] for _ in range(20)]
    healthy_pair.wait_replica_caught_up()
    before = await until_scraped(server, lambda found: found["in_rotation"] == 2)
    stop = asyncio.Event()
    load = asyncio.create_task(get_by_id_under_load(server, ids, stop))
    await asyncio.sleep(1.5)
    # In a thread, so that the load's clients, in this process, are not held up meanwhile.
    await asyncio.to_thread(healthy_pair.kill_replica if failure == "killed" else healthy_pair.pause_replica)
    await asyncio.sleep(3)
    out = await figures(server)
    await asyncio.to_thread(healthy_pair.restart_replica if failure == "killed" else healthy_pair.resume_replica)
    back = await until_scraped(server, lambda found: found["in_rotation"] == 2)
    await asyncio.sleep(1.5)
    stop.set()
    outcomes, slowest = await load
    after = await figures(server)

    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {where: b.get(where, 0) - a.get(where, 0) for where in ("replica", "primary", "primary_fallback")}

    report(
        capsys,
        f"replica {failure} under load: answers {dict(outcomes)}, slowest {slowest:.2f} s; reads served before "
        f"and while {failure} {delta(before, out)}, after it was back {delta(back, after)}",
    )
    assert {200} == set(outcomes), outcomes
    assert slowest < DEADLINE
    assert 0 == out["in_rotation"]
    # Read on the primary meanwhile: as a fallback when a read met the replica failing, or at once
    # once a check had taken it out. Which of the two a run sees is timing (a kill is noticed by
    # whichever meets it first); the exact fallback is pinned in process, above.
    on_primary = delta(before, out)
    assert on_primary["primary"] + on_primary["primary_fallback"] > 0, on_primary
    assert after["replica"] > back["replica"]


# --- Start -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "replica"),
    [
        ("sqlite+aiosqlite:///./users.db", "mysql+aiomysql://app@replica:3306/users"),
        ("mysql+aiomysql://app@primary:3306/users", "sqlite+aiosqlite:///./replica.db"),
    ],
)
def test_replicas_with_sqlite_are_refused_by_the_settings(primary: str, replica: str) -> None:
    """SQLite has no replication: DATABASE_REPLICA_URLS with a SQLite URL stops the start, saying why."""
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=primary, database_replica_urls=replica)

    assert "DATABASE_REPLICA_URLS needs MariaDB" in str(refused.value)
    assert "SQLite has no replication" in str(refused.value)


async def test_gunicorn_refuses_to_start_with_replicas_of_a_sqlite_primary(tmp_path: Path) -> None:
    """The service stops before serving, and its log names the reason."""
    server = Server(tmp_path, DATABASE_REPLICA_URLS="mysql+aiomysql://app@127.0.0.1:1/users")

    assert 0 != await server.exit_code(within=30)
    assert "SQLite has no replication" in server.log()


def test_replicas_of_mysql_are_refused_by_the_primarys_version() -> None:
    """MySQL's GTIDs are not MariaDB's and are not tested here: a primary whose VERSION() is MySQL's stops the start."""
    with pytest.raises(RuntimeError, match=r"DATABASE_URL's server is 8\.4\.3 \(MySQL\).*Leave DATABASE_REPLICA_URLS"):
        refuse_unless_mariadb("8.4.3")
    refuse_unless_mariadb("10.11.19-MariaDB-0+deb12u1")


async def test_a_replica_that_does_not_answer_at_start_gets_reads_once_it_does(healthy_pair: MariaDBPair) -> None:
    """The service starts with its replica down, reads from the primary, and from the replica once it is up."""
    healthy_pair.kill_replica()
    async with app_on(healthy_pair, replica_up=False) as state, asgi_client(state) as client:
        user = await created(client)
        before = served("primary")
        first = await client.get(user.headers["location"])
        assert served("primary") == before + 1
        healthy_pair.restart_replica()
        healthy_pair.wait_replica_caught_up()
        await until(lambda: in_rotation(state), within=5)
        before = served("replica")
        second = await client.get(user.headers["location"])

    assert (200, 200) == (first.status_code, second.status_code)
    assert before + 1 == served("replica")
