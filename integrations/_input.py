"""Pure validators refusing hostile input with a typed error that names the field, not the value."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from ._errors import InvalidAttrs, InvalidField, InvalidInput

__all__ = [
    "EARLIEST_TIME",
    "ENVELOPE_MARKER",
    "LATEST_TIME",
    "MAX_ATTRS_BYTES",
    "MAX_DEPTH",
    "MAX_SAFE_INTEGER",
    "check_attrs",
    "check_header_value",
    "check_method",
    "check_secret_text",
    "check_text",
    "check_timestamp",
    "has_bad_chars",
    "parse_timestamp",
    "scrub_text",
]

# Deeper nesting is refused before any recursive code (json, asyncpg, PostgreSQL) sees it.
MAX_DEPTH: Final = 32
# Size of a setup call's attributes as compact UTF-8 JSON.
MAX_ATTRS_BYTES: Final = 64 * 1024
# Integers JSON parsers in other languages read exactly (JavaScript's Number.MAX_SAFE_INTEGER).
MAX_SAFE_INTEGER: Final = 2**53 - 1
# Timestamps are clamped into this range, so adding a leeway or a lifetime cannot overflow.
EARLIEST_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME: Final = datetime(9000, 1, 1, tzinfo=UTC)
# The member that marks an encrypted envelope; no caller value may carry it.
ENVELOPE_MARKER: Final = "$enc"

# U+0000 cannot be stored in PostgreSQL text or JSONB; a lone surrogate cannot be encoded.
_BAD_CHARS_RE = re.compile("[\x00\ud800-\udfff]")
# C0 controls and DEL: a secret ends up in a header, where these split or break it.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")
_CONTROL_MULTILINE_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# RFC 9110 field-value: visible characters, space and tab (obs-text allowed).
_HEADER_BAD_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# RFC 9110 token, ASCII only.
_COMMON_METHODS = frozenset(
    ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "get", "post", "put", "delete")
)
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)


def has_bad_chars(text: str) -> bool:
    """True if ``text`` holds U+0000 or a lone surrogate."""
    return _BAD_CHARS_RE.search(text) is not None


def scrub_text(text: str) -> str:
    """``text`` with each NUL and unpaired surrogate replaced by U+FFFD, for text from
    elsewhere (a provider's message) that is worth keeping rather than refusing."""
    return _BAD_CHARS_RE.sub("\ufffd", text)


def _bad_chars_error(field: str, error: type[InvalidInput]) -> InvalidInput:
    return error(f"{field} must not contain NUL or unpaired surrogate characters", field=field)


def check_text(value: object, field: str, *, error: type[InvalidInput] = InvalidInput) -> str:
    """``value`` if it is a string PostgreSQL can store and UTF-8 can encode.

    A non-string raises ``error`` too: the caller decides the type of the field.
    """
    if not isinstance(value, str):
        raise error(f"{field} must be a string", field=field)
    if has_bad_chars(value):
        raise _bad_chars_error(field, error)
    return value


def check_secret_text(value: str, field: str, *, multiline: bool = False) -> str:
    """A secret string without control characters, which would break a header at send time
    (``multiline``: a key or certificate of several lines, which never goes in a header,
    keeps its line breaks and tabs)."""
    pattern = _CONTROL_MULTILINE_RE if multiline else _CONTROL_RE
    if has_bad_chars(value) or pattern.search(value) is not None:
        raise InvalidField(
            f"Setup field {field!r} must not contain control characters.", field=field
        )
    return value


def _label(path: str) -> str:
    return f"Setup attribute {path!r}"


def _json(value: Any, path: str, depth: int) -> Any:
    # ``path`` is the top-level key only: nested keys are data and may be secret.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise InvalidField(f"{_label(path)} holds an integer outside ±(2**53-1).", field=path)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidField(f"{_label(path)} must not contain NaN or infinity.", field=path)
        return value
    if isinstance(value, str):
        if has_bad_chars(value):
            raise InvalidField(
                f"{_label(path)} must not contain NUL or unpaired surrogate characters.",
                field=path,
            )
        return value
    if depth >= MAX_DEPTH:
        raise InvalidField(f"{_label(path)} is nested deeper than {MAX_DEPTH} levels.", field=path)
    if isinstance(value, Mapping):
        if ENVELOPE_MARKER in value:
            raise InvalidField(
                f"{_label(path)} holds a mapping with a {ENVELOPE_MARKER!r} member, which "
                "is reserved for encrypted values.",
                field=path,
            )
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidAttrs(f"Setup attribute keys under {path!r} must be strings.")
            if has_bad_chars(key):
                raise InvalidAttrs(
                    f"A setup attribute key under {path!r} holds NUL or an unpaired "
                    "surrogate character.",
                    field=path,
                )
            out[key] = _json(item, path, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_json(item, path, depth + 1) for item in value]
    raise InvalidField(f"{_label(path)} is not JSON-serializable.", field=path)


def check_attrs(attrs: object, *, max_bytes: int = MAX_ATTRS_BYTES) -> dict[str, Any]:
    """A plain-JSON copy of setup attributes (mappings to dicts, tuples to lists), or
    InvalidAttrs naming the offending key: a non-string key, NUL or an unpaired surrogate
    in a key or string, an integer beyond ±(2**53-1), NaN or infinity, nesting deeper than
    ``MAX_DEPTH``, a mapping carrying the envelope marker, or more than ``max_bytes`` of
    JSON in all."""
    if not isinstance(attrs, Mapping):
        raise InvalidAttrs("Setup attributes must be a mapping.")
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise InvalidAttrs("Setup attribute keys must be strings.")
        if has_bad_chars(key):
            raise InvalidAttrs(
                "A setup attribute key holds NUL or an unpaired surrogate character."
            )
        if key == ENVELOPE_MARKER:
            raise InvalidAttrs(
                f"Setup attributes must not have a {ENVELOPE_MARKER!r} member, which is "
                "reserved for encrypted values."
            )
        out[key] = _json(value, key, 1)
    size = len(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > max_bytes:
        raise InvalidAttrs(f"Setup attributes are larger than {max_bytes} bytes of JSON.")
    return out


def check_method(method: object) -> str:
    """An HTTP method name: an RFC 9110 token of ASCII letters, digits and ``!#$%&'*+-.^_`|~``."""
    if isinstance(method, str) and method in _COMMON_METHODS:
        return method
    if not isinstance(method, str) or _TOKEN_RE.fullmatch(method) is None:
        raise InvalidInput("the HTTP method must be a token (RFC 9110)", field="method")
    return method


def check_header_value(value: str, field: str) -> str:
    """A header value without CR, LF, NUL or other controls (tab allowed)."""
    if _HEADER_BAD_RE.search(value) is not None:
        raise InvalidInput(
            f"header {field!r} must not contain control or unpaired surrogate characters",
            field=field,
        )
    return value


def _clamp(moment: datetime) -> datetime:
    # Comparing aware datetimes never overflows; converting or adding to them can.
    if moment <= EARLIEST_TIME:
        return EARLIEST_TIME
    if moment >= LATEST_TIME:
        return LATEST_TIME
    return moment.astimezone(UTC)


def _parse(value: object) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and not has_bad_chars(value):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        return None
    return moment


def parse_timestamp(value: object) -> datetime | None:
    """An ISO 8601 timestamp with a UTC offset as an aware UTC datetime clamped to
    [``EARLIEST_TIME``, ``LATEST_TIME``] (year 1 reads as long expired, year 9999 as far
    ahead); anything unreadable or without an offset is None."""
    moment = _parse(value)
    return None if moment is None else _clamp(moment)


def check_timestamp(value: object, field: str) -> datetime:
    """A timestamp to store: a timezone-aware datetime or ISO 8601 string within
    [``EARLIEST_TIME``, ``LATEST_TIME``], as UTC; else InvalidInput naming the field."""
    moment = _parse(value)
    if moment is None:
        raise InvalidInput(f"{field} must be an ISO 8601 timestamp with a UTC offset", field=field)
    if not EARLIEST_TIME <= moment <= LATEST_TIME:
        raise InvalidInput(
            f"{field} must lie between {EARLIEST_TIME.year} and {LATEST_TIME.year}", field=field
        )
    return _clamp(moment)
