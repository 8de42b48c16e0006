"""Email addresses: which strings are one, the one spelling stored for each, and the key that makes it unique.

`canonical()` checks an address and returns its stored (and returned) spelling: Unicode NFC, the
local part's case as given, the domain lower-cased and in Unicode (IDNA U-labels, an A-label
decoded), so that `José@exämple.com`, its NFD spelling and `José@xn--exmple-cua.com` are one
string. `key()` is what the unique column holds: that spelling lower-cased, so that case variants
are one address and accents are not folded. `Email` and `StoredEmail` are the pydantic types of
request and response bodies, with the JSON Schema that says all of this to clients.
"""

import functools
import re
import unicodedata
from typing import Annotated, Any

import idna
from pydantic import AfterValidator, Field, StringConstraints

# In characters, for the stored address and for its key alike: both columns are VARCHAR(254).
MAX_LENGTH = 254
MAX_LOCAL_BYTES = 64  # RFC 5321, 4.5.3.1.1
MAX_HOST = 253  # characters of the host name in its ASCII form (A-labels), as DNS carries it
# The longest a valid address can be as sent, before normalisation: NFD spells a character in at
# most four code points (U+1F82), a local part has at most 64 characters, and a host name's U-labels
# are shorter than its A-labels. Anything longer is refused before any work.
MAX_SPELLING = 4 * MAX_LOCAL_BYTES + 1 + 4 * MAX_HOST

# An address as RFC 5322 writes it, with RFC 6531's Unicode: a dot-atom local part, then a host name
# of two or more labels, the last ending in a letter. Quoted local parts and address literals
# ("a b"@x, a@[192.0.2.1]) are refused, as most mail systems do. Reserved names (.test, .invalid,
# .local) are syntactically valid, which is all API.md asks.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
LOCAL_PART = re.compile(rf"{ATOM}(?:\.{ATOM})*")
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

LOCAL_PART_RULE = (
    "the part before the @ must be letters, digits, visible Unicode characters and !#$%&'*+-/=?^_`{|}~ "
    "in runs joined by single dots: no spaces, double quotes or control characters, and no dot at either end"
)


def canonical(address: str) -> str:
    """Return the address as stored and returned; ValueError, naming the rule broken, if it is not a valid one."""
    if len(address) > MAX_SPELLING:
        raise ValueError(f"must be at most {MAX_SPELLING} characters as sent")
    local, at, domain = unicodedata.normalize("NFC", address).rpartition("@")
    if not at:
        raise ValueError("must be a local part, an @ and a host name, like ada@example.com")
    # ATOM lets any non-ASCII character in; isprintable() then refuses Unicode's categories C and Z:
    # controls, format characters, surrogates, private use, unassigned code points and separators.
    if not (LOCAL_PART.fullmatch(local) and local.isprintable()):
        raise ValueError(LOCAL_PART_RULE)
    if len(local.encode()) > MAX_LOCAL_BYTES:
        raise ValueError(f"the part before the @ must be at most {MAX_LOCAL_BYTES} bytes in UTF-8")
    stored = f"{local}@{host_name(domain)}"
    if len(stored) > MAX_LENGTH:
        raise ValueError(f"must be at most {MAX_LENGTH} characters once Unicode-normalised (NFC)")
    if len(key(stored)) > MAX_LENGTH:
        raise ValueError(
            f"must be at most {MAX_LENGTH} characters once lower-cased, as it is compared;"
            " some letters lower-case to two characters (İ, for one)"
        )
    return stored


