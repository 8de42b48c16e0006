"""The service's specification, rule by rule, through the whole ASGI app and against real databases.

Each test of the app runs twice: on a fresh SQLite file, and on MariaDB (TEST_MYSQL_URL); the
fixtures and the servers the tests start are in conftest.py. The sections, in order: the
resource and its fields, request bodies, each route in CRUD order, If-Match, errors,
X-Request-ID, /health and the documentation, races, Idempotency-Key, API keys, input limits,
error answers that tell nothing of the inside, schemathesis, the schema's limits, and a client
generated from the schema. The machinery has tests of its own beside this file:
test_database.py, test_production.py, test_ratelimit.py, test_observability.py, test_settings.py.
"""

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import unicodedata
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import insert, make_url, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import crud
import emails
import idempotency
import main
import problems
import schema
from conftest import (
    HERE,
    KEYS,
    LEAKS,
    RFC3339_MICROSECONDS,
    USERS,
    Server,
    asgi_client,
    assert_problem,
    auth_header,
    count_users,
    create,
    free_port,
    fresh_database,
    new_user,
    read_response,
    render,
    report,
    service_env,
)
from models import IdempotencyKey, User
from settings import settings
from test_emails import a_label_spelling, addresses, swap_ascii_case

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

    assert [email for email, _ in schema.DEMO_USERS] == [user["email"] for user in response.json()["items"]]


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


async def test_email_whose_key_is_exactly_254_characters_is_201(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """An address whose lower-cased key has 254 characters (İ lower-cases to two) fits the key's column."""
    email = "İ" * 32 + "@" + domain_of_length(254 - 32 * 2 - 1)
    assert (222, 254) == (len(email), len(email.lower()))

    user = await create(client, email)

    assert email == user["email"]
    assert [(email, email.lower())] == await stored_emails(engine)


# 254 characters as sent and stored, but 286 lower-cased: a 500 from MariaDB's VARCHAR(254) before.
KEY_OVER_254 = "İ" * 32 + "@" + domain_of_length(254 - 32 - 1)
KEY_RULE = (
    "must be at most 254 characters once lower-cased, as it is compared;"
    " some letters lower-case to two characters (İ, for one)"
)


async def stored_emails(engine: AsyncEngine) -> list[tuple[str, str]]:
    """Every user's email and email_key as the database holds them, by id."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(User.email, User.email_key).order_by(User.id))
    return [(email, key) for email, key in rows]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_email_whose_key_is_over_254_characters_is_422_and_writes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, user: dict[str, Any], method: str
) -> None:
    """254 characters, 286 once lower-cased (32 İ): 422 naming the rule, on every database, and no row changes."""
    assert (254, 286) == (len(KEY_OVER_254), len(KEY_OVER_254.lower()))
    path = USERS if method == "POST" else f"{USERS}/{user['id']}"

    response = await client.request(method, path, json={"email": KEY_OVER_254, "name": "Ada"})

    assert [{"loc": ["body", "email"], "msg": KEY_RULE}] == assert_problem(response, 422)["errors"]
    assert [user] == (await client.get(USERS)).json()["items"]
    assert [("ada@example.com", "ada@example.com")] == await stored_emails(engine)


# One address, José@exämple.com, as a client may spell it.
NFC = "Jos\u00e9@ex\u00e4mple.com"
NFD = "Jose\u0301@exa\u0308mple.com"
A_LABEL = "Jos\u00e9@xn--exmple-cua.com"


@pytest.mark.parametrize("first", [NFC, NFD, A_LABEL], ids=["NFC", "NFD", "A-label"])
async def test_nfc_nfd_and_a_label_spellings_of_one_address_are_one_user(client: httpx.AsyncClient, first: str) -> None:
    """Whichever spelling comes first is created; the other two are 409, as is an upper-case one."""
    user = await create(client, first)

    for spelling in [s for s in (NFC, NFD, A_LABEL) if s != first] + ["JOSÉ@EXÄMPLE.COM"]:
        taken = await client.post(USERS, json={"email": spelling, "name": "Other"})
        assert_problem(taken, 409)
    assert [user] == (await client.get(USERS)).json()["items"]


async def test_email_is_stored_and_returned_in_nfc_with_a_unicode_host_name(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Sent decomposed, with an upper-case A-label: stored and returned as José@exämple.com, in NFC."""
    sent = "Jose\u0301@XN--EXMPLE-CUA.COM"

    user = await create(client, sent)

    assert NFC == user["email"]
    assert unicodedata.is_normalized("NFC", user["email"])
    assert NFC == (await client.get(f"{USERS}/{user['id']}")).json()["email"]
    assert [NFC] == [u["email"] for u in (await client.get(USERS)).json()["items"]]
    assert [(NFC, "jos\u00e9@ex\u00e4mple.com")] == await stored_emails(engine)


async def test_email_patched_to_another_spelling_of_a_taken_address_is_409(
    client: httpx.AsyncClient, user: dict[str, Any]
) -> None:
    """PATCH is held to the same identity as POST: another user's address in another spelling is taken."""
    other = await create(client, NFC)

    response = await client.patch(f"{USERS}/{user['id']}", json={"email": NFD})

    assert_problem(response, 409)
    assert NFC == (await client.get(f"{USERS}/{other['id']}")).json()["email"]


async def test_spellings_of_one_address_racing_give_one_201(client: httpx.AsyncClient) -> None:
    """Of requests racing with the NFC, NFD and A-label spellings of one address, exactly one creates the user."""
    spellings = [NFC, NFD, A_LABEL, "JOSÉ@EXÄMPLE.COM", "Jose\u0301@XN--EXMPLE-CUA.COM"] * 2

    responses = await asyncio.gather(*(client.post(USERS, json={"email": e, "name": "José"}) for e in spellings))

    assert [201] + [409] * (len(spellings) - 1) == sorted(r.status_code for r in responses)
    assert 1 == len((await client.get(USERS)).json()["items"])


JSON = {"Content-Type": "application/json"}
NOT_UNICODE = "Input should be a valid string, unable to parse raw data as a unicode string"
# Spellings the property test always tries, beside what it draws: each valid, each with a twist.
HARD_ADDRESSES = [
    NFD,
    A_LABEL,
    "İ" * 32 + "@" + domain_of_length(254 - 32 * 2 - 1),  # a key of exactly 254
    "Δοκιμή@παράδειγμα.δοκιμή",
    "J\u030cane@example.com",  # J̌: no precomposed form, but its lower case ǰ has one
    "ada@\u05e9\u05dc\u05d5\u05dd.com",  # a right-to-left host name
    KEY_OVER_254,  # refused
]


@hypothesis.settings(
    max_examples=100,
    deadline=None,
    database=None,
    # One table for every example (the client fixture empties it once), and each example deletes its user.
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture, hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(address=st.one_of(st.sampled_from(HARD_ADDRESSES), addresses()))
async def test_every_accepted_address_is_stored_read_back_and_found_by_its_other_spellings(
    client: httpx.AsyncClient, lifespan_state: dict[str, Any], address: str
) -> None:
    """An address is 201 exactly when canonical() accepts it, else 422 with its rule; never a 500.

    Once created it reads back as canonical() stores it, and its NFD, A-label and case-swapped
    spellings are 409. test_emails.py shows the strategy reaches valid Unicode and A-label addresses.
    """
    # A client of its own per example: a new address, so no example meets the rate limit.
    async with asgi_client(lifespan_state) as each:
        # ASCII-only JSON: the strategy draws lone surrogates too, which only an escape can carry.
        response = await each.post(USERS, content=json.dumps({"email": address, "name": "Ada"}).encode(), headers=JSON)
        try:
            stored = emails.canonical(address)
        except ValueError as refused:
            hypothesis.event("refused")
            # A lone surrogate is no string to pydantic, which refuses it before canonical() is asked.
            rule = NOT_UNICODE if any("\ud800" <= c <= "\udfff" for c in address) else str(refused)
            assert [{"loc": ["body", "email"], "msg": rule}] == assert_problem(response, 422)["errors"]
            return
        hypothesis.event(
            "accepted", "A-label" if "xn--" in address.lower() else "Unicode" if not address.isascii() else "ASCII"
        )
        assert 201 == response.status_code, response.text
        user = response.json()
        try:
            assert stored == user["email"]
            assert user == (await each.get(f"{USERS}/{user['id']}")).json()
            for spelling in {
                unicodedata.normalize("NFD", address),
                unicodedata.normalize("NFD", stored),
                a_label_spelling(stored),
                swap_ascii_case(stored),
            }:
                body = json.dumps({"email": spelling, "name": "Other"}).encode()
                again = await each.post(USERS, content=body, headers=JSON)
                assert 409 == again.status_code, (spelling, again.text)
        finally:
            assert 204 == (await each.delete(f"{USERS}/{user['id']}")).status_code


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


def aimed_at(path: str, user: dict[str, Any]) -> str:
    """The path of a WRITES case, with the PATCH aimed at user."""
    return path.replace("/1", f"/{user['id']}")


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_unknown_field_is_422(client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str) -> None:
    """A field the resource does not have is rejected, not ignored."""
    body = {"email": "grace@example.com", "name": "Grace", "is_admin": True}
    response = await client.request(method, aimed_at(path, user), json=body)

    assert ["body", "is_admin"] == assert_problem(response, 422)["errors"][0]["loc"]


@pytest.mark.parametrize("field", ["email", "name", "is_active"])
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_null_for_any_field_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, field: str
) -> None:
    """null is not a value for any field, on create or update."""
    body: dict[str, Any] = {"email": "grace@example.com", "name": "Grace", field: None}
    response = await client.request(method, aimed_at(path, user), json=body)

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
    response = await client.request(method, aimed_at(path, user), json=body)

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
        method, aimed_at(path, user), content=content, headers={"Content-Type": "application/json"}
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
    response = await client.request(method, aimed_at(path, user), json=body)

    assert ["body", field] == assert_problem(response, 422)["errors"][0]["loc"][:2]


@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_422_for_a_wrong_type_names_the_field_and_the_rule_never_a_function(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str
) -> None:
    """An email that is not a string is told so, at ["body", "email"]: no function of ours, no "should be None"."""
    response = await client.request(method, aimed_at(path, user), json={"email": 5, "name": "Grace"})

    errors = assert_problem(response, 422)["errors"]
    assert [{"loc": ["body", "email"], "msg": "Input should be a valid string"}] == errors


# What a 422 must never say: pydantic's "Value error, " prefix, or a name from our code.
NOT_A_RULE = re.compile(r"Value error|function-|\w\(\)|canonical|normalize|not_null|label_forms|host_name")
CANONICAL_RULE = None  # the test asks canonical() what it refuses the address with


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("email", "ada@localhost", CANONICAL_RULE),
        ("email", "ada.@example.com", CANONICAL_RULE),
        ("email", '"ada"@example.com', CANONICAL_RULE),
        ("email", "ada@exa_mple.com", CANONICAL_RULE),
        ("email", "ada@\u05e9\u05dc\u05d5\u05dd.0.com", CANONICAL_RULE),
        ("email", "ada\ud800@example.com", NOT_UNICODE),
        ("email", KEY_OVER_254, KEY_RULE),
        (
            "email",
            "a" * emails.MAX_SPELLING + "@example.com",
            f"String should have at most {emails.MAX_SPELLING} characters",
        ),
        ("email", 5, "Input should be a valid string"),
        ("email", None, "Input should be a valid string"),
        ("name", "", "String should have at least 1 character"),
        ("name", " \t ", "String should have at least 1 character"),
        ("name", "x" * 101, "String should have at most 100 characters"),
        ("name", ["Ada"], "Input should be a valid string"),
        ("name", None, "Input should be a valid string"),
    ],
)
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_422_of_an_email_or_a_name_says_the_rule_and_names_no_function_of_ours(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, field: str, value: Any, rule: str | None
) -> None:
    """The msg is the rule itself, at the field: no "Value error, " before it, no canonical() or function-after[...]."""
    if rule is None:
        with pytest.raises(ValueError) as refused:
            emails.canonical(value)
        rule = str(refused.value)
    if value is None and method == "PATCH":
        rule = "may be left out, but not null"
    body = json.dumps({"email": "grace@example.com", "name": "Grace", field: value}).encode()

    response = await client.request(method, aimed_at(path, user), content=body, headers=JSON)

    errors = assert_problem(response, 422)["errors"]
    assert [{"loc": ["body", field], "msg": rule}] == errors
    assert not NOT_A_RULE.search(json.dumps(errors, ensure_ascii=False))


