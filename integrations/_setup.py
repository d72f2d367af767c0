"""Setup fields: the values an operator types when setting up a connection."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from yarl import URL

from ._errors import InvalidField

__all__ = ["FieldType", "SetupField"]

#: ``text`` is a string of several lines (a PEM key or certificate): line breaks and tabs
#: are kept, other control characters refused.
FieldType = Literal["string", "text", "integer", "boolean", "choice", "url"]

_FIELD_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SetupField(_Frozen):
    """One value an operator types when setting up a connection.

    ``default`` is used wherever the stored value is absent or blank (a blank
    Microsoft ``tenant_id`` means ``"common"``), so a required field with a
    default is never missing. ``pattern`` (a regular expression the whole
    string must match) keeps values that land in URLs, such as an AWS region,
    well formed; ``expected`` says in words what it accepts, for the error
    message a mismatch gets.
    """

    key: str
    label: str
    type: FieldType = "string"
    required: bool = False
    secret: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()
    default: Any = None
    pattern: str | None = None
    expected: str = ""

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if not _FIELD_KEY_RE.match(value):
            raise ValueError("setup field key must match ^[A-Za-z_][A-Za-z0-9_]*$")
        return value

    @model_validator(mode="after")
    def _check_choices(self) -> SetupField:
        if (self.type == "choice") != bool(self.choices):
            raise ValueError("choices are required for, and only for, type 'choice'")
        if self.pattern is not None:
            re.compile(self.pattern)
        return self

    def coerce(self, value: Any) -> Any:
        """The value to store, or InvalidField naming this field (never echoing the value)."""
        if value is None:
            return None
        if isinstance(value, str):
            value = value.strip()
            if value == "" and self.type != "string":
                return None
        if self.type in ("string", "text"):
            if not isinstance(value, str):
                raise self._invalid("must be a string")
            if "\x00" in value:
                raise self._invalid("must not contain NUL characters")
            if self.pattern is not None and value and not re.fullmatch(self.pattern, value):
                raise self._invalid(self._wrong_format(value))
            return value
        if self.type == "integer":
            if isinstance(value, bool):
                raise self._invalid("must be an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,18}", value):
                return int(value)
            raise self._invalid("must be an integer")
        if self.type == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise self._invalid("must be true or false")
        if self.type == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise self._invalid(f"must be one of: {', '.join(self.choices)}")
        # type == "url"
        if not isinstance(value, str):
            raise self._invalid("must be an absolute http(s) URL")
        try:
            url = URL(value)
        except (TypeError, ValueError):
            raise self._invalid("must be an absolute http(s) URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise self._invalid("must be an absolute http(s) URL")
        return value

    def _wrong_format(self, value: str) -> str:
        expected = self.expected or f"a value matching the regular expression {self.pattern}"
        # A secret's value is never echoed, even cut short.
        got = "" if self.secret else f", got {value[:40] + '…' if len(value) > 40 else value!r}"
        return f"has the wrong format{got}: expected {expected}"

    def _invalid(self, why: str) -> InvalidField:
        return InvalidField(f"Setup field {self.key!r} {why}.", field=self.key)
