"""The ``bot_token`` scheme: a bot's token, in a header (``Bot {bot_token}``) or the path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._setup import SetupField
from ._kinds import AuthHeader
from .headers import HeaderScheme


class BotTokenScheme(HeaderScheme):
    name = "bot_token"
    label = "Bot token"
    secret_fields = frozenset({"bot_token"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (SetupField(key="bot_token", label="Bot token", required=True, secret=True),)

    def auth_header(self) -> AuthHeader | None:
        return AuthHeader(template="Bearer {bot_token}")