@pytest.mark.parametrize("body", [[], "ada@example.com", 1, None])
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_body_that_is_not_an_object_is_422(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, body: Any
) -> None:
    """The body is one JSON object."""
    response = await client.request(method, aimed_at(path, user), json=body)

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


@pytest.mark.parametrize(
    "user_id", ["0", "-1", str(2**63), str(2**64), "abc", "1.5", "1e3", "%20", "3%09", "%203", "1_000", "+1", "%D9%A3"]
)
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
async def test_id_that_is_not_a_positive_64_bit_integer_is_422(
    client: httpx.AsyncClient, method: str, user_id: str
) -> None:
    """0, negatives, 2**63 and non-numbers are not ids: 422, never 500."""
    body = {"name": "Ada"} if method == "PATCH" else None
    response = await client.request(method, f"{USERS}/{user_id}", json=body)

    assert ["path", "user_id"] == assert_problem(response, 422)["errors"][0]["loc"]


@pytest.mark.parametrize("if_none_match", ["{tag}", "*", "W/{tag}", '"999", {tag}'])
async def test_get_with_if_none_match_naming_the_current_etag_is_304_with_the_etag_and_no_body(
    client: httpx.AsyncClient, if_none_match: str
) -> None:
    """A client that holds the current version is told so, with nothing to download (RFC 9110, 13.1.2)."""
    user = await create(client)
    tag = (await client.get(f"{USERS}/{user['id']}")).headers["etag"]

    response = await client.get(f"{USERS}/{user['id']}", headers={"If-None-Match": if_none_match.format(tag=tag)})

    assert (304, tag, b"") == (response.status_code, response.headers["etag"], response.content)


