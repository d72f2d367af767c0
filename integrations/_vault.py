"""Secrets at rest: per-field AES-256-GCM envelopes, a keyring with key ids, and masking."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import _telemetry as telemetry
from ._errors import (
    ConfigurationError,
    DecryptionFailed,
    EncryptionNotConfigured,
    InvalidAttrs,
    UnknownKey,
)

__all__ = [
    "SECRET_FIELDS",
    "Keyring",
    "Vault",
    "generate_key",
    "is_envelope",
    "looks_like_envelope",
    "mask_data",
    "mask_secret",
]

logger = logging.getLogger("integrations")

SECRET_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "client_secret",
        "access_token",
        "refresh_token",
        "api_key",
        "secret_key",
        "bot_token",
        "password",
    }
)

CREDENTIALS: Final = "credentials"
MASK: Final = "••••"
# Secrets shorter than this show no characters at all when masked.
HINT_MIN_LENGTH: Final = 12
HINT_LENGTH: Final = 4

KEY_PREFIX: Final = "ik1"
KEY_BYTES: Final = 32
KEY_FORMAT: Final = "ik1:<key id>:<base64url of 32 bytes>"
ENV_KEYS: Final = "INTEGRATIONS_KEYS"
ENVELOPE_VERSION: Final = 1
NONCE_BYTES: Final = 12

ENVELOPE_MARKER: Final = "$enc"

_KID_RE = re.compile(r"[0-9a-f]{8}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]{43}=?")
_ENVELOPE_KEYS = frozenset({"$enc", "kid", "n", "ct"})
_ENVELOPE_KEYS_WITH_HINT = _ENVELOPE_KEYS | {"hint"}
# Standard base64: a 96-bit nonce is 16 characters; a ciphertext holds at least one byte
# of JSON plus the 16-byte tag, so 24 characters or more.
_NONCE_RE = re.compile(r"[A-Za-z0-9+/]{16}")
_CIPHERTEXT_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_CIPHERTEXT_MIN = 24
# Strings json.dumps writes as they are: printable ASCII other than the quote and backslash.
_PLAIN_JSON_RE = re.compile(r"[ !#-\[\]-~]*")
# A uuid already in canonical form (lowercase, hyphenated): used as it is.
_CANONICAL_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# json.loads without its per-call argument checks (the plaintext is what _encrypt wrote).
_decode_json = json.JSONDecoder().decode
# Values that can be neither an envelope nor mistaken for one.
_SCALARS: Final = frozenset({str, int, float, bool})


def _key_id(material: bytes) -> str:
    # Derived rather than random so a mistyped id or body is caught at parse time.
    return hashlib.sha256(b"integrations key id\x00" + material).hexdigest()[:8]


def _aead(material: bytes) -> AESGCM:
    # HKDF gives the cipher key its own domain, separate from the key id derivation.
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"integrations vault v1 aes-256-gcm",
    )
    return AESGCM(hkdf.derive(material))


def generate_key() -> str:
    """A new random key string, ``ik1:<key id>:<base64url of 32 bytes>``."""
    material = secrets.token_bytes(KEY_BYTES)
    body = base64.urlsafe_b64encode(material).rstrip(b"=").decode("ascii")
    return f"{KEY_PREFIX}:{_key_id(material)}:{body}"


def _parse_key(text: str, position: int) -> tuple[str, bytes]:
    # Messages name the key only by position: any part of a malformed key may be secret.
    def bad(reason: str) -> ConfigurationError:
        return ConfigurationError(
            f"encryption key #{position} is malformed ({reason}); expected {KEY_FORMAT}, "
            "as made by integrations.generate_key()"
        )

    parts = text.split(":")
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise bad("wrong layout")
    _, kid, body = parts
    if not _KID_RE.fullmatch(kid):
        raise bad("the key id must be 8 lowercase hex digits")
    if not _B64URL_RE.fullmatch(body):
        raise bad(f"the key body must be {KEY_BYTES} bytes in base64url")
    try:
        material = base64.urlsafe_b64decode(body.rstrip("=") + "=")
    except (binascii.Error, ValueError):
        raise bad(f"the key body must be {KEY_BYTES} bytes in base64url") from None
    if len(material) != KEY_BYTES:
        raise bad(f"the key body must be {KEY_BYTES} bytes in base64url")
    if _key_id(material) != kid:
        raise bad("the key id does not match the key body")
    return kid, material


def _split_keys(keys: str | Sequence[str]) -> Iterator[str]:
    items: Iterable[object] = [keys] if isinstance(keys, str) else keys
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"encryption keys must be strings, not {type(item).__name__}")
        for part in item.split(","):
            part = part.strip()
            if part:
                yield part


class Keyring:
    """Encryption keys by id: the primary (first) encrypts, every key decrypts.

    Build one with :meth:`parse` or :meth:`from_env`. The repr shows key ids only.
    """

    __slots__ = ("_ciphers", "_ids", "custody")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        #: Where the keys came from (set by the key sources; None for plain key strings).
        self.custody: Any = None
        if not keys:
            raise ConfigurationError("the keyring needs at least one encryption key")
        ciphers: dict[str, AESGCM] = {}
        for kid, material in keys:
            if len(material) != KEY_BYTES or _key_id(material) != kid:
                raise ValueError("use Keyring.parse() to build a keyring from key strings")
            ciphers.setdefault(kid, _aead(material))
        self._ciphers = ciphers
        self._ids = tuple(ciphers)

    @classmethod
    def parse(cls, keys: str | Sequence[str]) -> Keyring:
        """One key string or a sequence of them, primary first; a string may hold several
        comma-separated keys. Raises ConfigurationError on a malformed key."""
        if not isinstance(keys, str | Sequence):
            raise ConfigurationError(
                f"keys must be a string or a sequence of strings, not {type(keys).__name__}; "
                "generate a key with integrations.generate_key()"
            )
        parsed: dict[str, bytes] = {}
        for position, text in enumerate(_split_keys(keys), start=1):
            kid, material = _parse_key(text, position)
            known = parsed.setdefault(kid, material)
            if not secrets.compare_digest(known, material):
                raise ConfigurationError(f"two different encryption keys share the id {kid!r}")
        if not parsed:
            raise ConfigurationError(
                "keys= (or INTEGRATIONS_KEYS) holds no encryption key; generate one with "
                "integrations.generate_key()."
            )
        return cls(list(parsed.items()))

    @classmethod
    def from_env(cls) -> Keyring | None:
        """The keys in INTEGRATIONS_KEYS (comma-separated, primary first), or None if unset."""
        value = os.environ.get(ENV_KEYS, "")
        if not value.strip(" \t\r\n,"):
            return None
        return cls.parse(value)

    @property
    def primary_id(self) -> str:
        return self._ids[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    def __contains__(self, kid: object) -> bool:
        return kid in self._ciphers

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Keyring(primary_id={self.primary_id!r}, ids={self._ids!r})"

    def _cipher(self, kid: str) -> AESGCM | None:
        return self._ciphers.get(kid)


def is_envelope(value: object) -> TypeGuard[dict[str, Any]]:
    """True if ``value`` is an encrypted-secret envelope, exactly: a dict with the members
    ``$enc`` (an int; a newer version is refused when read), ``kid`` (8 hex digits), ``n``
    and ``ct`` (base64 of the nonce and ciphertext) and an optional 4-character ``hint``."""
    if type(value) is not dict:
        return False
    keys = value.keys()
    if keys != _ENVELOPE_KEYS and keys != _ENVELOPE_KEYS_WITH_HINT:
        return False
    kid, nonce, ciphertext, hint = value["kid"], value["n"], value["ct"], value.get("hint", "")
    return (
        type(value["$enc"]) is int
        and type(kid) is str
        and _KID_RE.fullmatch(kid) is not None
        and type(nonce) is str
        and _NONCE_RE.fullmatch(nonce) is not None
        and type(ciphertext) is str
        and len(ciphertext) >= _CIPHERTEXT_MIN
        and _CIPHERTEXT_RE.fullmatch(ciphertext) is not None
        and type(hint) is str
        and ((hint == "" and "hint" not in keys) or len(hint) == HINT_LENGTH)
    )


def _holds_envelope(value: object) -> bool:
    """Whether a list or map holds, at any depth, a mapping that carries ``$enc``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            if ENVELOPE_MARKER in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def looks_like_envelope(value: object) -> bool:
    """True for any mapping with a ``$enc`` member: an envelope, or something that would be
    mistaken for one."""
    return isinstance(value, Mapping) and ENVELOPE_MARKER in value


