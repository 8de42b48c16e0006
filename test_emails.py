"""The email address rule of emails.py, function by function: no HTTP, no database.

- Identity: the spellings of one address (NFC, NFD, U-labels, A-labels, case) and their key.
- Length: 254 characters as stored and as keyed, and the bound on what is sent.
- Syntax: every accept/reject case of test_main.py's Email section, through canonical().
- Properties: hypothesis, over Unicode addresses and over what the pattern generates.
- JSON Schema: the request and response types, and the pattern in Python's re and in ECMA-262.
"""

import json
import re
import shutil
import string
import subprocess
import unicodedata
from typing import Any

import idna
import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

import emails
from emails import Email, StoredEmail, canonical, key


def domain_of_length(length: int) -> str:
    """A valid domain name of exactly length characters (labels are at most 63)."""
    labels = []
    while length > 63 + 1 + 4:
        labels.append("d" * 63)
        length -= 64
    return ".".join([*labels, "d" * (length - 4) + ".com"])


def a_label_spelling(address: str) -> str:
    """The address with every Unicode label of its host name written as an IDNA A-label."""
    local, _, domain = address.rpartition("@")
    return local + "@" + ".".join(idna.alabel(label).decode("ascii") for label in domain.split("."))


# JSON Schema's idn-email as jsonschema_rs checks it, as schemathesis and validating clients do.
IDN_EMAIL = jsonschema_rs.validator_for({"type": "string", "format": "idn-email"}, validate_formats=True)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    email: Email


class Answer(BaseModel):
    email: StoredEmail


# --- Identity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "José@exämple.com",  # NFC
        "Jose\u0301@exa\u0308mple.com",  # NFD
        "José@xn--exmple-cua.com",  # the domain as an A-label
        "Jose\u0301@XN--EXMPLE-CUA.COM",
        "José@EXÄMPLE.com",
    ],
)
def test_spellings_of_one_address_have_one_stored_form_and_one_key(spelling: str) -> None:
    """NFC and NFD, U-label and A-label, and the domain's case: one stored form, with a Unicode domain."""
    assert "José@exämple.com" == canonical(spelling)
    assert "josé@exämple.com" == key(canonical(spelling))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("Ada@Example.COM", "ada@example.com"),
        ("ADA@EXAMPLE.COM", "ada@example.com"),
        ("JOSÉ@EXÄMPLE.COM", "josé@exämple.com"),
        ("Ǆemal@example.com", "ǆemal@example.com"),
        ("İ@example.com", "i\u0307@example.com"),
    ],
)
def test_case_variants_have_one_key(one: str, other: str) -> None:
    """Case variants of an address are one address: one key, though each keeps its local part's case."""
    assert key(canonical(other)) == key(canonical(one))


@pytest.mark.parametrize(
    ("one", "other"),
    [("café@example.com", "cafe@example.com"), ("straße@example.com", "strasse@example.com")],
)
def test_accents_and_letters_are_not_folded(one: str, other: str) -> None:
    """café and cafe, straße and strasse are two addresses: lower() folds case only, not as casefold() would."""
    assert key(canonical(one)) != key(canonical(other))


@pytest.mark.parametrize(
    ("host", "accepted"),
    [("\u05e9\u05dc\u05d5\u05dd.com", True), ("\u05e9\u05dc\u05d5\u05dd.0.com", False), ("0.example.com", True)],
)
def test_right_to_left_host_name_keeps_the_bidi_rule_in_every_label(host: str, accepted: bool) -> None:
    """With a Hebrew label in it, a host name may not have a label "0" (RFC 5893), as idn-email validators check."""
    address = "ada@" + host

    assert accepted == IDN_EMAIL.is_valid(address)
    try:
        canonical(address)
    except ValueError:
        assert not accepted
    else:
        assert accepted


def test_stored_form_keeps_the_local_part_as_given_and_lower_cases_the_domain() -> None:
    """Only the domain of an address is lower-cased."""
    assert "Ada.Lovelace@example.com" == canonical("Ada.Lovelace@Example.COM")


@pytest.mark.parametrize(("upper", "lower"), [("J\u030c", "\u01f0"), ("H\u0331", "\u1e96"), ("T\u0308", "\u1e97")])
def test_key_is_normalised_after_lower_casing(upper: str, lower: str) -> None:
    """J̌ has no precomposed form, but its lower case ǰ has: the key composes it, so both spellings are one address."""
    assert upper + "ane@example.com" == canonical(upper + "ane@example.com")  # NFC, as sent

    assert (
        lower + "ane@example.com"
        == key(canonical(upper + "ane@example.com"))
        == key(canonical(lower + "ane@example.com"))
    )