@pytest.mark.parametrize("if_none_match", ['"999"', 'W/"999"', ""])
async def test_get_with_if_none_match_naming_another_etag_is_200(client: httpx.AsyncClient, if_none_match: str) -> None:
    """An old or unknown tag, or an empty header, gets the user as always."""
    user = await create(client)

    response = await client.get(f"{USERS}/{user['id']}", headers={"If-None-Match": if_none_match})

    assert (200, user) == (response.status_code, response.json())


async def test_get_with_if_none_match_of_a_missing_user_is_404(client: httpx.AsyncClient) -> None:
    """If-None-Match: * holds for a user that does not exist: its 404, not a 304."""
    assert_problem(await client.get(f"{USERS}/{2**40}", headers={"If-None-Match": "*"}), 404)


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


@pytest.mark.parametrize("if_match", ['"999"', 'W/"1"', '"a", "b"', '"01"', '"+1"', "garbage"])
@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_if_match_that_does_not_match_is_412_and_changes_nothing(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None, if_match: str
) -> None:
    """A write conditioned on another version does nothing; a weak tag never matches, and tags compare byte for byte."""
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


@pytest.mark.parametrize("if_match", ["", "  "])
@pytest.mark.parametrize(("method", "body", "status"), [("PATCH", {"name": "Changed"}, 200), ("DELETE", None, 204)])
async def test_empty_if_match_is_treated_as_absent(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None, status: int, if_match: str
) -> None:
    """An empty If-Match is an empty list of tags, which RFC 9110 lets a server treat as no header."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"

    response = await client.request(method, path, json=body, headers={"If-Match": if_match})

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


@pytest.mark.parametrize("if_none_match", ["*", "{tag}", "W/{tag}"])
@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_write_with_if_none_match_naming_the_current_version_is_412_and_changes_nothing(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, body: dict[str, Any] | None, if_none_match: str
) -> None:
    """RFC 9110, 13.1.2: a false If-None-Match on PATCH or DELETE is 412, and the method is not performed."""
    path = f"{USERS}/{user['id']}"
    tag = (await client.get(path)).headers["etag"]

    response = await client.request(method, path, json=body, headers={"If-None-Match": if_none_match.format(tag=tag)})

    assert_problem(response, 412)
    assert user == (await client.get(path)).json()


@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_write_with_if_none_match_naming_another_version_goes_ahead(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, body: dict[str, Any] | None
) -> None:
    """If-None-Match naming only an old version holds: the write is made."""
    response = await client.request(method, f"{USERS}/{user['id']}", json=body, headers={"If-None-Match": '"9"'})

    assert {"PATCH": 200, "DELETE": 204}[method] == response.status_code, response.text


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
    path = aimed_at(path, user)
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
        assert not LEAKS.search(response.text), response.text


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


# 413 and 500 on every operation: the middleware answers them on any path.
OPERATIONS = {
    ("/health", "get"): {"200", "413", "431", "500", "503"},
    ("/livez", "get"): {"200", "413", "431", "500"},
    ("/readyz", "get"): {"200", "413", "431", "500", "503"},
    ("/metrics", "get"): {"200", "401", "413", "431", "500"},
    (USERS, "get"): {"200", "400", "401", "413", "431", "422", "429", "500", "503"},
    (USERS, "post"): {"201", "400", "401", "409", "413", "431", "422", "429", "500", "503"},
    (f"{USERS}/{{user_id}}", "get"): {"200", "304", "400", "401", "404", "413", "431", "422", "429", "500", "503"},
    (f"{USERS}/{{user_id}}", "patch"): {
        "200",
        "400",
        "401",
        "404",
        "409",
        "412",
        "413",
        "431",
        "422",
        "429",
        "500",
        "503",
    },
    (f"{USERS}/{{user_id}}", "delete"): {"204", "401", "404", "412", "413", "431", "422", "429", "500", "503"},
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
                    assert {"$ref": "#/components/schemas/Problem"} == problem
    problem = schema["components"]["schemas"]["Problem"]
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


async def test_concurrent_patches_with_if_match_star_all_succeed(client: httpx.AsyncClient) -> None:
    """If-Match: * matches whatever version is current, so a writer that loses a race retries, never 412."""
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    path = f"{USERS}/{created.json()['id']}"

    responses = await asyncio.gather(
        *(client.patch(path, json={"name": f"Writer {n}"}, headers={"If-Match": "*"}) for n in range(RACERS))
    )

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


# --- Retries: Idempotency-Key ---------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["{key}", '"{key}"'])
async def test_post_retried_with_its_idempotency_key_replays_the_first_answer(
    client: httpx.AsyncClient, engine: AsyncEngine, spelling: str
) -> None:
    """A retried POST gets the first answer again, marked Idempotent-Replayed, and creates no second user."""
    key = str(uuid.uuid4())
    body = {"email": "ada@example.com", "name": "Ada"}
    first = await client.post(USERS, json=body, headers={"Idempotency-Key": key})
    again = await client.post(USERS, json=body, headers={"Idempotency-Key": spelling.format(key=key)})

    assert 201 == first.status_code, first.text
    assert "idempotent-replayed" not in first.headers
    assert (201, first.content, "true") == (again.status_code, again.content, again.headers["idempotent-replayed"])
    assert (first.headers["location"], first.headers["etag"]) == (again.headers["location"], again.headers["etag"])
    assert 1 == await count_users(engine, "ada@example.com")


async def test_patch_retried_with_its_idempotency_key_is_applied_once(client: httpx.AsyncClient) -> None:
    """A retried PATCH replays its first answer: same body, same updated_at and ETag, no second write."""
    user = await create(client)
    path, key = f"{USERS}/{user['id']}", {"Idempotency-Key": "patch-1"}
    first = await client.patch(path, json={"name": "Changed"}, headers=key)
    again = await client.patch(path, json={"name": "Changed"}, headers=key)

    assert 200 == first.status_code, first.text
    assert (200, first.content, first.headers["etag"]) == (again.status_code, again.content, again.headers["etag"])
    assert "true" == again.headers["idempotent-replayed"]
    assert first.json() == (await client.get(path)).json()


async def test_kept_error_answers_are_replayed_too(client: httpx.AsyncClient) -> None:
    """A 409 for a taken email is kept with its key: the retry gets the same 409, even after the email is freed."""
    taken = await create(client)
    key = {"Idempotency-Key": "taken-1"}
    first = await client.post(USERS, json={"email": "ada@example.com", "name": "Other"}, headers=key)
    await client.delete(f"{USERS}/{taken['id']}")
    again = await client.post(USERS, json={"email": "ada@example.com", "name": "Other"}, headers=key)

    assert_problem(first, 409)
    assert (409, first.content, "true") == (again.status_code, again.content, again.headers["idempotent-replayed"])


async def test_idempotency_key_sent_with_another_body_is_422_and_writes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """The same key with another body is refused with 422, for POST and PATCH, and nothing is written."""
    key = {"Idempotency-Key": "reused"}
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"}, headers=key)
    path = f"{USERS}/{created.json()['id']}"
    patched = await client.patch(path, json={"name": "A"}, headers={"Idempotency-Key": "reused-too"})

    other_post = await client.post(USERS, json={"email": "grace@example.com", "name": "Grace"}, headers=key)
    other_patch = await client.patch(path, json={"name": "B"}, headers={"Idempotency-Key": "reused-too"})

    assert (201, 200) == (created.status_code, patched.status_code)
    assert_problem(other_post, 422)
    assert_problem(other_patch, 422)
    assert 0 == await count_users(engine, "grace@example.com")
    assert "A" == (await client.get(path)).json()["name"]


async def test_idempotency_key_used_with_another_method_or_path_is_422(client: httpx.AsyncClient) -> None:
    """A key that created a user cannot then update one, nor update another user than the first."""
    first, second = await create(client), await create(client, "grace@example.com")
    key = {"Idempotency-Key": "one-use"}
    created = await client.post(USERS, json={"email": "alan@example.com", "name": "Alan"}, headers=key)
    patch_1 = await client.patch(f"{USERS}/{first['id']}", json={"name": "X"}, headers={"Idempotency-Key": "p"})

    assert (201, 200) == (created.status_code, patch_1.status_code)
    assert_problem(await client.patch(f"{USERS}/{first['id']}", json={"name": "X"}, headers=key), 422)
    assert_problem(
        await client.patch(f"{USERS}/{second['id']}", json={"name": "X"}, headers={"Idempotency-Key": "p"}), 422
    )
    assert "Ada Lovelace" == (await client.get(f"{USERS}/{second['id']}")).json()["name"]


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, '"unclosed', "ünïcode", '"a"b"', "a,b"])
@pytest.mark.parametrize(("method", "path"), WRITES)
async def test_malformed_idempotency_key_is_400(
    client: httpx.AsyncClient, user: dict[str, Any], method: str, path: str, key: str
) -> None:
    """A key that is not 1 to 255 characters of A-Za-z0-9-_.: (bare or quoted) is 400, and nothing is written."""
    response = await client.request(
        method,
        aimed_at(path, user),
        json={"email": "new@example.com", "name": "New"},
        headers=[(b"idempotency-key", key.encode())],
    )

    assert_problem(response, 400)
    assert 1 == len((await client.get(USERS)).json()["items"])


async def test_validation_error_is_not_kept_so_the_corrected_request_succeeds(client: httpx.AsyncClient) -> None:
    """A 422 for an invalid body is not kept with its key: the fixed request with the same key runs."""
    key = {"Idempotency-Key": "fix-me"}
    invalid = await client.post(USERS, json={"email": "not an address", "name": "Ada"}, headers=key)
    fixed = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"}, headers=key)

    assert_problem(invalid, 422)
    assert 201 == fixed.status_code, fixed.text


async def test_concurrent_requests_with_one_idempotency_key_write_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """20 requests at once with one key: one user is created, and every answer is that one (replayed) or a 409."""
    body, key = {"email": "ada@example.com", "name": "Ada"}, {"Idempotency-Key": "racing"}

    responses = await asyncio.gather(*(client.post(USERS, json=body, headers=key) for _ in range(20)))

    originals = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert 1 == len(originals), [r.status_code for r in responses]
    replays = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    assert {originals[0].content} == {r.content for r in replays}
    assert set() == {r.status_code for r in responses if r not in originals and r not in replays} - {409}
    assert 1 == await count_users(engine, "ada@example.com")


async def test_a_connection_goes_back_to_autocommit_after_a_request_with_a_key(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """The transaction a key needs ends with its request: the next writes on that connection commit at once."""
    await client.post(USERS, json={"email": "keyed@example.com", "name": "K"}, headers={"Idempotency-Key": "k"})
    plain = [await create(client, f"plain-{n}@example.com") for n in range(3)]

    other = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with other.connect() as conn:
            seen = (await conn.scalars(select(User.id).where(User.email_key.like("plain-%")))).all()
    finally:
        await other.dispose()
    assert sorted(u["id"] for u in plain) == sorted(seen)


async def test_expired_idempotency_key_is_new_again(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """After IDEMPOTENCY_TTL_HOURS a key is forgotten: the same key runs the request anew."""
    key = {"Idempotency-Key": "old"}
    first = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"}, headers=key)
    async with engine.connect() as conn:
        hours = settings.idempotency_ttl_hours
        await conn.execute(
            update(IdempotencyKey).values(created_at=datetime.now(UTC) - timedelta(hours=hours, seconds=1))
        )

    again = await client.post(USERS, json={"email": "grace@example.com", "name": "Grace"}, headers=key)

    assert 201 == first.status_code, first.text
    assert 201 == again.status_code, again.text
    assert "idempotent-replayed" not in again.headers
    assert first.json()["id"] != again.json()["id"]


async def test_purge_deletes_expired_idempotency_keys_in_batches_and_keeps_the_rest(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """The purge removes every expired key, a batch at a time, and no key that is still valid."""
    for n in range(7):
        await client.post(USERS, json={"email": f"u{n}@example.com", "name": "U"}, headers={"Idempotency-Key": f"k{n}"})
    expired = datetime.now(UTC) - timedelta(hours=settings.idempotency_ttl_hours, minutes=1)
    async with engine.connect() as conn:
        await conn.execute(update(IdempotencyKey).where(IdempotencyKey.key != "k6").values(created_at=expired))

    deleted = await idempotency.delete_expired_keys(engine, batch=2)

    assert 6 == deleted
    async with engine.connect() as conn:
        assert ["k6"] == (await conn.scalars(select(IdempotencyKey.key))).all()


# --- Protection: API keys ------------------------------------------------------------------


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
async def test_production_without_api_keys_refuses_to_start_and_says_what_to_set(tmp_path: Path, server: str) -> None:
    """ENVIRONMENT=production with no API_KEYS exits non-zero at start, naming API_KEYS."""
    database = "mysql+aiomysql://app:s3cret@127.0.0.1:1/users"
    refusing = Server(tmp_path, server, workers=1, ENVIRONMENT="production", API_KEYS="", DATABASE_URL=database)
    code = await refusing.exit_code(within=60)
    output = refusing.log()
    assert 0 != code
    assert "ENVIRONMENT=production needs API_KEYS" in output
    assert "s3cret" not in output  # nor any piece of the other settings' secrets


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong-key", f"Bearer {KEYS[0]}x", f"Basic {KEYS[0]}", KEYS[0]],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_api_without_a_valid_key_is_401_with_www_authenticate(
    sqlite_service: Server, authorization: str | None, method: str
) -> None:
    """Without a key, with a wrong one or with another scheme, /api/v1 answers 401 and reads nothing more."""
    headers = {} if authorization is None else {"Authorization": authorization}
    path = f"{USERS}/1" if method == "DELETE" else USERS
    async with sqlite_service.client(key=None) as client:
        # A body too large and not even JSON: 401 comes before anything else is looked at.
        response = await client.request(method, path, headers=headers, content=b"x" * 100_000)
    assert_problem(response, 401)
    assert "Bearer" == response.headers["www-authenticate"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("key", KEYS)
async def test_each_configured_key_is_accepted_so_keys_rotate_without_downtime(
    sqlite_service: Server, key: str
) -> None:
    """Every key listed in API_KEYS opens /api/v1, the scheme name in any case."""
    async with sqlite_service.client(key=None) as client:
        for scheme in ("Bearer", "bearer"):
            response = await client.get(USERS, headers={"Authorization": f"{scheme} {key}"})
            assert 200 == response.status_code, response.text


async def test_health_and_schema_need_no_key_and_docs_are_off_in_production(sqlite_service: Server) -> None:
    """/health and /openapi.json answer without a key; /docs and /redoc are 404 in production."""
    async with sqlite_service.client(key=None) as client:
        assert 200 == (await client.get("/health")).status_code
        assert 200 == (await client.get("/openapi.json")).status_code
        for page in ("/docs", "/redoc"):
            assert_problem(await client.get(page), 404)


async def test_docs_enabled_turns_docs_on_in_production(tmp_path: Path) -> None:
    """DOCS_ENABLED=true serves /docs and /redoc in production, from local files."""
    async with (
        Server(tmp_path, workers=1, ENVIRONMENT="production", DOCS_ENABLED="true") as server,
        server.client(key=None) as client,
    ):
        for page in ("/docs", "/redoc"):
            response = await client.get(page)
            assert 200 == response.status_code
            assert "cdn" not in response.text.lower()


async def test_openapi_declares_the_bearer_scheme_on_every_api_operation(sqlite_service: Server) -> None:
    """The schema declares HTTP bearer auth, so Swagger UI's Authorize button sends the key; /health needs none."""
    async with sqlite_service.client(key=None) as client:
        schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert [{"type": "http", "scheme": "bearer"}] == [
        {k: v for k, v in s.items() if k in ("type", "scheme")} for s in schemes.values()
    ]
    (name,) = schemes
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/api/"):
                assert [{name: []}] == operation.get("security"), f"{method} {path}"
                assert "401" in operation["responses"], f"{method} {path}"
            else:
                assert [] == operation.get("security"), f"{method} {path}"