def _hint(value: object) -> str | None:
    if isinstance(value, str) and len(value) >= HINT_MIN_LENGTH:
        return value[-HINT_LENGTH:]
    return None


def mask_secret(value: object) -> str:
    """A display form of a secret: ``••••`` plus the last 4 characters of a string of at
    least 12, ``••••`` alone for anything else; envelopes show their stored hint."""
    if is_envelope(value):
        hint = value.get("hint")
        if isinstance(hint, str) and 0 < len(hint) <= HINT_LENGTH:
            return MASK + hint
        return MASK
    hint = _hint(value)
    return MASK if hint is None else MASK + hint


def _mask_or_none(value: object) -> str | None:
    return None if value is None else mask_secret(value)


def mask_data(data: Mapping[str, Any], secret_fields: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``data`` safe to show: secret fields, every value under ``credentials``
    and every envelope masked. Works on plaintext and on sealed data."""
    fields = SECRET_FIELDS.union(secret_fields)
    masked: dict[str, Any] = {}
    for key, value in data.items():
        if key == CREDENTIALS and isinstance(value, Mapping) and not is_envelope(value):
            masked[key] = {k: _mask_or_none(v) for k, v in value.items()}
        elif key in fields or key == CREDENTIALS or is_envelope(value):
            masked[key] = _mask_or_none(value)
        else:
            masked[key] = value
    return masked


def _row_id(row_uuid: object) -> str:
    # Canonical form, so "ABC…", "abc…" and uuid.UUID("abc…") bind the same row.
    if isinstance(row_uuid, uuid.UUID):
        return str(row_uuid)
    if not isinstance(row_uuid, str):
        raise TypeError(f"row_uuid must be a string, not {type(row_uuid).__name__}")
    if type(row_uuid) is str and _CANONICAL_UUID_RE.fullmatch(row_uuid) is not None:
        return row_uuid
    if not row_uuid:
        raise ValueError("row_uuid must not be empty")
    try:
        return str(uuid.UUID(row_uuid))
    except ValueError:
        return row_uuid


def _associated_data(kid: str, row: str, field: str, hint: str | None) -> bytes:
    # JSON array: unambiguous whatever characters the row id or field name hold. The
    # bytes are those of json.dumps (default separators, ASCII escapes); the common case
    # of strings it leaves alone is formatted directly.
    # The pattern is a repeated character class: the parts are all plain exactly when
    # their concatenation is, so one match checks them all.
    if _PLAIN_JSON_RE.fullmatch(f"{kid}{row}{field}{hint or ''}") is not None:
        last = "null" if hint is None else f'"{hint}"'
        return f'[{ENVELOPE_VERSION}, "{kid}", "{row}", "{field}", {last}]'.encode("ascii")
    return json.dumps([ENVELOPE_VERSION, kid, row, field, hint]).encode()


def _not_an_envelope(field: str) -> DecryptionFailed:
    # Never echo the value: it may be a secret stored in plain text.
    return DecryptionFailed(
        f"secret field {field!r} does not hold an exact encrypted envelope (edited, or "
        'stored in plain text while encryption was "off": rotate_keys() encrypts those)',
        field=field,
    )


def _raise(exc: Exception) -> Any:
    raise exc


class Vault:
    """Seals and unseals the secret fields of a connection's data.

    ``encryption="on"`` (the default) encrypts with the keyring's primary key and refuses
    to store a secret without a keyring; ``"off"`` stores secrets as plain text, still
    decrypting existing envelopes when a keyring is given.
    """

    __slots__ = ("_encryption", "_keyring", "_warned", "pending")

    def __init__(self, keyring: Keyring | None, *, encryption: str = "on") -> None:
        if encryption not in ("on", "off"):
            raise ValueError(f'encryption must be "on" or "off", not {encryption!r}')
        if keyring is not None and not isinstance(keyring, Keyring):
            raise TypeError(f"keyring must be a Keyring, not {type(keyring).__name__}")
        self._keyring = keyring
        self._encryption = encryption
        self._warned = False
        #: Key sources still to be loaded once the database is open (see ``install``).
        self.pending: Any = None

    def install(self, keyring: Keyring) -> None:
        """Set the keyring once its sources are loaded (at ``open()``)."""
        self._keyring = keyring

    def __repr__(self) -> str:
        return f"Vault(keyring={self._keyring!r}, encryption={self._encryption!r})"

    @property
    def enabled(self) -> bool:
        """True when secrets are encrypted on write (``encryption="on"``)."""
        return self._encryption == "on"

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    def _map(
        self,
        data: Mapping[str, Any],
        secret_fields: Iterable[str],
        secret: Callable[[str, Any], Any],
        envelope: Callable[[str, Any], Any],
        malformed: Callable[[str, Any], Any],
    ) -> dict[str, Any]:
        """A copy of ``data`` with ``secret(field, value)`` applied to plaintext secrets,
        ``envelope(field, value)`` to envelopes and ``malformed(field, value)`` to mappings
        that carry ``$enc`` without being an envelope; None and other values are copied."""
        fields = SECRET_FIELDS.union(secret_fields)

        def one(field: str, value: Any, is_secret: bool) -> Any:
            if value is None:
                return None
            if type(value) in _SCALARS:
                return secret(field, value) if is_secret else value
            if is_envelope(value):
                return envelope(field, value)
            if looks_like_envelope(value):
                return malformed(field, value)
            return secret(field, value) if is_secret else value

        out: dict[str, Any] = {}
        for key, value in data.items():
            if key == CREDENTIALS and isinstance(value, Mapping) and not looks_like_envelope(value):
                out[key] = {k: one(f"{CREDENTIALS}.{k}", v, True) for k, v in value.items()}
            else:
                out[key] = one(key, value, key in fields or key == CREDENTIALS)
        return out

    def seal(
        self, row_uuid: str, data: Mapping[str, Any], secret_fields: Iterable[str] = ()
    ) -> dict[str, Any]:
        """A copy of caller-supplied ``data`` with every secret field and every value under
        ``credentials`` encrypted; None stays None. A value shaped like an envelope (a
        mapping with a ``$enc`` member) is refused with InvalidAttrs: only this class makes
        envelopes."""
        row = _row_id(row_uuid)

        def refuse(field: str, value: Any) -> Any:
            raise InvalidAttrs(
                f"Setup field {field!r} holds a mapping with a {ENVELOPE_MARKER!r} member, "
                "which is reserved for encrypted values.",
                field=field,
            )

        return self._map(
            data,
            secret_fields,
            secret=lambda field, value: self.seal_value(row, field, value),
            envelope=refuse,
            malformed=refuse,
        )

    def unseal(
        self, row_uuid: str, data: Mapping[str, Any], secret_fields: Iterable[str] = ()
    ) -> dict[str, Any]:
        """A plaintext copy of stored ``data``: every envelope decrypted, whatever its field.

        Raises UnknownKey when an envelope's key id is not in the keyring, and
        DecryptionFailed when an envelope was tampered with or moved, when a mapping carries
        ``$enc`` without being an exact envelope, and, while encryption is on, when a secret
        field (those of :data:`SECRET_FIELDS`, ``secret_fields`` and every value under
        ``credentials``) holds anything but an envelope or None: plaintext where an envelope
        belongs is never returned.
        """
        row = _row_id(row_uuid)
        strict = self._encryption == "on"
        # The same walk as _map, written out: this runs on every credentials read.
        extra = secret_fields if type(secret_fields) is frozenset else frozenset(secret_fields)
        out: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:
                out[key] = None
            elif type(value) in _SCALARS:
                if strict and (key in SECRET_FIELDS or key in extra or key == CREDENTIALS):
                    raise _not_an_envelope(key)
                out[key] = value
            elif key == CREDENTIALS and isinstance(value, Mapping) and ENVELOPE_MARKER not in value:
                out[key] = {
                    k: self._unseal_one(row, f"{CREDENTIALS}.{k}", v, True, strict)
                    for k, v in value.items()
                }
            else:
                is_secret = key in SECRET_FIELDS or key in extra or key == CREDENTIALS
                out[key] = self._unseal_one(row, key, value, is_secret, strict)
        return out

    def _unseal_one(self, row: str, field: str, value: Any, is_secret: bool, strict: bool) -> Any:
        """One value of :meth:`unseal`, as ``_map``'s ``one`` treats it."""
        if value is None:
            return None
        if type(value) in _SCALARS:
            if is_secret and strict:
                raise _not_an_envelope(field)
            return value
        if is_envelope(value):
            return self._open(row, field, value)
        if looks_like_envelope(value) or (is_secret and strict):
            raise _not_an_envelope(field)
        return value

    def seal_value(self, row_uuid: str, field: str, value: Any) -> Any:
        """One secret value as an envelope bound to the row and field (None stays None).

        Whatever the value, even one shaped like an envelope, it is encrypted as a value.
        """
        if value is None:
            return value
        if self._encryption == "off":
            if not self._warned:
                self._warned = True
                logger.warning(
                    'encryption="off": secrets are stored in plain text; pass keys= or set '
                    "%s to encrypt them",
                    ENV_KEYS,
                    extra=telemetry.fields("plaintext_storage", uuid=row_uuid),
                )
            return value
        if self._keyring is None:
            raise EncryptionNotConfigured()
        return self._encrypt(self._keyring, _row_id(row_uuid), field, value)

    def _encrypt(self, keyring: Keyring, row: str, field: str, value: Any) -> dict[str, Any]:
        try:
            plaintext = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"secret field {field!r} holds a {type(value).__name__}, which is not a JSON value"
            ) from exc
        kid = keyring.primary_id
        cipher = keyring._cipher(kid)
        assert cipher is not None
        hint = _hint(value)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = cipher.encrypt(nonce, plaintext, _associated_data(kid, row, field, hint))
        envelope: dict[str, Any] = {
            "$enc": ENVELOPE_VERSION,
            "kid": kid,
            "n": base64.b64encode(nonce).decode("ascii"),
            "ct": base64.b64encode(ciphertext).decode("ascii"),
        }
        if hint is not None:
            envelope["hint"] = hint
        return envelope

    def unseal_value(self, row_uuid: str, field: str, value: Any) -> Any:
        """The plaintext of one envelope. None stays None; a mapping with ``$enc`` that is
        not an exact envelope raises DecryptionFailed, and so does any other value while
        encryption is on (this is for fields that hold a secret)."""
        if value is None:
            return None
        if is_envelope(value):
            return self._open(_row_id(row_uuid), field, value)
        if self.enabled or looks_like_envelope(value):
            raise _not_an_envelope(field)
        return value

    def _open(self, row: str, field: str, value: dict[str, Any]) -> Any:
        # ``row`` is canonical and ``value`` an exact envelope: both checked by the caller.
        kid: str = value["kid"]
        if value["$enc"] != ENVELOPE_VERSION:
            raise DecryptionFailed(
                f"secret field {field!r} uses envelope version {value['$enc']!r}, "
                "which this version of the library cannot read",
                field=field,
            )
        cipher = None if self._keyring is None else self._keyring._cipher(kid)
        if cipher is None:
            ring = "no keys are configured" if self._keyring is None else "it is not in the keyring"
            raise UnknownKey(
                f"secret field {field!r} of connection {row} was encrypted with key {kid!r}, "
                f"but {ring}: add that key to keys= or INTEGRATIONS_KEYS (after the primary), "
                "or save the secret again",
                kid=kid,
                field=field,
            )
        try:
            # Both are checked standard base64 (is_envelope): decoded as b64decode would.
            nonce = binascii.a2b_base64(value["n"])
            ciphertext = binascii.a2b_base64(value["ct"])
            ad = _associated_data(kid, row, field, value.get("hint"))
            # Authenticated, so the bytes are the UTF-8 that _encrypt wrote.
            return _decode_json(cipher.decrypt(nonce, ciphertext, ad).decode())
        except (InvalidTag, binascii.Error, ValueError):
            pass
        raise DecryptionFailed(
            f"secret field {field!r} could not be decrypted with key {kid!r} "
            "(tampered with, or moved from another row or field)",
            kid=kid,
            field=field,
        )

    def needs_rotation(self, data: Mapping[str, Any], secret_fields: Iterable[str] = ()) -> bool:
        """True if :meth:`reseal` would change ``data``: an envelope not under the primary
        key, or a plaintext secret while encryption is on."""
        primary = None if self._keyring is None else self._keyring.primary_id
        found = False

        def envelope(field: str, value: Any) -> Any:
            nonlocal found
            found = found or value["kid"] != primary
            return value

        def secret(field: str, value: Any) -> Any:
            nonlocal found
            found = found or self.enabled
            return value

        def malformed(field: str, value: Any) -> Any:
            # reseal() refuses it; rotation has to see it to report it.
            nonlocal found
            found = True
            return value

        self._map(data, secret_fields, secret=secret, envelope=envelope, malformed=malformed)
        return found

    def reseal(
        self, row_uuid: str, data: Mapping[str, Any], secret_fields: Iterable[str] = ()
    ) -> dict[str, Any]:
        """A copy of ``data`` with every envelope under the primary key: others are
        re-encrypted, plaintext secrets sealed; envelopes already under it are untouched.
        A mapping carrying ``$enc`` that is not an exact envelope raises DecryptionFailed."""
        row = _row_id(row_uuid)
        keyring = self._keyring

        def envelope(field: str, value: Any) -> Any:
            if keyring is not None and value["kid"] == keyring.primary_id:
                return value
            # Raises UnknownKey for a key id not in the ring, so nothing is ever dropped.
            plaintext = self._open(row, field, value)
            assert keyring is not None
            return self._encrypt(keyring, row, field, plaintext)

        def plaintext(field: str, value: Any) -> Any:
            if _holds_envelope(value):
                # An envelope inside a list or map was put there by hand: sealing it as a
                # value would make it readable as data.
                _raise(_not_an_envelope(field))
            return self.seal_value(row, field, value)

        return self._map(
            data,
            secret_fields,
            secret=plaintext,
            envelope=envelope,
            malformed=lambda field, value: _raise(_not_an_envelope(field)),
        )