# --- Length ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "accepted"), [(254, True), (255, False), (1000, False)])
def test_address_over_254_characters_is_refused(length: int, accepted: bool) -> None:
    """An address may have 254 characters, not more."""
    address = "a" * 64 + "@" + domain_of_length(length - 65)
    assert length == len(address)

    try:
        canonical(address)
    except ValueError:
        assert not accepted
    else:
        assert accepted


def test_address_whose_key_would_be_over_254_characters_is_refused() -> None:
    """254 characters as sent, but 286 lower-cased (32 İ): refused with the reason, not left to the column."""
    address = "İ" * 32 + "@" + domain_of_length(254 - 32 - 1)
    assert (254, 286) == (len(address), len(address.lower()))

    with pytest.raises(ValueError, match="at most 254 characters once lower-cased") as refused:
        canonical(address)

    assert "İ" in str(refused.value)


def test_address_whose_key_is_exactly_254_characters_is_accepted() -> None:
    """An address within the limit fits even when its key has more characters (İ lower-cases to two)."""
    address = "İ" * 32 + "@" + domain_of_length(254 - 32 * 2 - 1)

    assert address == canonical(address)
    assert 254 == len(key(address))


def test_decomposed_spelling_longer_than_254_characters_is_accepted() -> None:
    """The limit is on the stored form: an NFD spelling of 287 characters that is 223 in NFC is valid."""
    address = unicodedata.normalize("NFD", "ǖ" * 32 + "@" + domain_of_length(190))
    assert 287 == len(address)

    body = Body(email=address)

    assert 223 == len(body.email)
    assert unicodedata.normalize("NFC", address) == body.email


def test_a_label_spelling_longer_than_254_characters_is_accepted() -> None:
    """A host name sent as A-labels is stored as Unicode, which is shorter."""
    stored = "a" * 64 + "@" + ".".join(["ä" * 45] * 4) + ".com"
    address = a_label_spelling(stored)
    assert (276, 252) == (len(address), len(stored))

    assert stored == canonical(address)


def test_longest_spellings_fit_the_bound_on_what_is_sent() -> None:
    """Decomposed to the most code points found, a valid address stays well within MAX_SPELLING.

    ᾂ decomposes to four code points (the most of any character), ắ to three (the most IDNA allows).
    """
    host = ".".join(["ắ" * 57] * 3 + ["ắ" * 55])
    assert 253 == len(idna.encode(host))
    stored = "ᾂ" * 21 + "@" + host  # 63 bytes of local part
    spelling = unicodedata.normalize("NFD", stored)

    assert stored == canonical(spelling)
    assert 766 == len(spelling) < emails.MAX_SPELLING


def test_spelling_over_the_bound_is_refused_before_any_work() -> None:
    """More characters than any spelling of a valid address has: refused, by pydantic and by canonical()."""
    address = "a" * emails.MAX_SPELLING + "@example.com"

    with pytest.raises(ValueError, match=f"at most {emails.MAX_SPELLING} characters as sent"):
        canonical(address)
    with pytest.raises(ValidationError) as refused:
        Body(email=address)
    assert "string_too_long" == refused.value.errors()[0]["type"]


def test_decomposition_bounds_behind_the_limits_hold() -> None:
    """NFD spells a character in at most four code points, and at most 1.5 per UTF-8 byte of its NFC form.

    MAX_SPELLING rests on the first, the pattern's 96-code-point local part on the second.
    """
    decomposed = [
        (len(unicodedata.normalize("NFD", chr(cp))), len(chr(cp).encode("utf-8", "surrogatepass")))
        for cp in range(0x110000)
    ]

    assert 4 == max(points for points, _ in decomposed)
    assert 1.5 == max(points / size for points, size in decomposed)


# --- Syntax: the cases of test_main.py's Email section -----------------------------------------


