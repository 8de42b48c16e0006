"""The service's HTTP contract, rule by rule, on a real SQLite file and a real MariaDB.

Every test runs twice: on a fresh SQLite file, and on the MySQL or MariaDB database named by
TEST_MYSQL_URL (for example mysql+aiomysql://root@127.0.0.1:3306/test_users); without that
variable the second run is skipped, and says so. Requests go through the whole ASGI app, its
middleware and its lifespan, with httpx; nothing of ours is mocked.
"""

import asyncio
import ipaddress
import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.types import Receive, Scope, Send

import main
from models import Base, User
from settings import settings

USERS = "/api/v1/users"
RFC3339_MICROSECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)")


# --- Fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a test database: a new SQLite file, or TEST_MYSQL_URL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'users.db'}"
    url = os.environ.get("TEST_MYSQL_URL")
    if not url:
        pytest.skip("TEST_MYSQL_URL is not set: the MySQL/MariaDB half of the suite did not run")
    return url


async def recreate_tables(url: str) -> None:
    """Drop and create the tables, so each test starts from the schema in models.py."""
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()


@pytest.fixture
async def lifespan_state(database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    """Run the app's own lifespan against the test database; yield its state."""
    await recreate_tables(database_url)
    # The same settings the service read at import, pointed at the test database.
    monkeypatch.setattr(main, "settings", settings.model_copy(update={"database_url": database_url}))
    async with main.app.router.lifespan_context(main.app) as state:
        assert state is not None
        yield dict(state)


def asgi_client(state: dict[str, Any]) -> httpx.AsyncClient:
    """An HTTP client for the app, as a server would run it after the lifespan started."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # What a server does with the lifespan's state: a shallow copy into every request.
        scope["state"] = dict(state)
        await main.app(scope, receive, send)

    # Each client is a new address, so the rate limit one test used up never reaches the next.
    address = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) | secrets.randbits(64))
    keys = settings.api_keys
    headers = {"Authorization": f"Bearer {keys[0].get_secret_value()}"} if keys else {}
    transport = httpx.ASGITransport(app=app, client=(str(address), 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers)


@pytest.fixture
async def client(lifespan_state: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over an empty users table."""
    async with lifespan_state["engine"].connect() as conn:
        await conn.execute(delete(User))  # the demo users the lifespan adds in development
    async with asgi_client(lifespan_state) as client:
        yield client


@pytest.fixture
def engine(lifespan_state: dict[str, Any]) -> AsyncEngine:
    """The app's engine, to set up rows the API cannot create (old timestamps)."""
    engine: AsyncEngine = lifespan_state["engine"]
    return engine


async def create(client: httpx.AsyncClient, email: str = "ada@example.com", **fields: Any) -> dict[str, Any]:
    """Create a user through the API and return it; fail the test unless that is a 201."""
    response = await client.post(USERS, json={"email": email, "name": "Ada Lovelace", **fields})
    assert 201 == response.status_code, response.text
    user: dict[str, Any] = response.json()
    return user


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check that the response is an RFC 9457 problem with this status; return its body."""
    assert status == response.status_code, response.text
    assert "application/problem+json" == response.headers["content-type"]
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert status == body["status"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# --- The resource --------------------------------------------------------------------------


async def test_user_has_exactly_the_documented_fields(client: httpx.AsyncClient) -> None:
    """A user is id, email, name, is_active and two RFC 3339 UTC timestamps with microseconds."""
    user = await create(client)

    assert {"id", "email", "name", "is_active", "created_at", "updated_at"} == user.keys()
    assert isinstance(user["id"], int) and user["id"] > 0
    assert RFC3339_MICROSECONDS.fullmatch(user["created_at"])
    assert user["created_at"] == user["updated_at"]
    assert user == (await client.get(f"{USERS}/{user['id']}")).json()


async def test_timestamps_always_have_six_fractional_digits(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """A timestamp on a whole second still shows its microseconds, as .000000."""
    on_the_second = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    async with engine.connect() as conn:
        await conn.execute(
            insert(User).values(
                email="ada@example.com",
                email_key="ada@example.com",
                name="Ada",
                is_active=True,
                created_at=on_the_second,
                updated_at=on_the_second,
                version=1,
            )
        )
    [user] = (await client.get(USERS)).json()["items"]

    assert user["created_at"] in ("2026-11-27T12:00:00.000000Z", "2026-11-27T12:00:00.000000+00:00")
    assert user["created_at"] == user["updated_at"]


async def test_development_start_adds_demo_users_to_an_empty_table(lifespan_state: dict[str, Any]) -> None:
    """In development the lifespan adds a few users to an empty table."""
    if settings.environment != "development":
        pytest.skip("demo users are for development only")
    async with asgi_client(lifespan_state) as client:
        response = await client.get(USERS)

    assert [email for email, _ in main.DEMO_USERS] == [user["email"] for user in response.json()["items"]]


# --- Email ---------------------------------------------------------------------------------


async def test_create_user_with_taken_email_is_409(client: httpx.AsyncClient) -> None:
    """An email already in use is a conflict."""
    await create(client, "ada@example.com")

    assert_problem(await client.post(USERS, json={"email": "ada@example.com", "name": "Other"}), 409)


async def test_email_is_unique_case_insensitively(client: httpx.AsyncClient) -> None:
    """Ada@Example.COM conflicts with ada@example.com."""
    await create(client, "ada@example.com")

    assert_problem(await client.post(USERS, json={"email": "Ada@Example.COM", "name": "Other"}), 409)


async def test_email_is_not_unique_accent_insensitively(client: httpx.AsyncClient) -> None:
    """café@example.com and cafe@example.com are two addresses."""
    first = await create(client, "café@example.com")
    second = await create(client, "cafe@example.com")

    assert ["café@example.com", "cafe@example.com"] == [first["email"], second["email"]]


async def test_email_is_stored_with_lower_cased_domain_and_local_part_as_given(client: httpx.AsyncClient) -> None:
    """Only the domain of an email is lower-cased."""
    user = await create(client, "Ada.Lovelace@Example.COM")

    assert "Ada.Lovelace@example.com" == user["email"]
    assert "Ada.Lovelace@example.com" == (await client.get(f"{USERS}/{user['id']}")).json()["email"]


def domain_of_length(length: int) -> str:
    """A valid domain name of exactly length characters (labels are at most 63)."""
    labels = []
    while length > 63 + 1 + 4:
        labels.append("d" * 63)
        length -= 64
    return ".".join([*labels, "d" * (length - 4) + ".com"])


@pytest.mark.parametrize(("length", "status"), [(254, 201), (255, 422), (1000, 422)])
async def test_email_over_254_characters_is_422(client: httpx.AsyncClient, length: int, status: int) -> None:
    """An email may have 254 characters, not more."""
    email = "a" * 64 + "@" + domain_of_length(length - 65)
    assert length == len(email)

    response = await client.post(USERS, json={"email": email, "name": "Ada"})

    assert status == response.status_code, response.text


async def test_email_whose_lower_case_is_longer_is_accepted(client: httpx.AsyncClient) -> None:
    """An address within the limit fits even when its lower-case form has more characters (İ has two)."""
    email = "İ" * 32 + "@" + domain_of_length(254 - 32 * 2 - 1)  # 254 bytes of UTF-8
    assert 254 == len(email.lower())

    user = await create(client, email)

    assert email == user["email"]


@pytest.mark.parametrize(
    "email",
    [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@@example.com",
        "ada example@example.com",
        " ada@example.com",
        "Ada <ada@example.com>",
        "ada@localhost",
        "ada.@example.com",
        "ada@exa_mple.com",
        "ada\ud800@example.com",
    ],
)
async def test_email_with_invalid_syntax_is_422(client: httpx.AsyncClient, email: str) -> None:
    """An address that is not syntactically valid is rejected, with the reason."""
    # ASCII-only JSON, so that a lone surrogate travels as the escape \ud800 a client can send.
    content = json.dumps({"email": email, "name": "Ada"}).encode()
    response = await client.post(USERS, content=content, headers={"Content-Type": "application/json"})

    body = assert_problem(response, 422)

    assert ["body", "email"] == body["errors"][0]["loc"]


# --- Name ----------------------------------------------------------------------------------


async def test_name_is_trimmed(client: httpx.AsyncClient) -> None:
    """White space around a name is dropped; inside it is kept."""
    user = await create(client, name=" \t Ada  Lovelace \n")

    assert "Ada  Lovelace" == user["name"]


@pytest.mark.parametrize(
    ("name", "status"), [("x", 201), ("x" * 100, 201), ("  " + "x" * 100 + "  ", 201), ("x" * 101, 422)]
)
async def test_name_has_1_to_100_characters_after_trimming(client: httpx.AsyncClient, name: str, status: int) -> None:
    """The length limit counts characters after trimming."""
    response = await client.post(USERS, json={"email": "ada@example.com", "name": name})

    assert status == response.status_code, response.text


@pytest.mark.parametrize("name", ["", " ", "\t\n ", "\u3000"])
async def test_whitespace_only_name_is_422(client: httpx.AsyncClient, name: str) -> None:
    """A name of nothing but white space is empty."""
    assert_problem(await client.post(USERS, json={"email": "ada@example.com", "name": name}), 422)


@pytest.mark.parametrize(
    "name",
    [
        "Ada 👩🏽‍💻 Lovelace",
        "🇫🇷" * 49,
        "Zoë Ω 李白 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # noqa: RUF001 (the look-alike letters are the point)
        "e\u0301 (decomposed)",
        "\u00e9 (composed)",
    ],
)
async def test_name_round_trips_byte_for_byte(client: httpx.AsyncClient, name: str) -> None:
    """Any Unicode, emoji included, comes back exactly as sent, from every route."""
    user = await create(client, name=name)
    patched = (await client.patch(f"{USERS}/{user['id']}", json={"name": name + "!"})).json()

    assert name.encode() == user["name"].encode()
    assert (name + "!").encode() == patched["name"].encode()
    assert (name + "!").encode() == (await client.get(f"{USERS}/{user['id']}")).json()["name"].encode()
    assert (name + "!").encode() == (await client.get(USERS)).json()["items"][0]["name"].encode()


async def test_name_with_a_lone_surrogate_is_422(client: httpx.AsyncClient) -> None:
    """JSON can escape half an emoji (\\ud83d); that is not text and cannot be stored."""
    content = b'{"email": "ada@example.com", "name": "Ada \\ud83d"}'
    response = await client.post(USERS, content=content, headers={"Content-Type": "application/json"})

    assert ["body", "name"] == assert_problem(response, 422)["errors"][0]["loc"]


# --- is_active -----------------------------------------------------------------------------


async def test_is_active_defaults_to_true(client: httpx.AsyncClient) -> None:
    """A new user is active unless the request says otherwise."""
    assert True is (await create(client))["is_active"]
    assert False is (await create(client, "grace@example.com", is_active=False))["is_active"]


# --- Request bodies ------------------------------------------------------------------------


WRITES = [("POST", USERS), ("PATCH", f"{USERS}/1")]


@pytest.fixture
async def user(client: httpx.AsyncClient) -> dict[str, Any]:
    """One user, with id 1 when the database is fresh."""
    return await create(client)


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_unknown_field_is_422(client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str) -> None:
    """A field the resource does not have is rejected, not ignored."""
    body = {"email": "grace@example.com", "name": "Grace", "is_admin": True}
    response = await client.request(method, path.replace("/1", f"/{user['id']}"), json=body)

    assert ["body", "is_admin"] == assert_problem(response, 422)["errors"][0]["loc"]


@pytest.mark.parametrize("field", ["email", "name", "is_active"])
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_null_for_any_field_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, field: str
) -> None:
    """null is not a value for any field, on create or update."""
    body: dict[str, Any] = {"email": "grace@example.com", "name": "Grace", field: None}
    response = await client.request(method, path.replace("/1", f"/{user['id']}"), json=body)

    assert field in assert_problem(response, 422)["errors"][0]["loc"]
    assert user == (await client.get(f"{USERS}/{user['id']}")).json()


@pytest.mark.parametrize(
    ("field", "value"), [("id", 99), ("created_at", "2020-01-01T00:00:00Z"), ("updated_at", "2020-01-01T00:00:00Z")]
)
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_server_set_field_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, field: str, value: Any
) -> None:
    """id and the timestamps belong to the server: no mass assignment."""
    body = {"email": "grace@example.com", "name": "Grace", field: value}
    response = await client.request(method, path.replace("/1", f"/{user['id']}"), json=body)

    assert ["body", field] == assert_problem(response, 422)["errors"][0]["loc"]
    assert user == (await client.get(f"{USERS}/{user['id']}")).json()


@pytest.mark.parametrize(
    "content",
    [
        b'{"email": "ada@example.com",',
        b"not json",
        b"",
        b'{"name": "\xff"}',  # not UTF-8
        b"[" * 50_000,  # nested deeper than any parser recurses
        b'{"is_active": 1' + b"0" * 5000 + b"}",  # more digits than Python converts
    ],
    ids=["truncated", "not-json", "empty", "not-utf8", "deep", "long-number"],
)
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_malformed_json_is_422_with_errors(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, content: bytes
) -> None:
    """A body that is not JSON is a validation error like any other, with its errors list."""
    response = await client.request(
        method, path.replace("/1", f"/{user['id']}"), content=content, headers={"Content-Type": "application/json"}
    )

    errors = assert_problem(response, 422)["errors"]
    assert errors and {"loc", "msg"} <= errors[0].keys()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", 1),
        ("email", ["ada@example.com"]),
        ("name", 5),
        ("name", {"first": "Ada"}),
        ("is_active", "true"),
        ("is_active", 1),
        ("is_active", "yes"),
    ],
)
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_wrong_type_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, field: str, value: Any
) -> None:
    """JSON types must match exactly: no "true" or 1 for true, no number for a name."""
    body = {"email": "grace@example.com", "name": "Grace", field: value}
    response = await client.request(method, path.replace("/1", f"/{user['id']}"), json=body)

    assert ["body", field] == assert_problem(response, 422)["errors"][0]["loc"][:2]


@pytest.mark.parametrize("body", [[], "ada@example.com", 1, None])
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_body_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, body: Any
) -> None:
    """The body is one JSON object."""
    response = await client.request(method, path.replace("/1", f"/{user['id']}"), json=body)

    assert_problem(response, 422)


async def test_create_user_without_email_or_name_is_422(client: httpx.AsyncClient) -> None:
    """email and name are required on create; each missing one is listed."""
    body = assert_problem(await client.post(USERS, json={}), 422)

    assert [["body", "email"], ["body", "name"]] == [error["loc"] for error in body["errors"]]


# --- GET /api/v1/users/{id} ----------------------------------------------------------------


async def test_get_user_returns_it_with_its_etag(client: httpx.AsyncClient) -> None:
    """A user's page carries the same strong ETag its creation did."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})

    response = await client.get(f"{USERS}/{created.json()['id']}")

    assert 200 == response.status_code
    assert created.json() == response.json()
    assert re.fullmatch(r'"[^"]+"', response.headers["etag"])
    assert created.headers["etag"] == response.headers["etag"]


@pytest.mark.parametrize("user_id", [1, 2**63 - 1])
async def test_get_missing_user_is_404(client: httpx.AsyncClient, user_id: int) -> None:
    """An id with no user is 404, with a problem document naming it."""
    body = assert_problem(await client.get(f"{USERS}/{user_id}"), 404)

    assert str(user_id) in body["detail"]


@pytest.mark.parametrize("user_id", ["0", "-1", str(2**63), str(2**64), "abc", "1.5", "1e3", "%20"])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
async def test_id_that_is_not_a_positive_64_bit_integer_is_422(
    client: httpx.AsyncClient, method: str, user_id: str
) -> None:
    """0, negatives, 2**63 and non-numbers are not ids: 422, never 500."""
    body = {"name": "Ada"} if method == "PATCH" else None
    response = await client.request(method, f"{USERS}/{user_id}", json=body)

    assert ["path", "user_id"] == assert_problem(response, 422)["errors"][0]["loc"]


# --- GET /api/v1/users ---------------------------------------------------------------------


async def create_many(client: httpx.AsyncClient, count: int) -> list[int]:
    """Create users 0..count-1 and return their ids in creation order."""
    return [(await create(client, f"user{n}@example.com"))["id"] for n in range(count)]


async def test_list_has_20_users_by_default(client: httpx.AsyncClient) -> None:
    """Without a limit a page has 20 users, and a cursor when there are more."""
    ids = await create_many(client, 21)

    page = (await client.get(USERS)).json()

    assert ids[:20] == [user["id"] for user in page["items"]]
    assert isinstance(page["next_cursor"], str)


@pytest.mark.parametrize("limit", ["0", "101", "-1", "abc", ""])
async def test_list_limit_out_of_1_to_100_is_422(client: httpx.AsyncClient, limit: str) -> None:
    """limit is 1 to 100."""
    response = await client.get(USERS, params={"limit": limit})

    assert ["query", "limit"] == assert_problem(response, 422)["errors"][0]["loc"]


@pytest.mark.parametrize("limit", [1, 100])
async def test_list_limit_of_1_and_100_is_allowed(client: httpx.AsyncClient, limit: int) -> None:
    """The ends of the range are inside it."""
    await create_many(client, 2)

    page = (await client.get(USERS, params={"limit": limit})).json()

    assert min(limit, 2) == len(page["items"])


async def test_list_is_in_ascending_id_order(client: httpx.AsyncClient) -> None:
    """Users come oldest first, whatever was updated since."""
    ids = await create_many(client, 5)
    await client.patch(f"{USERS}/{ids[2]}", json={"name": "Changed"})
    await client.delete(f"{USERS}/{ids[3]}")

    page = (await client.get(USERS)).json()

    assert [ids[0], ids[1], ids[2], ids[4]] == [user["id"] for user in page["items"]]


async def test_cursor_walks_every_user_once(client: httpx.AsyncClient) -> None:
    """Following next_cursor visits each user exactly once, in order, and ends with null."""
    ids = await create_many(client, 25)
    seen: list[int] = []
    sizes: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 7} | ({"cursor": cursor} if cursor else {})
        page = (await client.get(USERS, params=params)).json()
        seen += [user["id"] for user in page["items"]]
        sizes.append(len(page["items"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert ids == seen
    assert [7, 7, 7, 4] == sizes


async def test_cursor_skips_nothing_when_users_are_added_and_deleted_between_pages(client: httpx.AsyncClient) -> None:
    """A keyset cursor is a position, not an offset: changes before it do not shift the pages."""
    ids = await create_many(client, 6)
    first = (await client.get(USERS, params={"limit": 4})).json()
    await client.delete(f"{USERS}/{ids[0]}")
    new = await create(client, "late@example.com")

    second = (await client.get(USERS, params={"limit": 4, "cursor": first["next_cursor"]})).json()

    assert [*ids[4:], new["id"]] == [user["id"] for user in second["items"]]


@pytest.mark.parametrize("count", [0, 3])
async def test_next_cursor_is_null_on_the_last_page(client: httpx.AsyncClient, count: int) -> None:
    """A page that holds the rest, even exactly the rest, has no next cursor."""
    await create_many(client, count)

    page = (await client.get(USERS, params={"limit": 3})).json()

    assert count == len(page["items"])
    assert None is page["next_cursor"]


@pytest.mark.parametrize(
    "cursor", ["", "abc", "!!!!!!!!!!!", "AAAAAAAAAAB", "AAAAAAAAAAA=", "AAAAAAAAAAAA", "é" * 11, "A" * 10000, "null"]
)
async def test_malformed_cursor_is_422(client: httpx.AsyncClient, cursor: str) -> None:
    """A cursor the service did not make is a client error, never a 500."""
    await create_many(client, 2)

    response = await client.get(USERS, params={"cursor": cursor})

    assert ["query", "cursor"] == assert_problem(response, 422)["errors"][0]["loc"]


# --- POST /api/v1/users --------------------------------------------------------------------


async def test_create_user_is_201_with_location_and_etag(client: httpx.AsyncClient) -> None:
    """A created user is answered 201, with where it lives and its version."""
    response = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada Lovelace"})

    assert 201 == response.status_code
    user = response.json()
    assert f"/api/v1/users/{user['id']}" == response.headers["location"]
    assert re.fullmatch(r'"[^"]+"', response.headers["etag"])
    assert {"email": "ada@example.com", "name": "Ada Lovelace", "is_active": True} == {
        key: user[key] for key in ("email", "name", "is_active")
    }


async def test_created_users_get_increasing_ids(client: httpx.AsyncClient) -> None:
    """Ids are assigned by the server in creation order."""
    ids = await create_many(client, 3)

    assert sorted(set(ids)) == ids


# --- PATCH /api/v1/users/{id} --------------------------------------------------------------


async def test_patch_changes_only_the_given_fields(client: httpx.AsyncClient, user: dict[str, Any]) -> None:
    """Fields left out of a PATCH keep their values."""
    response = await client.patch(f"{USERS}/{user['id']}", json={"name": "Augusta Ada King"})

    assert 200 == response.status_code
    assert {**user, "name": "Augusta Ada King", "updated_at": response.json()["updated_at"]} == response.json()
    assert response.json() == (await client.get(f"{USERS}/{user['id']}")).json()


async def test_patch_changes_updated_at_and_etag(client: httpx.AsyncClient) -> None:
    """Every real update moves updated_at forward and gives a new ETag; created_at stays."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    user = created.json()
    etags = {created.headers["etag"]}
    for body in ({"name": "Ada L."}, {"is_active": False}, {"email": "ada@lovelace.org"}):
        response = await client.patch(f"{USERS}/{user['id']}", json=body)
        assert 200 == response.status_code
        assert response.headers["etag"] not in etags
        assert response.json()["updated_at"] > user["updated_at"]
        assert user["created_at"] == response.json()["created_at"]
        etags.add(response.headers["etag"])
        user = response.json()

    assert response.headers["etag"] == (await client.get(f"{USERS}/{user['id']}")).headers["etag"]


@pytest.mark.parametrize(
    "body",
    [{}, {"name": "Ada Lovelace"}, {"name": "  Ada Lovelace "}, {"email": "ada@EXAMPLE.com"}, {"is_active": True}],
)
async def test_patch_that_changes_nothing_keeps_updated_at_and_etag(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    """A PATCH that sets every field to the value it has is not an update."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada Lovelace"})

    response = await client.patch(f"{USERS}/{created.json()['id']}", json=body)

    assert 200 == response.status_code
    assert created.json() == response.json()
    assert created.headers["etag"] == response.headers["etag"]


async def test_patch_missing_user_is_404(client: httpx.AsyncClient) -> None:
    """There is nothing to update."""
    assert_problem(await client.patch(f"{USERS}/1", json={"name": "Ada"}), 404)


@pytest.mark.parametrize("email", ["grace@example.com", "GRACE@Example.com"])
async def test_patch_to_taken_email_is_409(client: httpx.AsyncClient, email: str) -> None:
    """An update may not take another user's email, in any case; the user stays as it was."""
    ada = await create(client, "ada@example.com")
    await create(client, "grace@example.com")

    assert_problem(await client.patch(f"{USERS}/{ada['id']}", json={"email": email}), 409)
    assert ada == (await client.get(f"{USERS}/{ada['id']}")).json()


async def test_patch_may_change_the_case_of_ones_own_email(client: httpx.AsyncClient, user: dict[str, Any]) -> None:
    """A user does not conflict with itself."""
    response = await client.patch(f"{USERS}/{user['id']}", json={"email": "ADA@example.com"})

    assert 200 == response.status_code
    assert "ADA@example.com" == response.json()["email"]


# --- DELETE /api/v1/users/{id} -------------------------------------------------------------


async def test_delete_user_is_204_with_empty_body_then_404(client: httpx.AsyncClient, user: dict[str, Any]) -> None:
    """A deleted user is gone."""
    response = await client.delete(f"{USERS}/{user['id']}")

    assert 204 == response.status_code
    assert b"" == response.content
    assert_problem(await client.get(f"{USERS}/{user['id']}"), 404)
    assert_problem(await client.delete(f"{USERS}/{user['id']}"), 404)


async def test_delete_missing_user_is_404(client: httpx.AsyncClient) -> None:
    """There is nothing to delete."""
    assert_problem(await client.delete(f"{USERS}/1"), 404)


async def test_deleted_email_can_be_used_again(client: httpx.AsyncClient, user: dict[str, Any]) -> None:
    """Uniqueness is among existing users only."""
    await client.delete(f"{USERS}/{user['id']}")

    assert "ADA@example.com" == (await create(client, "ADA@example.com"))["email"]


async def test_ids_of_deleted_users_are_never_given_again(client: httpx.AsyncClient) -> None:
    """A new user never takes a deleted user's id, so an old URL and ETag cannot reach a stranger."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"
    await client.delete(path)

    new = await create(client, "grace@example.com")

    assert new["id"] > created.json()["id"]
    assert_problem(await client.patch(path, json={"name": "Ada"}, headers={"If-Match": created.headers["etag"]}), 404)


# --- If-Match ------------------------------------------------------------------------------


CONDITIONAL = [("PATCH", {"name": "Changed"}), ("DELETE", None)]


@pytest.mark.parametrize("if_match", ['"999"', 'W/"1"', '"a", "b"', "", "garbage"])
@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_if_match_that_does_not_match_is_412_and_changes_nothing(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None, if_match: str
) -> None:
    """A write conditioned on another version does nothing; a weak tag never matches."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"
    tag = created.headers["etag"]
    if_match = if_match.replace('W/"1"', f"W/{tag}")

    assert_problem(await client.request(method, path, json=body, headers={"If-Match": if_match}), 412)
    after = await client.get(path)
    assert created.json() == after.json()
    assert tag == after.headers["etag"]


@pytest.mark.parametrize("if_match", ["{tag}", '"999", {tag}', "*"])
@pytest.mark.parametrize(("method", "body", "status"), [("PATCH", {"name": "Changed"}, 200), ("DELETE", None, 204)])
async def test_if_match_that_matches_succeeds(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None, status: int, if_match: str
) -> None:
    """The current ETag, alone or in a list, or *, lets the write through."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"

    response = await client.request(
        method, path, json=body, headers={"If-Match": if_match.replace("{tag}", created.headers["etag"])}
    )

    assert status == response.status_code, response.text


async def test_if_match_with_an_old_etag_is_412(client: httpx.AsyncClient) -> None:
    """After an update the ETag that was read before it no longer matches."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"
    await client.patch(path, json={"name": "Changed"})

    for method, body in CONDITIONAL:
        assert_problem(
            await client.request(method, path, json=body, headers={"If-Match": created.headers["etag"]}), 412
        )


@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_if_match_on_missing_user_is_404(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None
) -> None:
    """A precondition about a user that does not exist does not hide that it does not exist."""
    response = await client.request(method, f"{USERS}/1", json=body, headers={"If-Match": "*"})

    assert_problem(response, 404)


# --- Errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nowhere", "/api/v1/user", "/api/v2/users", "/api/v1/users/1/friends"])
async def test_unknown_path_is_404_problem(client: httpx.AsyncClient, path: str) -> None:
    """Paths the API does not have are problems like any other."""
    assert_problem(await client.get(path), 404)


@pytest.mark.parametrize(("method", "path"), [("PUT", f"{USERS}/1"), ("DELETE", USERS), ("POST", f"{USERS}/1")])
async def test_wrong_method_is_405_problem_with_allow(client: httpx.AsyncClient, method: str, path: str) -> None:
    """A path that exists, with a method it does not take, says which methods it takes."""
    response = await client.request(method, path)

    assert_problem(response, 405)
    assert method not in response.headers["allow"]
    assert "GET" in response.headers["allow"]


BODY_LIMIT = settings.max_body_size


def padded_body(size: int) -> bytes:
    """A valid create request, padded with white space to exactly size bytes."""
    body = json.dumps({"email": "ada@example.com", "name": "Ada"}).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_body_over_the_limit_is_413_problem(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str
) -> None:
    """A body over the configured size is refused, with or without a Content-Length, unread past the limit."""
    path = path.replace("/1", f"/{user['id']}")
    headers = {"Content-Type": "application/json"}
    sent = 0

    async def endless_chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < 100 * BODY_LIMIT:
            sent += 1024
            yield b" " * 1024

    assert_problem(await client.request(method, path, content=padded_body(BODY_LIMIT + 1), headers=headers), 413)
    assert_problem(await client.request(method, path, content=endless_chunks(), headers=headers), 413)
    assert BODY_LIMIT + 1024 >= sent
    assert user == (await client.get(f"{USERS}/{user['id']}")).json()


async def test_body_of_exactly_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    """The limit is inclusive."""
    response = await client.post(USERS, content=padded_body(BODY_LIMIT), headers={"Content-Type": "application/json"})

    assert 201 == response.status_code


@pytest.mark.parametrize(("method", "path"), [("GET", "/nowhere"), ("DELETE", f"{USERS}/1"), ("GET", USERS)])
async def test_body_over_the_limit_is_413_problem_where_no_body_is_read(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    """Even a route that reads no body answers an oversized one with a problem, not plain text."""
    response = await client.request(method, path, content=padded_body(BODY_LIMIT + 1))

    assert_problem(response, 413)
    assert response.headers["x-request-id"]


async def test_error_bodies_carry_no_stack_trace_sql_or_driver_message(client: httpx.AsyncClient) -> None:
    """Whatever went wrong, the answer says it in the service's words only."""
    await create(client)
    responses = [
        await client.post(USERS, json={"email": "ADA@example.com", "name": "Dup"}),
        await client.post(USERS, json={"email": "bad", "name": "x" * 101}),
        await client.post(USERS, content=b"{", headers={"Content-Type": "application/json"}),
        await client.get(f"{USERS}/{2**63 - 1}"),
        await client.get(USERS, params={"cursor": "!"}),
    ]

    for response in responses:
        assert response.status_code >= 400
        text = response.text.lower()
        for leak in (
            "traceback",
            "select ",
            "insert ",
            "sqlalchemy",
            "integrityerror",
            "duplicate entry",
            "unique constraint",
            'file "',
        ):
            assert leak not in text, response.text


# --- X-Request-ID --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", USERS, f"{USERS}/1", "/nowhere"])
async def test_sane_request_id_is_echoed(client: httpx.AsyncClient, path: str) -> None:
    """A client's own request id comes back, on successes and errors alike."""
    response = await client.get(path, headers={"X-Request-ID": "client-42.a:b_c"})

    assert "client-42.a:b_c" == response.headers["x-request-id"]


async def test_request_id_is_generated_when_absent(client: httpx.AsyncClient) -> None:
    """Without one, every response gets a new id."""
    first = (await client.get("/health")).headers["x-request-id"]
    second = (await client.get("/health")).headers["x-request-id"]

    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", first)
    assert first != second


@pytest.mark.parametrize("request_id", ["x" * 500, "has spaces", "", "<script>", "a\tb", "ünïcode", "a,b"])
async def test_insane_request_id_is_replaced(client: httpx.AsyncClient, request_id: str) -> None:
    """A request id that is too long or has odd characters is not echoed into logs and headers."""
    response = await client.get("/health", headers=[(b"X-Request-ID", request_id.encode())])

    assert request_id != response.headers["x-request-id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", response.headers["x-request-id"])


# --- /health and the documentation ---------------------------------------------------------


async def test_health_is_200_with_pool_figures(client: httpx.AsyncClient) -> None:
    """A healthy service says so, checks the database, and shows how busy its pool is."""
    response = await client.get("/health")

    assert 200 == response.status_code
    body = response.json()
    assert "ok" == body["status"]
    assert {"database": "ok"} == body["checks"]
    assert {"size", "checked_out", "overflow", "max_overflow"} <= body["pool"].keys()
    assert all(isinstance(value, int) and value >= 0 for value in body["pool"].values())


OPERATIONS = {
    ("/health", "get"): {"200", "503"},
    (USERS, "get"): {"200", "401", "422", "429", "503"},
    (USERS, "post"): {"201", "401", "409", "413", "422", "429", "503"},
    (f"{USERS}/{{user_id}}", "get"): {"200", "401", "404", "422", "429", "503"},
    (f"{USERS}/{{user_id}}", "patch"): {"200", "401", "404", "409", "412", "413", "422", "429", "503"},
    (f"{USERS}/{{user_id}}", "delete"): {"204", "401", "404", "412", "422", "429", "503"},
}


async def test_openapi_lists_every_route_and_status_code(client: httpx.AsyncClient) -> None:
    """The schema documents each answer a route can give."""
    paths = (await client.get("/openapi.json")).json()["paths"]

    assert OPERATIONS == {
        (path, method): set(operation["responses"])
        for path, item in paths.items()
        for method, operation in item.items()
    }


async def test_openapi_documents_errors_as_problem_json(client: httpx.AsyncClient) -> None:
    """Every error answer is described as the application/problem+json it is served as."""
    schema = (await client.get("/openapi.json")).json()

    for item in schema["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert ["application/problem+json"] == list(response["content"]), (status, response)
                    problem = response["content"]["application/problem+json"]["schema"]
                    assert {"type", "title", "status", "detail"} <= problem["properties"].keys()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_work_without_internet(client: httpx.AsyncClient, page: str) -> None:
    """Swagger UI and ReDoc load only assets the service serves itself."""
    response = await client.get(page)

    assert 200 == response.status_code
    assert "text/html" in response.headers["content-type"]
    assert not re.search(r"https?://|//[a-z]", response.text, re.IGNORECASE), response.text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
    assert assets
    for asset in assets:
        assert asset.startswith("/static/"), asset
        served = await client.get(asset)
        assert 200 == served.status_code, asset
        assert served.content


# --- Races, with real concurrency ----------------------------------------------------------
# asyncio.gather runs the requests at once on the event loop; each holds its own pooled
# connection, so the database, not the order of the test, decides who wins.

RACERS = 10


async def test_concurrent_creates_with_one_email_give_one_201(client: httpx.AsyncClient) -> None:
    """Of many requests racing for one email, in different cases, exactly one creates the user."""
    emails = ["".join(c.upper() if n >> i & 1 else c for i, c in enumerate("ada")) + "@Example.com" for n in range(8)]
    emails += ["ada@EXAMPLE.COM", "ada@example.com"]

    responses = await asyncio.gather(*(client.post(USERS, json={"email": e, "name": "Ada"}) for e in emails))

    assert [201] + [409] * (len(emails) - 1) == sorted(r.status_code for r in responses)
    assert 1 == len((await client.get(USERS)).json()["items"])


async def test_concurrent_patches_with_one_if_match_give_one_200(client: httpx.AsyncClient) -> None:
    """Of writers that all read the same version, exactly one may write on it."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path, tag = f"{USERS}/{created.json()['id']}", created.headers["etag"]

    responses = await asyncio.gather(
        *(client.patch(path, json={"name": f"Writer {n}"}, headers={"If-Match": tag}) for n in range(RACERS))
    )

    assert [200] + [412] * (RACERS - 1) == sorted(r.status_code for r in responses)
    [winner] = [r for r in responses if r.status_code == 200]
    assert winner.json() == (await client.get(path)).json()


async def test_concurrent_patches_without_if_match_all_succeed(client: httpx.AsyncClient) -> None:
    """Without If-Match the last write wins, and no write is lost or refused."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"

    responses = await asyncio.gather(*(client.patch(path, json={"name": f"Writer {n}"}) for n in range(RACERS)))

    assert [200] * RACERS == [r.status_code for r in responses]
    assert RACERS + 1 == len({created.headers["etag"], *(r.headers["etag"] for r in responses)})


@pytest.mark.parametrize("if_match", [None, "{tag}"])
async def test_concurrent_deletes_give_one_204(client: httpx.AsyncClient, if_match: str | None) -> None:
    """A user is deleted once; the other racers find it gone."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"
    headers = {"If-Match": if_match.replace("{tag}", created.headers["etag"])} if if_match else {}

    responses = await asyncio.gather(*(client.delete(path, headers=headers) for _ in range(RACERS)))

    assert [204] + [404] * (RACERS - 1) == sorted(r.status_code for r in responses)


# --- Configuration -------------------------------------------------------------------------


def test_env_example_lists_every_setting() -> None:
    """.env.example names each field of settings.py, and nothing else, and loads as it is."""
    lines = (Path(__file__).parent / ".env.example").read_text().splitlines()
    # A setting line is KEY=value, or "# KEY=value" for one that is best left unset.
    keys = {m[1].lower() for line in lines if (m := re.fullmatch(r"(?:# )?([A-Z_]+)=.*", line))}

    assert set(type(settings).model_fields) == keys
    type(settings)(_env_file=Path(__file__).parent / ".env.example")