def host_name(domain: str) -> str:
    """Return the host name lower-cased in Unicode (U-labels); ValueError, naming the rule broken, if invalid."""
    labels = unicodedata.normalize("NFC", domain.lower()).split(".")
    if len(labels) < 2 or "" in labels:
        raise ValueError("the part after the @ must be a host name of two or more labels, like example.com")
    forms = [label_forms(label) for label in labels]
    u_labels, a_labels = [u for u, _ in forms], [a for _, a in forms]
    # RFC 5893: once one label is right-to-left, every label must keep the Bidi Rule, left-to-right ones too.
    if any(unicodedata.bidirectional(c) in ("R", "AL", "AN") for c in "".join(u_labels)):
        for label in u_labels:
            try:
                idna.check_bidi(label, check_ltr=True)
            except idna.IDNABidiError as exc:
                raise ValueError(
                    f"the host name has a right-to-left label, so each of its labels must follow RFC 5893's"
                    f" Bidi Rule, and {label!r} does not: {exc}"
                ) from None
    # Punycode ends every A-label with a letter, so this refuses only ASCII ones ending in a digit.
    if not a_labels[-1][-1].isalpha():
        raise ValueError("the last label of the host name must end in a letter")
    if len(".".join(a_labels)) > MAX_HOST:
        raise ValueError(f"the host name must be at most {MAX_HOST} characters in its ASCII (IDNA) form")
    return ".".join(u_labels)


def label_forms(label: str) -> tuple[str, str]:
    """Return the host name label as a U-label and as an A-label; ValueError if IDNA2008 does not allow it."""
    if HOST_LABEL.fullmatch(label) and label[2:4] != "--":  # "--" there marks an A-label ("xn--") or is reserved
        return label, label
    try:
        u_label = idna.ulabel(label)  # an A-label decoded (only its one canonical spelling), a U-label checked
        return u_label, idna.alabel(u_label).decode("ascii")  # alabel also holds it to 63 characters
    except UnicodeError as exc:  # idna's IDNAError is one
        raise ValueError(f"the host name has an invalid label {label!r}: {exc}") from None


def key(stored: str) -> str:
    """Return what the unique column holds for a canonical() address: one value for all its case variants.

    str.lower(), not casefold(): API.md makes addresses unique case-insensitively but not
    accent-insensitively, and casefold() folds more than case (ß to ss, ﬁ to fi, final sigma to
    sigma), letters that IDNA2008 also keeps apart in the domain; PRECIS (RFC 8264) chose toLowerCase
    for the same reason. It can lengthen a string ("İ" has two code points lower-cased), which
    canonical() checks against the column. NFC again, because lower-casing can leave a string
    unnormalised (J̌ has no precomposed form, its lower case ǰ has).
    """
    return unicodedata.normalize("NFC", stored.lower())


# --- JSON Schema -----------------------------------------------------------------------------------

ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"  # RFC 5322's atext, inside a class
NOT_ATEXT = r'\x00-\x20\x7f"(),.:;<>@\[\\\]'  # the rest of ASCII, inside a class
LDH = r"A-Za-z0-9\-"  # what an ASCII host name label is made of, inside a class
# ZWNJ and ZWJ: format characters, refused in a local part, but allowed by IDNA2008 in a host name
# label in some contexts (RFC 5892, 2.7).
JOINERS = "\u200c\u200d"
# The pattern's classes name the Basic Multilingual Plane only (unprintable_class says why); what
# they would refuse beyond it, and unassigned code points, are left to the description.
BMP_END = 0x10000


@functools.cache
def unprintable_class(but: str = "") -> str:
    """Return the assigned non-ASCII characters of the BMP that isprintable() refuses, as the inside of a class.

    The BMP only, written \\uXXXX: a class reads alike in Python's re and in ECMA-262 with and
    without the "u" flag (Spectral's schema check compiles patterns without it, where a character
    beyond the BMP is two code units); the few such characters beyond it are left to the description.
    """
    ranges: list[tuple[int, int]] = []
    for cp in range(0x80, BMP_END):
        c = chr(cp)
        # Surrogates stay out, so the pattern admits them: Rust's regex (jsonschema_rs's) cannot name
        # them, and UTF-8 cannot carry them.
        if c.isprintable() or c in but or unicodedata.category(c) in ("Cn", "Cs"):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return "".join(f"{written(first)}-{written(last)}" if first < last else written(first) for first, last in ranges)