@pytest.mark.parametrize(
    "address",
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
def test_address_with_invalid_syntax_is_refused(address: str) -> None:
    """An address that is not syntactically valid is refused, with the reason."""
    with pytest.raises(ValueError):
        canonical(address)


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com",
        "Ada.Lovelace@Example.COM",
        "café@example.com",
        "cafe@example.com",
        "ADA@example.com",
        "ada@EXAMPLE.com",
        "ada@lovelace.org",
        "x@example.test",
        "x@printer.local",
        "x@nowhere.invalid",
        "x@Example.COM",
        "O'Brien+tag@example.com",
        "user%41@example.com",
    ],
)
def test_address_with_valid_syntax_is_accepted(address: str) -> None:
    """Valid addresses of test_main.py, reserved names (.test, .local, .invalid) among them, are accepted."""
    local, _, domain = address.rpartition("@")

    assert f"{local}@{domain.lower()}" == canonical(address)


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("ada", "a local part, an @ and a host name"),
        ("ada.@example.com", "runs joined by single dots"),
        ('"ada"@example.com', "double quotes"),
        ("ada\u200b@example.com", "control characters"),
        ("a" * 65 + "@example.com", "at most 64 bytes in UTF-8"),
        ("ada@localhost", "two or more labels"),
        ("ada@example..com", "two or more labels"),
        ("ada@[192.0.2.1]", "invalid label '[192"),
        ("ada@exa_mple.com", "invalid label 'exa_mple'"),
        ("ada@ab--cd.com", "invalid label 'ab--cd'"),
        ("ada@xn--zz.com", "invalid label 'xn--zz'"),
        ("ada@example.123", "must end in a letter"),
        ("ada@\u05e9\u05dc\u05d5\u05dd.0.com", "'0' does not"),
        ("ada@" + "d" * 64 + ".com", "invalid label"),
        ("a@" + domain_of_length(254), "at most 253 characters in its ASCII (IDNA) form"),
    ],
)
def test_refusal_names_the_rule_broken(address: str, rule: str) -> None:
    """The message (a 422's msg) says which rule the address breaks, in words, never a function of ours."""
    with pytest.raises(ValueError, match=re.escape(rule)) as refused:
        canonical(address)

    assert not re.search(r"\w\(\)|canonical|label_forms|normalize", str(refused.value))


def test_pydantic_reports_the_rule_at_the_field() -> None:
    """Through the request type, the refusal is a value_error at the field, with the rule's words."""
    with pytest.raises(ValidationError) as refused:
        Body(email="ada@localhost")

    [error] = refused.value.errors()
    assert ("value_error", ("email",)) == (error["type"], error["loc"])
    assert "two or more labels" in error["msg"]


# --- Properties --------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
# Host name labels are written in one script: mixing scripts, or directions, makes most of them invalid.
SCRIPTS = [
    "abcdefghijklmnopqrstuvwxyz0123456789-éäöüßçñåøı",  # with two that upper-case does not bring back
    "αβγδεζηθικλμνξοπρστυφχψωάέήίόύώΐς",
    "абвгдежзийклмнопрстуфхцчшщъыьэюяё",
    "中文字例子漢ひらがなカタカナ",
    "한국어도메인",
    "שלוםעברית",
    "مرحباعربية",
    "भारतडाटाहिन्दी",
]
# Any character at all, surrogates, controls and unassigned code points included.
ANY = st.characters(exclude_categories=[])


def labels() -> st.SearchStrategy[str]:
    """Host name labels, valid or not: ASCII, Unicode in one script, or any characters at all."""
    ascii_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
    unicode_label = st.sampled_from(SCRIPTS).flatmap(lambda script: st.text(st.sampled_from(script), min_size=1))
    return st.one_of(ascii_label, unicode_label, unicode_label, st.text(ANY, min_size=1, max_size=4))


@st.composite
def spelt(draw: st.DrawFn, label: str) -> str:
    """The label as a client might spell it: as is, decomposed, upper-cased, or as an A-label."""
    how = draw(st.sampled_from(["as is", "NFD", "upper", "A-label"]))
    if how == "NFD":
        return unicodedata.normalize("NFD", label)
    if how == "upper":
        return label.upper()
    if how == "A-label":
        try:
            return idna.alabel(unicodedata.normalize("NFC", label.lower())).decode("ascii")
        except idna.IDNAError:
            return label
    return label


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Addresses with Unicode local parts and host names of U- and A-labels, about half of them valid."""
    letters = st.text(st.sampled_from(ATEXT + "".join(SCRIPTS) + "ÉÄÖÜİΣΆЖ"), min_size=1, max_size=10)
    atom = st.one_of(letters, letters, st.text(ANY, min_size=1, max_size=4))
    local = ".".join(draw(st.lists(atom, min_size=1, max_size=3)))
    domain = [draw(spelt(label)) for label in draw(st.lists(labels(), min_size=1, max_size=4))]
    # Long ASCII labels in front bring some addresses to the limits of 253 and 254 characters.
    domain[:0] = ["d" * 63] * draw(st.sampled_from([0, 0, 2, 3]))
    top = draw(st.one_of(st.sampled_from(["com", "COM", "test", "рф", "XN--P1AI", "中国", "ελ"]), labels()))
    address = local + "@" + ".".join([*domain, draw(spelt(top))])
    return unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD", "NFKC"])), address)


def swap_ascii_case(address: str) -> str:
    """The address with the case of its ASCII letters swapped."""
    return "".join(c.swapcase() if c.isascii() else c for c in address)


def holds_for(address: str, pattern: re.Pattern[str]) -> bool:
    """Check canonical()'s guarantees for one address; tell whether it was accepted."""
    try:
        stored = canonical(address)
    except ValueError:
        return False
    assert unicodedata.is_normalized("NFC", stored)
    assert len(stored) <= 254
    assert len(key(stored)) <= 254
    assert stored == canonical(stored)
    for spelling in (
        unicodedata.normalize("NFD", address),
        unicodedata.normalize("NFD", stored),
        a_label_spelling(stored),
    ):
        assert stored == canonical(spelling)
    assert key(stored) == key(canonical(swap_ascii_case(address)))
    assert pattern.fullmatch(address)
    assert pattern.fullmatch(stored)
    assert IDN_EMAIL.is_valid(stored)
    return True


