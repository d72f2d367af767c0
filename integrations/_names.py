"""Pure parsing of names, refs, uuids, owners and storage keys."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid as _uuid

from ._errors import (
    ConfigurationError,
    EmptyName,
    InvalidInput,
    InvalidName,
    InvalidProviderKey,
    InvalidUUID,
)
from ._input import check_text

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_NAME_LENGTH = 100
PROVIDER_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
IDENTIFIER_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}")
KEY_PREFIX = "integration:"
DEFAULT_NAME = "default"


NAME_RULE = (
    "letters, digits, '_' and '-', starting with a letter or digit, "
    f"at most {MAX_NAME_LENGTH} characters"
)
PROVIDER_KEY_RULE = "lowercase letters, digits, '_' and '-', starting with a letter or digit"
_SHOWN = 40


def shown(value: object) -> str:
    """A user-given value for an error message: repr'd and cut to a few dozen characters.

    Only strings and plain numbers are echoed; anything else is named by its type, since
    turning it into text may raise or never end (a deeply nested list, a hostile __str__).
    """
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, bool | float):
        text = str(value)
    elif isinstance(value, int):
        # A huge int has no str() (sys.set_int_max_str_digits) and no room in a message.
        text = str(value) if value.bit_length() <= 128 else f"an int of {value.bit_length()} bits"
    else:
        return f"a {type(value).__name__}"
    if len(text) > _SHOWN:
        text = text[:_SHOWN] + "…"
    return repr(text)


def normalize_name(name: object) -> str:
    """Trim and validate a connection name (``empty_name`` / ``invalid_name``)."""
    if not isinstance(name, str):
        raise InvalidName(
            f"A connection name must be a string, not {type(name).__name__}; use {NAME_RULE}."
        )
    check_text(name, "connection name", error=InvalidName)
    trimmed = name.strip()
    if not trimmed:
        raise EmptyName()
    if NAME_RE.fullmatch(trimmed) is None or len(trimmed) > MAX_NAME_LENGTH:
        raise InvalidName(f"The connection name {shown(trimmed)} is not allowed: use {NAME_RULE}.")
    return trimmed


def check_provider_key(provider: object) -> str:
    """Check the shape of a provider key (registry membership is checked elsewhere)."""
    if not isinstance(provider, str) or PROVIDER_KEY_RE.fullmatch(provider) is None:
        raise InvalidProviderKey(
            f"The provider key {shown(provider)} is malformed: provider keys are "
            f"{PROVIDER_KEY_RULE}, like 'openai'."
        )
    return provider


def storage_key(provider: str, name: str) -> str:
    """Build ``integration:{provider}:{name}``; only row birth and legacy migrators call this."""
    return f"{KEY_PREFIX}{provider}:{name}"


def renamed_key(stored_key: str, new_name: str) -> str:
    """Rewrite the name part of a stored key, taking the provider from the key itself."""
    prefix, sep, _old = stored_key.rpartition(":")
    if not sep or not prefix.startswith(KEY_PREFIX):
        raise InvalidInput("stored key is malformed")
    return f"{prefix}:{new_name}"


def provider_of_key(stored_key: str) -> str:
    return stored_key[len(KEY_PREFIX) :].rpartition(":")[0]


def name_of_key(stored_key: str) -> str:
    return stored_key.rpartition(":")[2]


def parse_ref(ref: object) -> tuple[str, str]:
    """``"p:n"``, bare ``"p"`` (= ``"p:default"``) or ``("p", "n")`` → (provider, name).

    Anything else raises ``invalid``.
    """
    if isinstance(ref, tuple):
        if len(ref) != 2 or not all(isinstance(part, str) for part in ref):
            raise InvalidInput(
                "A ref tuple must be (provider, name), two strings, like ('openai', 'default')."
            )
        provider, name = ref
    elif isinstance(ref, str):
        provider, sep, name = ref.strip().partition(":")
        if not sep:
            name = DEFAULT_NAME
    else:
        raise InvalidInput(
            f"A ref must be 'provider:name', 'provider' or (provider, name), "
            f"not {type(ref).__name__}."
        )
    provider, name = provider.strip(), name.strip()
    if PROVIDER_KEY_RE.fullmatch(provider) is None or NAME_RE.fullmatch(name) is None:
        if PROVIDER_KEY_RE.fullmatch(provider.lower()) and NAME_RE.fullmatch(name):
            fixed = provider.lower() if name == DEFAULT_NAME else f"{provider.lower()}:{name}"
            raise InvalidInput(
                f"The ref {shown(ref)} is malformed: provider keys are lowercase "
                f"(did you mean {fixed!r}?)."
            )
        raise InvalidInput(
            f"The ref {shown(ref)} is malformed: write 'provider:name' (like 'openai:default'), "
            f"where the provider key is {PROVIDER_KEY_RULE} and the name is {NAME_RULE}."
        )
    return provider, name


def settings_key(ref: str) -> str:
    """Storage key for ``"google"`` (default connection) or ``"google:personal"``."""
    provider, name = parse_ref(ref)
    return storage_key(provider, name)


_CANONICAL_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_uuid(value: object) -> str | None:
    """The canonical text of a uuid, or None when ``value`` is not one."""
    if isinstance(value, str) and _CANONICAL_UUID_RE.fullmatch(value) is not None:
        return value  # already canonical: the common case, without building a UUID
    if isinstance(value, _uuid.UUID):
        return str(value)
    if not isinstance(value, str) or len(value) not in (32, 36, 38):
        return None
    try:
        return str(_uuid.UUID(value))
    except ValueError:
        return None


def require_uuid(value: object) -> str:
    """The canonical uuid text, or ``invalid_uuid`` echoing (a cut of) the value."""
    parsed = parse_uuid(value)
    if parsed is None:
        hint = ""
        if (isinstance(value, str) and ":" in value) or isinstance(value, tuple):
            hint = " (this looks like a 'provider:name' ref)"
        raise InvalidUUID(
            f"Expected a connection uuid, got {shown(value)}{hint}. This method takes a "
            "uuid: get one from a ref with await integ.resolve_to_uuid('provider:name')."
        )
    return parsed


def check_owner(owner: object) -> str | None:
    """``None`` is the system scope; an owner is any non-blank string."""
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner.strip() or len(owner) > 255:
        raise InvalidInput(
            f"The owner {shown(owner)} is not allowed: pass None (the system scope) or a "
            "non-blank string of at most 255 characters."
        )
    return check_text(owner, "owner")


def check_actor(actor: object) -> str | None:
    if actor is None:
        return None
    if not isinstance(actor, str) or len(actor) > 255:
        raise InvalidInput(
            f"The actor {shown(actor)} is not allowed: pass None or a string of at most "
            "255 characters."
        )
    return check_text(actor, "actor")


def check_not_system_schema(value: str, what: str) -> str:
    """Refuse PostgreSQL's own schemas: ``information_schema``, ``pg_catalog`` and every
    ``pg_*`` name (reserved for the system; pg_dump skips them, so data there has no
    backup)."""
    if value == "information_schema" or value.startswith("pg_"):
        raise ConfigurationError(
            f"The {what} {value!r} is a PostgreSQL system schema (information_schema and pg_* "
            "are reserved and left out of pg_dump backups); choose another name, such as "
            "the default 'integrations'."
        )
    return value


def check_identifier(value: str, what: str) -> str:
    """Schema names are validated once, at configuration time."""
    if not isinstance(value, str) or IDENTIFIER_RE.fullmatch(value) is None:
        raise InvalidInput(
            f"The {what} {shown(value)} is not allowed: use lowercase letters, digits and '_', "
            "starting with a letter or '_', at most 48 characters."
        )
    return check_not_system_schema(value, what)


_uuid7_lock = threading.Lock()
_uuid7_last = 0
_uuid7_seq = 0


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562), monotonic within the process."""
    global _uuid7_last, _uuid7_seq
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _uuid7_last:
            ms = _uuid7_last
            _uuid7_seq = (_uuid7_seq + 1) & 0xFFF
            if _uuid7_seq == 0:
                ms += 1
        else:
            _uuid7_seq = int.from_bytes(os.urandom(2), "big") & 0x7FF
        _uuid7_last = ms
        seq = _uuid7_seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand
    return str(_uuid.UUID(int=value))
