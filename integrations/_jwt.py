"""Signed JWT assertions (RFC 7523): service-account grants and private_key_jwt client auth."""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import InvalidField

__all__ = ["SigningKey", "assertion", "signing_key"]

#: How long an assertion is valid: RFC 7523 asks for a short life; Google accepts up to 1 h.
LIFETIME = 300

_ALGORITHMS = {"RSA": "RS256", "EC": "ES256"}


@dataclass(frozen=True, slots=True, repr=False)
class SigningKey:
    """A private key ready to sign assertions: its algorithm and key id (``kid``)."""

    key: Any = field(repr=False)
    algorithm: str
    kid: str | None = None

    def __repr__(self) -> str:
        return f"<SigningKey {self.algorithm} kid={self.kid!r}>"


def signing_key(material: Any, *, field_name: str, kid: str | None = None) -> SigningKey:
    """The key in ``material``: a PEM private key (RSA or P-256), or a private JWK (a JSON
    text or a mapping). InvalidField names ``field_name``, never the value."""
    if isinstance(material, Mapping):
        text = json.dumps(dict(material), sort_keys=True)
    elif isinstance(material, str):
        text = material.strip()
    else:
        raise InvalidField(
            f"Setup field {field_name!r} must be a PEM private key or a private JWK.",
            field=field_name,
        )
    return _parse(text, field_name, kid)


@functools.lru_cache(maxsize=64)
def _parse(text: str, field_name: str, kid: str | None) -> SigningKey:
    from joserfc import jwk
    from joserfc.errors import JoseError

    wrong = InvalidField(
        f"Setup field {field_name!r} is not a private key: give an RSA or P-256 private key "
        "as PEM ('-----BEGIN PRIVATE KEY-----...') or as a private JWK.",
        field=field_name,
    )
    try:
        if text.startswith("{"):
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("kty") not in _ALGORITHMS:
                raise wrong
            key = jwk.import_key(data)
            kid = kid or (data.get("kid") if isinstance(data.get("kid"), str) else None)
        elif "PRIVATE KEY" in text:
            key = _import_pem(text)
        else:
            raise wrong
    except (ValueError, TypeError, KeyError, JoseError):
        raise wrong from None
    algorithm = _ALGORITHMS.get(key.key_type)
    if algorithm is None or not key.is_private:
        raise wrong
    curve = getattr(key, "curve_name", None)
    if key.key_type == "EC" and curve != "P-256":
        raise InvalidField(
            f"Setup field {field_name!r} holds an EC key on {curve}; ES256 needs P-256.",
            field=field_name,
        )
    return SigningKey(key, algorithm, kid)


def _import_pem(text: str) -> Any:
    from joserfc import jwk

    for key_type in ("RSA", "EC"):
        try:
            return jwk.import_key(text, key_type)
        except Exception:
            continue
    raise ValueError("not an RSA or EC private key")


def assertion(
    key: SigningKey,
    *,
    issuer: str,
    subject: str,
    audience: str,
    lifetime: int = LIFETIME,
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A signed JWT: ``iss``, ``sub``, ``aud``, ``iat``, ``exp`` and a fresh ``jti`` (so a
    replayed assertion can be told apart), plus ``extra`` claims such as ``scope``."""
    from joserfc import jwt

    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": secrets.token_urlsafe(16),
    }
    if extra:
        claims.update({k: v for k, v in extra.items() if v is not None})
    header: dict[str, Any] = {"alg": key.algorithm, "typ": "JWT"}
    if key.kid:
        header["kid"] = key.kid
    return str(jwt.encode(header, claims, key.key))