def test_canonical_holds_its_guarantees_for_unicode_addresses() -> None:
    """Over Unicode local parts and U-/A-label host names: ValueError, or a stored form that keeps every promise.

    NFC, at most 254 characters and 254 keyed, idempotent, the same for its NFD and A-label spellings
    and for its ASCII case variants, matched by the pattern as sent and as stored, and an idn-email.
    """
    pattern = re.compile(emails.pattern())
    accepted: list[str] = []

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(addresses())
    def check(address: str) -> None:
        if holds_for(address, pattern):
            accepted.append(address)

    check()

    # The strategy reaches valid addresses, Unicode and A-labels among them, or the test proves nothing.
    assert len(accepted) >= 50
    assert any(not address.isascii() for address in accepted)
    assert any("xn--" in address.lower() for address in accepted)


def test_canonical_holds_its_guarantees_for_what_the_pattern_generates() -> None:
    """Whatever hypothesis draws from the schema's pattern: a ValueError, or a stored form that keeps every promise."""
    pattern = re.compile(emails.pattern())
    accepted: list[str] = []

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.from_regex(pattern, fullmatch=True))
    def check(address: str) -> None:
        if holds_for(address, pattern):
            accepted.append(address)

    check()

    assert len(accepted) >= 10


# --- JSON Schema -------------------------------------------------------------------------------

# Addresses canonical() accepts, in their spellings: the pattern must match every one.
VALID = [
    "ada@example.com",
    "Ada.Lovelace@Example.COM",
    "O'Brien+tag@example.com",
    "x@example.test",
    "José@exämple.com",
    "Jose\u0301@exa\u0308mple.com",
    "José@xn--exmple-cua.com",
    "José@XN--EXMPLE-CUA.COM",
    "用户@例子.广告",
    "अजय@डाटा.भारत",
    "Δοκιμή@παράδειγμα.δοκιμή",
    "квіточка@пошта.укр",
    "\U0001d49cda@example.com",  # a mathematical script A, outside the BMP
    "a@ab-cd.xn--p1ai",
    "a@l\u00b7l.cat",
    "İ" * 32 + "@" + domain_of_length(189),
    "a" * 64 + "@" + domain_of_length(189),
    unicodedata.normalize("NFD", "ǖ" * 32 + "@" + domain_of_length(190)),
    a_label_spelling("a" * 64 + "@" + ".".join(["ä" * 45] * 4) + ".com"),
]
# Addresses whose flaw is in what the pattern can say: it must refuse every one.
INVALID = [
    "",
    "ada",
    "ada@",
    "@example.com",
    "ada@@example.com",
    "ada example@example.com",
    " ada@example.com",
    "Ada <ada@example.com>",
    '"ada"@example.com',
    "ada@localhost",
    "ada.@example.com",
    ".ada@example.com",
    "a..da@example.com",
    "ada@exa_mple.com",
    "ada@-example.com",
    "ada@example-.com",
    "ada@ab--cd.com",
    "ada@example.123",
    "ada@example.com.",
    "ada@[192.0.2.1]",
    "ada\u200b@example.com",
    "a" * 65 + "@example.com",
    "é" * 97 + "@example.com",
    "a@" + "d" * 64 + ".com",
    "a@" + domain_of_length(254),
    "a" * 64 + "@" + domain_of_length(190),
]


def request_schema() -> dict[str, Any]:
    """The JSON Schema pydantic gives an Email field of a request body."""
    schema: dict[str, Any] = Body.model_json_schema()["properties"]["email"]
    return schema


