"""HeaderScheme: the base of schemes whose requests carry stored credentials through the
provider's header kind (a templated header, Basic, a token in the path, SigV4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from yarl import URL

from ._base import AuthScheme, ProviderView
from ._kinds import AUTH_KINDS

__all__ = ["HeaderScheme"]


class HeaderScheme(AuthScheme):
    """A scheme whose requests carry stored credentials through the provider's header kind
    (a templated header, Basic, a token in the path, SigV4); nothing to renew."""

    def prepared_headers(
        self, provider: ProviderView, credentials: Mapping[str, Any]
    ) -> dict[str, str] | None:
        header = provider.auth_header
        kind = AUTH_KINDS.get(header.kind) if header is not None else None
        if kind is None or not kind.reusable:
            return None
        added, _ = self.sign(provider, credentials, "GET", _ANY_URL, None)
        return added


# Reusable kinds do not look at the URL; any absolute one will do.
_ANY_URL = URL("https://prepared.invalid/")