async def test_python_main_py_serves_the_api_on_a_sqlite_file_in_its_folder(tmp_path: Path) -> None:
    """The README's run command, python main.py with no DATABASE_URL, serves the demo users from ./users.db."""
    port = free_port()
    env = {k: v for k, v in service_env(tmp_path, PORT=str(port)).items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "main.py"), cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth_header()) as client:
            for _ in range(150):
                with suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            response = await client.get(f"{USERS}/1")
    finally:
        process.terminate()
        await process.wait()

    assert 200 == response.status_code, response.text
    assert "ada@example.com" == response.json()["email"]
    assert (tmp_path / "users.db").exists()


async def test_development_without_keys_is_open_and_warns_loudly_at_start(tmp_path: Path) -> None:
    """With no API_KEYS, development serves /api/v1 to anyone and its log says so at start."""
    async with Server(tmp_path, "uvicorn", API_KEYS="") as server:
        async with server.client(key=None) as client:
            assert 200 == (await client.get(USERS)).status_code
        assert "API_KEYS is empty: /api/v1 is open to anyone" in server.log()


async def test_idempotency_keys_of_two_api_keys_are_apart(sqlite_service: Server) -> None:
    """One Idempotency-Key sent with two API keys is two keys: neither client is replayed the other's answer."""
    key = {"Idempotency-Key": "shared-name"}
    async with sqlite_service.client(KEYS[0]) as one, sqlite_service.client(KEYS[1]) as other:
        first = await one.post(USERS, json=new_user(), headers=key)
        second = await other.post(USERS, json=new_user(), headers=key)
        again = await one.post(USERS, json=new_user(), headers=key)

    assert (201, 201) == (first.status_code, second.status_code)
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert_problem(again, 422)  # the first client's key, with another body