def written(cp: int) -> str:
    """Return the code point as a regex class writes it, alike in ECMA-262 and Python."""
    return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)


@functools.cache
def pattern() -> str:
    """Return the ECMA-262 pattern of an address as canonical() accepts it, as far as a regex can say.

    Every address canonical() accepts matches it, as sent and as stored. It is exact for ASCII
    addresses, but for what an A-label (xn--) decodes to and for the length of an address that has
    one (the U-label stored is shorter). Beyond ASCII it refuses the controls, format characters and
    separators a local part or a host name can never hold, and leaves the rest to the description:
    unassigned, surrogate and private-use code points, and what only IDNA2008's tables decide.
    """
    local_char = f"[^{NOT_ATEXT}{unprintable_class()}]"
    host_char = f"[^\\x00-\\x7f{unprintable_class(but=JOINERS)}]"
    ascii_label = (
        r"(?!(?![xX][nN])[A-Za-z0-9]{2}--)"  # "--" in 3rd and 4th place only after "xn"
        rf"[A-Za-z0-9](?:[{LDH}]{{0,61}}[A-Za-z0-9])?"
    )
    unicode_label = rf"(?!-)(?:[{LDH}]*{host_char})+(?:[{LDH}]*[A-Za-z0-9])?"
    label = f"(?:{ascii_label}|{unicode_label})"
    # Lookaheads that refuse, so that a generator can still draw from the rest: an ASCII address of
    # more than 254 characters with no A-label, a local part of more than 64 ASCII characters or 96
    # code points (NFD spells at most 1.5 code points per UTF-8 byte), a host name of more than 253
    # ASCII characters, a last label of ASCII ending in a digit.
    local_limits = rf"(?!(?![\s\S]*[xX][nN]--)[!-~]{{255}}|[{ATEXT}.]{{65}}|[^@]{{97}})"
    host_limits = rf"(?![{LDH}.]{{254}}|[^@]*\.[{LDH}]*[0-9]$)"
    return rf"^{local_limits}{local_char}(?:\.?{local_char})*@{host_limits}(?:{label}\.)+{label}$"


EMAIL_RULE = (
    "An email address as RFC 5322 writes it, with RFC 6531's Unicode. The local part: runs of letters,"
    " digits, !#$%&'*+-/=?^_`{|}~ and visible Unicode characters (no controls, format characters,"
    " separators, private-use or unassigned code points) joined by single dots, at most 64 bytes of UTF-8."
    " The host name: two or more labels, each valid in IDNA2008 as Unicode or as an A-label (xn--), all of"
    " them keeping RFC 5893's Bidi Rule if one is right-to-left, at most 253 characters in ASCII form, the"
    " last label ending in a letter. No quoted local parts or address literals. Unicode-normalised (NFC),"
    " the address has at most 254 characters, and so has its lower-cased form, by which addresses are"
    " compared. Stored and returned in NFC, the local part's case as sent, the host name lower-cased in"
    " Unicode (U-labels): its NFD and A-label spellings are the same address, and so are its case"
    " variants, but not its accent variants."
)


def request_schema(schema: dict[str, Any]) -> None:
    """Say in JSON Schema what canonical() accepts: `idn-email`, since `email` is ASCII only, and the pattern."""
    schema["format"] = "idn-email"
    # Not a StringConstraints pattern: pydantic's regex engine has no lookarounds, and canonical() decides.
    schema["pattern"] = pattern()


# The type of an address in a request body.
Email = Annotated[
    str,
    StringConstraints(max_length=MAX_SPELLING),
    AfterValidator(canonical),
    Field(examples=["ada@example.com"], description=EMAIL_RULE, json_schema_extra=request_schema),
]

# The type of an address in a response: what canonical() returned, never checked again.
StoredEmail = Annotated[
    str,
    Field(
        examples=["ada@example.com"],
        description="Unicode-normalised (NFC), the local part's case as sent, the host name lower-cased in Unicode.",
        json_schema_extra={"format": "idn-email", "maxLength": MAX_LENGTH},
    ),
]
