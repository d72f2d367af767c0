"""Pure display helpers of the console: status words, ages, setup field widgets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import _models
from .._providers import Provider, SetupField

#: The stored statuses, the words the library, the CLI and the console all use.
STATUSES = ("connected", "error", "disconnected")


def status_text(provider: Provider | None, data: Mapping[str, Any]) -> str:
    """One of STATUSES: the stored status, the same word everywhere (a connection whose
    setup lacks a required field is ``disconnected``; :func:`setup_incomplete` says why)."""
    status = data.get("status")
    return str(status) if status in STATUSES else "disconnected"


def setup_incomplete(provider: Provider | None, data: Mapping[str, Any]) -> bool:
    """Whether a required setup field is missing (never after a disconnect, which drops
    the key itself: the setup was complete)."""
    if data.get("status") in ("connected", "error") or data.get("disconnected_at"):
        return False
    return provider is not None and bool(provider.missing_required(data))


def ago(value: object, now: datetime | None = None) -> str:
    """``"3 min ago"`` (``"42 s ago"`` within the minute) for an ISO 8601 time; ``"never"``
    when absent or unreadable."""
    return _models.ago(value, now, seconds=True)


def account_text(data: Mapping[str, Any]) -> str:
    """The account a connection acts as (OAuth userinfo), or an empty string."""
    account = data.get("account")
    if isinstance(account, Mapping):
        for key in ("email", "name", "sub"):
            value = account.get(key)
            if isinstance(value, str) and value:
                return value
    return ""


@dataclass(frozen=True, slots=True)
class FieldView:
    """One setup field as the connection form shows it."""

    key: str
    label: str
    help: str
    required: bool
    input_type: str
    choices: tuple[str, ...]
    value: str
    # Secret (or stored-masked) fields are never pre-filled; a blank input keeps the stored value.
    keeps_blank: bool
    hint: str

    @property
    def note(self) -> str:
        """What the form says under a secret field holding a stored value (else empty)."""
        return f"Stored: {self.hint}; leave blank to keep it." if self.hint else ""


_INPUT_TYPES = {"integer": "number", "url": "url", "boolean": "select", "choice": "select"}


def field_views(provider: Provider, masked: Mapping[str, Any]) -> list[FieldView]:
    """The provider's setup fields with what may be shown of the stored (masked) data."""
    freeform = provider.scheme.freeform
    nested = masked.get("credentials") if freeform else None
    views = []
    for field in provider.setup_fields:
        stored = (nested or {}).get(field.key) if isinstance(nested, Mapping) else None
        if stored is None:
            stored = masked.get(field.key)
        hidden = field.secret or freeform
        views.append(
            FieldView(
                key=field.key,
                label=field.label,
                help=field.help,
                required=field.required,
                input_type=_input_type(field),
                choices=_choices(field),
                value="" if hidden or stored is None else _text(stored),
                keeps_blank=hidden,
                hint=_text(stored) if hidden and stored not in (None, "") else "",
            )
        )
    return views


def _input_type(field: SetupField) -> str:
    if field.type == "text":
        # Several lines (a PEM key): a password input would drop its line breaks.
        return "textarea"
    if field.secret:
        return "password"
    return _INPUT_TYPES.get(field.type, "text")


def _choices(field: SetupField) -> tuple[str, ...]:
    if field.type == "boolean":
        return ("true", "false")
    return field.choices


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def setup_patch(provider: Provider, form: Mapping[str, str]) -> dict[str, Any]:
    """The attrs to save from a submitted form: blank secret fields are left out (kept)."""
    attrs: dict[str, Any] = {}
    hidden_all = provider.scheme.freeform
    for field in provider.setup_fields:
        if field.key not in form:
            continue
        value = form[field.key]
        if value.strip() == "" and (field.secret or hidden_all):
            continue
        attrs[field.key] = value
    return attrs


def parse_scopes(text: str) -> list[str]:
    """Scopes typed by an operator, separated by spaces or commas."""
    return [scope for scope in text.replace(",", " ").split() if scope]