async def test_openapi_declares_the_idempotency_key_with_its_answers(sqlite_service: Server) -> None:
    """POST and PATCH declare the Idempotency-Key header, and the 400, 409 and 422 it may bring."""
    async with sqlite_service.client() as client:
        paths = (await client.get("/openapi.json")).json()["paths"]

    for operation in (paths[USERS]["post"], paths[USERS + "/{user_id}"]["patch"]):
        assert "Idempotency-Key" in [p["name"] for p in operation["parameters"] if p["in"] == "header"]
        assert {"400", "409", "422"} <= operation["responses"].keys()


async def test_an_idempotency_key_belongs_to_the_api_key_however_the_header_is_spelt(sqlite_service: Server) -> None:
    """A retry that spells its Authorization otherwise (bearer, BEARER, two spaces) is the same client: replayed."""
    body, key = new_user(), {"Idempotency-Key": "spelt-otherwise"}
    answers = []
    async with sqlite_service.client(None) as client:
        for spelling in (f"Bearer {KEYS[0]}", f"bearer {KEYS[0]}", f"BEARER  {KEYS[0]}"):
            answers.append(await client.post(USERS, json=body, headers={**key, "Authorization": spelling}))

    assert [201, 201, 201] == [answer.status_code for answer in answers], [a.text for a in answers]
    assert [None, "true", "true"] == [answer.headers.get("idempotent-replayed") for answer in answers]
    assert 1 == len({answer.json()["id"] for answer in answers})


async def test_behind_a_root_path_the_api_still_needs_a_key_and_the_probes_are_still_not_limited(
    tmp_path: Path,
) -> None:
    """Mounted under a prefix (uvicorn --root-path, a proxy that strips it), paths are compared without it."""
    server = Server(tmp_path, "uvicorn", RATE_LIMIT="100")
    server.command += ["--root-path", "/users-api"]
    async with server, server.client(None) as anonymous, server.client() as keyed:
        refused = await anonymous.get(USERS)
        served = await keyed.get(USERS)
        probe = await anonymous.get("/health")

    assert_problem(refused, 401)
    assert 200 == served.status_code, served.text
    assert "ratelimit" in served.headers
    assert 200 == probe.status_code, probe.text
    assert "ratelimit" not in probe.headers


# --- Protection: input limits --------------------------------------------------------------


