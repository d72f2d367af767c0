"""Client TLS: the SSL context that presents a connection's certificate and trusts its CA."""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from ._errors import InvalidField, NotConfigured
from ._providers import Provider

__all__ = ["CERT_FIELD", "KEY_FIELD", "context_for"]

#: The setup fields of a client certificate (PEM) and its private key (PEM, a secret).
CERT_FIELD = "client_certificate"
KEY_FIELD = "client_key"

# Contexts by a digest of their PEMs: building one reads the key and the CA again.
_KEPT = 256
_contexts: dict[bytes, ssl.SSLContext] = {}
_lock = threading.Lock()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def context_for(provider: Provider, plain: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The SSL context of ``provider``'s calls for a connection's ``plain`` data: its client
    certificate presented (when the provider asks for one) and the provider's CA bundle
    trusted; None when neither applies (the default verification)."""
    wants_cert = provider.presents_certificate
    ca = provider.ca_bundle
    if not wants_cert and ca is None:
        return None
    cert = key = None
    if wants_cert:
        values = provider.template_values(plain)
        cert, key = _text(values.get(CERT_FIELD)), _text(values.get(KEY_FIELD))
        if cert is None or key is None:
            field = CERT_FIELD if cert is None else KEY_FIELD
            raise NotConfigured(
                f"The connection has no {field!r} saved: this provider's calls present a "
                "client certificate; call save_setup first.",
                field=field,
            )
    digest = hashlib.sha256(
        "\0".join((cert or "", key or "", ca or "")).encode("utf-8", "surrogatepass")
    ).digest()
    with _lock:
        found = _contexts.get(digest)
    if found is not None:
        return found
    built = _build(cert, key, ca)
    with _lock:
        if len(_contexts) >= _KEPT:
            _contexts.clear()
        _contexts[digest] = built
    return built


def _build(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cadata=ca) if ca else ssl.create_default_context()
    except (ssl.SSLError, ValueError):
        raise InvalidField(
            "The provider's ca_bundle is not a PEM certificate bundle.", field="ca_bundle"
        ) from None
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    # load_cert_chain reads files only: private ones (0600) that live for this call alone.
    paths: list[str] = []
    try:
        for pem in (cert, key):
            fd, path = tempfile.mkstemp(prefix="integrations-tls-", suffix=".pem")
            paths.append(path)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(pem)
        context.load_cert_chain(paths[0], paths[1])
    except (ssl.SSLError, ValueError, OSError):
        # The library's message may quote the files' contents: say which field, nothing more.
        raise InvalidField(
            f"Setup fields {CERT_FIELD!r} and {KEY_FIELD!r} must hold a PEM certificate and "
            "its matching private key (unencrypted).",
            field=KEY_FIELD,
        ) from None
    finally:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
