"""Email addresses: the syntax the service accepts, and the form it stores and compares."""

import re
import unicodedata
from typing import Annotated

import idna
from pydantic import AfterValidator, Field, StringConstraints

# An address as RFC 5322 writes it, with RFC 6531's Unicode: a dot-atom local part of at most
# 64 bytes, then a host name of two or more labels, the last ending in a letter. Quoted local
# parts and address literals ("a b"@x, a@[192.0.2.1]) are refused, as most mail systems do.
# Reserved names (.test, .invalid, .local) are syntactically valid, which is all API.md asks.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
LOCAL_PART = re.compile(rf"{ATOM}(?:\.{ATOM})*")
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_email(value: str) -> str:
    """Check the syntax; lower-case the domain and keep the local part as given."""
    local, _, domain = value.rpartition("@")
    # Unicode letters, marks, digits, symbols and punctuation; no controls, spaces or surrogates.
    visible = local.isascii() or all(unicodedata.category(c)[0] not in "CZ" for c in local)
    if not (visible and LOCAL_PART.fullmatch(local) and len(local.encode()) <= 64):
        raise ValueError("the part before the @ is not a valid local part")
    domain = domain.lower()
    labels = [host_label(label) for label in domain.split(".")]
    if len(labels) < 2 or not labels[-1][-1].isalpha() or len(".".join(labels)) > 253:
        raise ValueError("the part after the @ is not a host name of two or more labels")
    return f"{local}@{domain}"


def host_label(label: str) -> str:
    """The label as DNS carries it (IDNA for Unicode); ValueError if it is not a valid one."""
    if HOST_LABEL.fullmatch(label) and label[2:4] != "--":  # "--" there is reserved for IDNA
        return label
    try:
        return idna.alabel(unicodedata.normalize("NFC", label)).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise ValueError(f"the part after the @ has an invalid label {label!r}") from None


def key(address: str) -> str:
    """The case-insensitive key of an address, which the unique column holds."""
    return address.lower()


# format "email" tells clients (and schemathesis) that any string will not do.
Email = Annotated[
    str,
    StringConstraints(max_length=254),
    AfterValidator(normalize_email),
    Field(examples=["ada@example.com"], json_schema_extra={"format": "email"}),
]
# What the service sends: an address it stored, at most what the column holds.
StoredEmail = Annotated[str, Field(json_schema_extra={"format": "email", "maxLength": 254})]