async def raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, dict[str, str], bytes, int]:
    """Send head, then chunks until the server answers; return the answer and how many chunks went."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        answer = asyncio.ensure_future(read_response(reader))
        sent = 0
        for chunk in chunks:
            await asyncio.wait([answer], timeout=0.05)
            if answer.done():
                break
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:  # the server answered and closed
                break
            sent += 1
        status, headers, body = await asyncio.wait_for(answer, 5)
        return status, headers, body, sent
    finally:
        writer.transport.abort()


async def test_body_over_the_limit_by_content_length_is_413_before_the_body_is_sent(sqlite_service: Server) -> None:
    """A Content-Length of 10 MB is answered 413 problem+json at once, with no body byte sent."""
    head = (
        f"POST {USERS} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    status, headers, body, _ = await raw_exchange(sqlite_service.port, head, [])
    assert 413 == status
    assert "application/problem+json" == headers["content-type"]
    assert headers["x-request-id"]
    assert 413 == json.loads(body)["status"]


async def test_chunked_body_over_the_limit_is_413_before_its_end(sqlite_service: Server) -> None:
    """A chunked body is answered 413 problem+json once past 64 KiB, long before its 1 MiB end."""
    head = (
        f"POST {USERS} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB of JSON white space
    status, headers, _, sent = await raw_exchange(sqlite_service.port, head, [chunk] * 64)
    assert 413 == status
    assert "application/problem+json" == headers["content-type"]
    assert headers["x-request-id"]
    assert sent < 16  # the server answered after 64 KiB, not after the whole 1 MiB


@pytest.mark.parametrize(
    ("method", "path", "allow"), [("PUT", USERS, "GET, POST"), ("PUT", f"{USERS}/1", "DELETE, GET, PATCH")]
)
async def test_405_allow_names_every_method_of_the_path(
    sqlite_service: Server, method: str, path: str, allow: str
) -> None:
    """A 405's Allow lists every method served at the path, not only those of the first route found."""
    async with sqlite_service.client() as client:
        response = await client.request(method, path)
    assert 405 == response.status_code
    assert allow == response.headers["allow"]


@pytest.mark.parametrize(
    "name",
    ["A", " A ", "\u000b", "\u3000", " " * 5 + "a" * 100, " " + "a" * 101, "a" * 100, "a" * 101, "a\nb", "\x1cAda\x85"],
)
async def test_openapi_name_schema_says_what_the_service_accepts(sqlite_service: Server, name: str) -> None:
    """The name's pattern in /openapi.json accepts exactly the names the service stores (trimmed, 1 to 100)."""
    async with sqlite_service.client() as client:
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["UserCreate"]
        response = await client.post(USERS, json={"email": f"{uuid.uuid4().hex}@example.com", "name": name})
    assert bool(re.search(schema["properties"]["name"]["pattern"], name)) == (201 == response.status_code)


@pytest.mark.parametrize("domain", ["example.test", "printer.local", "nowhere.invalid", "Example.COM"])
async def test_email_with_any_syntactically_valid_domain_is_accepted(sqlite_service: Server, domain: str) -> None:
    """Reserved names (.test, .local, .invalid) are syntactically valid, as the schema's format says."""
    async with sqlite_service.client() as client:
        response = await client.post(USERS, json={"email": f"{uuid.uuid4().hex}@{domain}", "name": "Ada"})
    assert 201 == response.status_code, response.text
    assert response.json()["email"].endswith(f"@{domain.lower()}")


@pytest.mark.parametrize("path", ["/health/", f"{USERS}/", f"{USERS}/1/"])
async def test_a_path_with_a_trailing_slash_is_404_never_a_redirect_to_the_clients_host(
    sqlite_service: Server, path: str
) -> None:
    """No 307 to http://<Host>/...: the Host header is never echoed into a Location."""
    async with sqlite_service.client() as client:
        response = await client.get(path, headers={"Host": "evil.example"})

    assert_problem(response, 404)
    assert "location" not in response.headers


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("x-big", "a" * (problems.MAX_HEADER_BYTES + 1))], 431),
        ([("x-big", "a" * 1024 * 1024)], 431),
        ([(f"x-h{n}", "1") for n in range(problems.MAX_HEADER_FIELDS + 1)], 431),
        ([("x-big", "a" * (problems.MAX_HEADER_BYTES - 1024))], 200),
        ([(f"x-h{n}", "1") for n in range(problems.MAX_HEADER_FIELDS - 10)], 200),
    ],
)
async def test_request_headers_over_the_documented_size_or_count_are_431_problem(
    sqlite_service: Server, headers: list[tuple[str, str]], status: int
) -> None:
    """Over MAX_HEADER_BYTES in all, or MAX_HEADER_FIELDS fields, before any route runs; within them, served."""
    async with sqlite_service.client() as client:
        response = await client.get(f"{USERS}?limit=1", headers=headers)

    assert status == response.status_code, response.text
    if status == 431:
        assert_problem(response, 431)


# --- Protection: error answers tell nothing of the inside ----------------------------------

INJECTIONS = [
    "' OR '1'='1",
    "'; DROP TABLE users; --",
    '" OR ""="',
    "1; SELECT SLEEP(5)",
    "admin'--",
    "' UNION SELECT email, email_key, name FROM users --",
    "\\'; SHUTDOWN; --",
    "%' AND 1=CONVERT(int, @@version) --",
    "`users`",
    "Robert'); DELETE FROM users WHERE ('1'='1",
]


@asynccontextmanager
async def live(folder: Path, environment: str, database: str) -> AsyncIterator[tuple[Server, str]]:
    """A server in this environment (gunicorn in production) on a fresh database; yield it and the database's URL."""
    async with AsyncExitStack() as stack:
        url = f"sqlite+aiosqlite:///{folder / 'users.db'}"
        if database == "mysql":
            url = render(await stack.enter_async_context(fresh_database(f"injection_{environment}")))
        program = "gunicorn" if environment == "production" else "uvicorn"
        yield await stack.enter_async_context(Server(folder, program, workers=1, DATABASE_URL=url)), url