def test_request_schema_says_idn_email_with_its_bounds_and_rule() -> None:
    """idn-email, not email (ASCII only), the bound on what is sent, the pattern, an example and the rule in words."""
    schema = request_schema()

    assert "idn-email" == schema["format"]
    assert emails.MAX_SPELLING == schema["maxLength"]
    assert emails.pattern() == schema["pattern"]
    assert ["ada@example.com"] == schema["examples"]
    for words in ("IDNA2008", "64 bytes", "at most 254 characters", "lower-cased form", "NFD and A-label spellings"):
        assert words in schema["description"]


def test_pattern_is_not_enforced_by_pydantic() -> None:
    """canonical() alone decides: pydantic does not compile the pattern (its Rust engine has no lookaheads)."""
    assert "pattern" not in str(Body.__pydantic_core_schema__)


@pytest.mark.parametrize("address", VALID)
def test_pattern_matches_every_accepted_address_as_sent_and_as_stored(address: str) -> None:
    """The pattern refuses nothing the service accepts, in any spelling."""
    pattern = re.compile(request_schema()["pattern"])

    assert pattern.fullmatch(address)
    assert pattern.fullmatch(canonical(address))


@pytest.mark.parametrize("address", INVALID)
def test_pattern_refuses_what_a_regex_can_tell_is_invalid(address: str) -> None:
    """Quoted local parts, address literals, one-label domains, and the ASCII rules of length and labels."""
    with pytest.raises(ValueError):
        canonical(address)

    assert not re.fullmatch(request_schema()["pattern"], address)


def test_pattern_reads_the_same_in_ecma_262() -> None:
    """Node compiles the pattern with the "u" flag, as JSON Schema validators do, and agrees with Python's re."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH: the ECMA-262 reading of the pattern was not checked")
    script = "const [p, xs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
    script += "const r = new RegExp(p, 'u'); console.log(JSON.stringify(xs.map((x) => r.test(x))));"
    samples = [*VALID, *INVALID]

    answer = subprocess.run(
        [node, "-e", script], input=json.dumps([emails.pattern(), samples]), capture_output=True, text=True, check=True
    )

    assert [bool(re.fullmatch(emails.pattern(), sample)) for sample in samples] == json.loads(answer.stdout)


def test_pattern_reads_the_same_in_the_schema_validator_schemathesis_uses() -> None:
    """jsonschema_rs, which checks schemathesis's data and answers, reads the pattern as Python's re does."""
    validator = jsonschema_rs.validator_for(request_schema())

    assert [True] * len(VALID) == [validator.is_valid(address) for address in VALID]
    assert [False] * len(INVALID) == [validator.is_valid(address) for address in INVALID]


def test_pattern_classes_refuse_exactly_what_a_local_part_can_never_hold() -> None:
    """All ASCII but atext; beyond, what isprintable() refuses in the BMP but unassigned and surrogate code points."""
    ascii_allowed = "".join(c for c in map(chr, range(0x80)) if re.fullmatch(f"[^{emails.NOT_ATEXT}]", c))
    assert sorted(ATEXT) == sorted(ascii_allowed)

    characters = [chr(cp) for cp in range(0x80, 0x110000)]
    refused = [
        c
        for c in characters
        if unicodedata.category(c) in ("Cc", "Cf", "Co", "Zs", "Zl", "Zp") and ord(c) < emails.BMP_END
    ]
    in_class = re.compile(f"[{emails.unprintable_class()}]")
    assert refused == [c for c in characters if in_class.fullmatch(c)]


def test_pattern_lets_the_joiners_into_a_host_name_only() -> None:
    """ZWNJ and ZWJ are refused in a local part, but IDNA2008 allows them in a host name label, in context."""
    assert re.fullmatch(f"[{emails.unprintable_class()}]+", emails.JOINERS)
    assert not re.search(f"[{emails.unprintable_class(but=emails.JOINERS)}]", emails.JOINERS)
    address = "a@\u0915\u094d\u200d\u0937.com"  # a joiner after a virama, where IDNA2008 allows it

    assert address == canonical(address)
    assert re.fullmatch(emails.pattern(), address)


def test_stored_addresses_satisfy_the_response_schema() -> None:
    """Every stored form is an idn-email within the response's maxLength, as a validating client checks it."""
    schema = Answer.model_json_schema()["properties"]["email"]
    assert {"format": "idn-email", "maxLength": 254} == {k: schema[k] for k in ("format", "maxLength")}
    assert "pattern" not in schema
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)

    assert [] == [address for address in map(canonical, VALID) if not validator.is_valid(address)]


def test_response_type_checks_nothing() -> None:
    """A response's address was checked on the way in: StoredEmail's bounds are for the schema only."""
    assert "x" * 300 == Answer(email="x" * 300).email