def assert_tells_nothing(response: httpx.Response, attack: str) -> None:
    """Check that the answer is no 500, and that an error tells nothing but what the client sent."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "application/problem+json" == response.headers["content-type"]
        # A detail may quote the client's own input ("The email ... is already taken").
        told = response.text.replace(json.dumps(attack)[1:-1], "")
        assert not LEAKS.search(told), response.text


@pytest.mark.parametrize("database", ["sqlite", "mysql"])
@pytest.mark.parametrize("environment", ["development", "production"])
async def test_sql_shaped_input_is_stored_literally_or_rejected_with_4xx(
    tmp_path: Path, environment: str, database: str
) -> None:
    """Injection-shaped strings in every field, parameter and header: stored as given, or a 4xx."""
    async with (
        live(tmp_path, environment, database) as (server, _),
        server.client(KEYS[1]) as client,
    ):
        for n, attack in enumerate(INJECTIONS):
            created = await client.post(USERS, json={"email": f"user{n}@example.com", "name": attack})
            assert_tells_nothing(created, attack)
            assert 201 == created.status_code
            user = created.json()
            assert attack == user["name"] == (await client.get(f"{USERS}/{user['id']}")).json()["name"]
            # Quotes are legal in the local part of an address; the rest is rejected as 422.
            local = re.sub(r"[^A-Za-z0-9'=%-]", "", attack)[:30] or "x"
            for email in (f"{local}{n}@example.com", f"{attack}@example.com", attack):
                response = await client.post(USERS, json={"email": email, "name": "Ada"})
                assert_tells_nothing(response, attack)
                assert response.status_code in (201, 409, 422)
                if response.status_code == 201:
                    assert email.rpartition("@")[0] == response.json()["email"].rpartition("@")[0]
            patched = await client.patch(f"{USERS}/{user['id']}", json={"name": attack[::-1]})
            assert attack[::-1] == patched.json()["name"]
            for response in (
                await client.post(USERS, json={"email": f"b{n}@example.com", "name": "Ada", "is_active": attack}),
                await client.get(f"{USERS}/{attack}"),
                await client.get(USERS, params={"limit": attack}),
                await client.get(USERS, params={"cursor": attack}),
                await client.patch(f"{USERS}/{user['id']}", json={"name": "x"}, headers={"If-Match": attack}),
                await client.delete(f"{USERS}/{user['id']}", headers={"If-Match": attack}),
                await client.get(USERS, headers={"X-Request-ID": attack}),
                await client.post(USERS, content=attack.encode(), headers={"Content-Type": "application/json"}),
            ):
                assert_tells_nothing(response, attack)
        # The table is still there, with every user in it.
        page = (await client.get(USERS, params={"limit": 100})).json()
        assert len(INJECTIONS) <= len(page["items"])


@pytest.mark.parametrize("environment", ["development", "production"])
async def test_database_errors_are_answered_without_sql_or_driver_messages(tmp_path: Path, environment: str) -> None:
    """With the table gone underneath the service, the answer names neither the SQL nor the driver's error."""
    async with (
        live(tmp_path, environment, "sqlite") as (server, url),
        server.client() as client,
    ):
        assert 200 == (await client.get(USERS)).status_code
        with sqlite3.connect(make_url(url).database or "") as db:
            db.execute("DROP TABLE users")
        responses = [
            await client.get(USERS),
            await client.get(f"{USERS}/1"),
            await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"}),
            await client.delete(f"{USERS}/1"),
        ]
        log = server.log()
    for response in responses:
        assert response.status_code >= 500
        assert "application/problem+json" == response.headers["content-type"]
        assert not LEAKS.search(response.text), response.text
    assert "no such table" in log  # the log keeps what the answer leaves out


# --- Schemathesis: an independent client of the OpenAPI schema -----------------------------

SCHEMATHESIS_EXAMPLES = 500
SCHEMATHESIS_SEED = 20261127
# A schema-valid If-Match that names another version is answered 412: that is the contract
# (API.md, "Concurrency"), so 412 counts as accepting the data, next to the default statuses.
# A name longer than its schema's maxLength, the body limit, cannot fit in a body: 413 refuses
# it, next to the default statuses that count as rejecting invalid data.
# Schemathesis knows nothing of a key's history, nor of the users it made: it would send one
# Idempotency-Key with two bodies, which the contract answers 422, and the schema's example address
# with every coverage case, each a 409 after the first. This hook, called before every request of
# every phase, gives each request meant to be accepted a key and, for that example, an address of
# its own; requests meant to be refused are left as generated (a new key would make one that lacks
# a required header valid, and schemathesis would then send the header).
SCHEMATHESIS_HOOKS = """
import uuid

import schemathesis


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())
    if isinstance(case.body, dict) and case.body.get("email") == "ada@example.com":
        case.body["email"] = f"ada-{uuid.uuid4().hex[:12]}@example.com"
"""
SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


@pytest.mark.parametrize("database", ["sqlite", "mysql"])
async def test_schemathesis_finds_no_failure(tmp_path: Path, database: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Schemathesis, with all its checks and phases, finds nothing the schema does not allow.

    Nor does it warn that the schema admits what the service refuses ("mostly rejected generated data").
    """
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    (tmp_path / "key_per_request.py").write_text(SCHEMATHESIS_HOOKS)
    async with live(tmp_path, "development", database) as (server, _):
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
            f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {KEYS[0]}",
            "--checks", "all", "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", str(SCHEMATHESIS_SEED),
            "--no-color",
        ]  # fmt: skip
        hooks = {**os.environ, "SCHEMATHESIS_HOOKS": "key_per_request", "PYTHONPATH": str(tmp_path)}
        process = await asyncio.create_subprocess_exec(
            *command, cwd=tmp_path, env=hooks, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = (await asyncio.wait_for(process.communicate(), 1200))[0].decode(errors="replace")
        log = server.log()
    report(capsys, f"schemathesis on {database}, {SCHEMATHESIS_EXAMPLES} examples per operation:\n{output}")
    assert 0 == process.returncode, output
    assert "mostly rejected" not in output, output
    assert "Traceback" not in log, log


# --- The schema's limits, each enforced by the service -------------------------------------
# Most of the limits /openapi.json claims have their test above (email 254, name, id, limit,
# cursor, body size); these are the ones the schema added.


async def test_422_lists_at_most_the_schemas_maxitems_errors(client: httpx.AsyncClient) -> None:
    """A body of many unknown fields gets as many errors as the Problem schema's maxItems, not one per field."""
    problem_error = main.app.openapi()["components"]["schemas"]["Problem"]["properties"]["errors"]
    body = {f"unknown_{i}": i for i in range(500)} | {"email": "ada@example.com", "name": "Ada"}

    errors = assert_problem(await client.post(USERS, json=body), 422)["errors"]

    assert problem_error["maxItems"] == problems.MAX_ERRORS == len(errors)
    assert all(len(error["loc"]) <= 3 and len(error["msg"]) <= problems.MAX_ERROR_MESSAGE for error in errors)


@pytest.mark.parametrize(("method", "body"), CONDITIONAL)
async def test_if_match_over_the_schemas_max_length_is_422_and_at_it_412(
    client: httpx.AsyncClient, method: str, body: dict[str, Any] | None
) -> None:
    """If-Match has at most MAX_IF_MATCH characters, as the schema says; within them, a tag of no version is 412."""
    user = await create(client)
    tags = ", ".join(['"999999"'] * 200)

    at_limit = tags[: crud.MAX_IF_MATCH]
    over = tags[: crud.MAX_IF_MATCH + 1]

    path = f"{USERS}/{user['id']}"
    assert_problem(await client.request(method, path, json=body, headers={"If-Match": at_limit}), 412)
    response = await client.request(method, path, json=body, headers={"If-Match": over})
    assert ["header", "if-match"] == assert_problem(response, 422)["errors"][0]["loc"]


def documented_headers(schema: dict[str, Any], path: str, method: str, status: int) -> dict[str, dict[str, Any]]:
    """The headers /openapi.json declares for one answer, each resolved to its components/headers entry."""
    declared = schema["paths"][path][method]["responses"][str(status)].get("headers", {})
    components = schema["components"]["headers"]
    return {name: components[ref["$ref"].rsplit("/", 1)[1]] for name, ref in declared.items()}


async def test_every_answer_carries_the_headers_its_schema_declares(client: httpx.AsyncClient) -> None:
    """Each header the schema declares for an answer is there, and matches the header's pattern."""
    schema = main.app.openapi()
    item = f"{USERS}/{{user_id}}"
    created = await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})
    user_id = created.json()["id"]
    answers = [
        (USERS, "post", created),
        (USERS, "post", await client.post(USERS, json={"email": "ada@example.com", "name": "Ada"})),
        (USERS, "get", await client.get(USERS)),
        (USERS, "get", await client.get(USERS, params={"limit": 0})),
        (item, "get", await client.get(f"{USERS}/{user_id}")),
        (item, "get", await client.get(f"{USERS}/{user_id + 1}")),
        (item, "patch", await client.patch(f"{USERS}/{user_id}", json={"name": "Ada L."})),
        (item, "patch", await client.patch(f"{USERS}/{user_id}", json={}, headers={"If-Match": '"9"'})),
        (item, "delete", await client.delete(f"{USERS}/{user_id}")),
        ("/health", "get", await client.get("/health")),
        ("/health", "get", await client.request("GET", "/health", content=padded_body(BODY_LIMIT + 1))),
    ]
    assert {201, 409, 200, 422, 404, 412, 204, 413} == {response.status_code for _, _, response in answers}

    for path, method, response in answers:
        declared = documented_headers(schema, path, method, response.status_code)
        assert "X-Request-ID" in declared
        for name, header in declared.items():
            assert name in response.headers, (method, path, response.status_code, name)
            if "pattern" in header["schema"]:
                assert re.search(header["schema"]["pattern"], response.headers[name]), (name, response.headers[name])
        if path.startswith("/api/"):
            assert {"RateLimit", "RateLimit-Policy"} <= declared.keys()
    assert f"{USERS}/{user_id}" == created.headers["location"]


async def test_schema_declares_retry_after_and_www_authenticate_where_they_are_sent() -> None:
    """429 and 503 declare Retry-After, 401 WWW-Authenticate; the tests above show them sent."""
    schema = main.app.openapi()
    for path, item in schema["paths"].items():
        for method in item:
            for status, names in {429: {"Retry-After"}, 503: {"Retry-After"}, 401: {"WWW-Authenticate"}}.items():
                if str(status) in item[method]["responses"]:
                    assert names <= documented_headers(schema, path, method, status).keys(), (path, method)


# --- A client generated from the schema ----------------------------------------------------
# What most users of the API do: generate a client from /openapi.json with openapi-python-client,
# then trust it. The generator must understand all of the schema (no warnings), and the client
# must read every answer, errors included, as the model the schema declares for its status.

GENERATED_CLIENT = "users_api_client"


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    """Generate a client package from the app's schema; import it; return it with the generator's output."""
    folder = tmp_path_factory.mktemp("generated")
    (folder / "openapi.json").write_text(json.dumps(main.app.openapi()))
    # No post hooks: the generator would otherwise look for ruff on PATH to format its output.
    (folder / "config.yaml").write_text("post_hooks: []\n")
    command = [
        sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
        "--output-path", GENERATED_CLIENT, "--meta", "none", "--config", "config.yaml",
    ]  # fmt: skip
    process = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300)
    output = process.stdout + process.stderr
    assert 0 == process.returncode, output
    sys.path.insert(0, str(folder))
    try:
        package = __import__(GENERATED_CLIENT, fromlist=["api", "models"])
        for module in ("api.users", "api.health", "models"):
            __import__(f"{GENERATED_CLIENT}.{module}")
    finally:
        sys.path.remove(str(folder))
    return package, output


def test_openapi_client_generator_prints_no_warning(generated_client: tuple[Any, str]) -> None:
    """openapi-python-client understands every part of the schema: it says nothing but what it generated."""
    _, output = generated_client

    assert f"Generating {GENERATED_CLIENT}" == output.strip(), output
    assert "warning" not in output.lower()


async def test_generated_client_reads_every_answer_as_the_schema_declares(
    generated_client: tuple[Any, str], client: httpx.AsyncClient
) -> None:
    """Create, get, list by cursor, PATCH with a stale and a fresh If-Match, delete, and the 404, 409, 412
    and 422 on the way: each answer parses into the model its status declares."""
    package, _ = generated_client
    users = sys.modules[f"{GENERATED_CLIENT}.api.users"]
    models = sys.modules[f"{GENERATED_CLIENT}.models"]
    for name in ("create_user", "get_user", "list_users", "update_user", "delete_user"):
        __import__(f"{GENERATED_CLIENT}.api.users.{name}")
    api = package.Client(base_url=str(client.base_url), raise_on_unexpected_status=True)
    api.set_async_httpx_client(client)  # in-process, with the API key, on this test's database

    def parsed(response: Any, status: int, model: Any) -> Any:
        assert status == response.status_code, response.content
        assert isinstance(response.parsed, model), response.parsed
        if model is models.Problem:
            assert status == response.parsed.status
            assert "about:blank" == response.parsed.type_
        return response.parsed

    created = [
        parsed(
            await users.create_user.asyncio_detailed(
                client=api, body=models.UserCreate(email=f"user{i}@example.com", name=f"User {i}")
            ),
            201,
            models.UserOut,
        )
        for i in range(3)
    ]
    duplicate = models.UserCreate(email="USER0@example.com", name="Again")
    parsed(await users.create_user.asyncio_detailed(client=api, body=duplicate), 409, models.Problem)

    got = await users.get_user.asyncio_detailed(created[0].id, client=api)
    assert created[0].to_dict() == parsed(got, 200, models.UserOut).to_dict()
    etag = got.headers["etag"]
    missing = parsed(await users.get_user.asyncio_detailed(created[-1].id + 1, client=api), 404, models.Problem)
    assert str(created[-1].id + 1) in missing.detail

    first = parsed(await users.list_users.asyncio_detailed(client=api, limit=2), 200, models.Page)
    assert isinstance(first.next_cursor, str)
    rest = parsed(
        await users.list_users.asyncio_detailed(client=api, limit=2, cursor=first.next_cursor), 200, models.Page
    )
    assert [user.id for user in created] == [user.id for user in first.items + rest.items]
    assert None is rest.next_cursor
    invalid = parsed(await users.list_users.asyncio_detailed(client=api, limit=0), 422, models.Problem)
    assert ["query", "limit"] == invalid.errors[0].loc

    renamed = models.UserUpdate(name="Renamed")
    fresh = await users.update_user.asyncio_detailed(created[0].id, client=api, body=renamed, if_match=etag)
    assert "Renamed" == parsed(fresh, 200, models.UserOut).name
    stale = await users.update_user.asyncio_detailed(created[0].id, client=api, body=renamed, if_match=etag)
    parsed(stale, 412, models.Problem)

    deleted = await users.delete_user.asyncio_detailed(created[0].id, client=api, if_match=fresh.headers["etag"])
    assert 204 == deleted.status_code and deleted.parsed is None
    parsed(await users.delete_user.asyncio_detailed(created[0].id, client=api), 404, models.Problem)

    health = sys.modules[f"{GENERATED_CLIENT}.api.health"]
    __import__(f"{GENERATED_CLIENT}.api.health.health")
    assert "ok" == parsed(await health.health.asyncio_detailed(client=api), 200, models.Health).status
