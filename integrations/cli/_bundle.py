"""Export bundles: the plaintext document, and its passphrase-sealed form (scrypt + AES-GCM)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .. import _record as record

FORMAT = "integrations-export"
SEALED_FORMAT = "integrations-export-sealed"
VERSION = 1
# scrypt at n=2**15, r=8 takes 32 MiB and a fraction of a second: cheap once, costly
# for a guesser.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
# What an import accepts: export's parameters with a margin of one doubling of the cost,
# so a file cannot make the derivation take gigabytes and seconds before the passphrase
# is even checked (128 * n * r bytes: at most 64 MiB).
SCRYPT_MAX_N = 2 * SCRYPT_N
SCRYPT_MAX_R = SCRYPT_R
SCRYPT_MAX_P = 2
#: The largest bundle read, and the deepest nesting of its JSON.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
_AAD = b"integrations-export-sealed-v1"

# Written by the library itself (status, checks, token metadata); an import recomputes them.
LIBRARY_FIELDS = record.LIBRARY_FIELDS
# What an import hands to ``import_tokens``.
TOKEN_FIELDS = frozenset({"access_token", "refresh_token", "expires_at", "token_type"})


class BundleError(Exception):
    """An export file that cannot be read: message safe to show (never a secret)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One connection of a bundle, split the way an import writes it."""

    provider: str
    name: str
    owner: str | None
    setup: dict[str, Any]
    tokens: dict[str, Any]
    uuid: str | None = None
    #: The status and the last check's message where the connection was exported: an
    #: import keeps them (a failing connection does not arrive ``connected``).
    status: str | None = None
    validation: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.provider}:{self.name}"


def split_data(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(setup, tokens) of a connection's decrypted data; library bookkeeping dropped."""
    setup = {
        k: v
        for k, v in data.items()
        if k not in LIBRARY_FIELDS and k not in TOKEN_FIELDS and v is not None
    }
    tokens = {k: data[k] for k in TOKEN_FIELDS if data.get(k) is not None}
    if tokens and data.get("granted_scopes"):
        tokens["scope"] = list(data["granted_scopes"])
    if "access_token" not in tokens:
        # A refresh token alone cannot be imported as a grant; keep the setup only.
        tokens = {}
    return setup, tokens


def document(connections: list[dict[str, Any]], exported_at: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": exported_at,
        "connections": connections,
    }


def _key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal(doc: Mapping[str, Any], passphrase: str) -> dict[str, Any]:
    """The document encrypted under a key derived from ``passphrase``."""
    salt = os.urandom(16)
    nonce = os.urandom(12)
    key = _key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    plaintext = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    return {
        "format": SEALED_FORMAT,
        "version": VERSION,
        "kdf": {"name": "scrypt", "salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "cipher": "AES-256-GCM",
        "nonce": _b64(nonce),
        "ciphertext": _b64(AESGCM(key).encrypt(nonce, plaintext, _AAD)),
    }


def is_sealed(raw: Mapping[str, Any]) -> bool:
    return raw.get("format") == SEALED_FORMAT


def unseal(raw: Mapping[str, Any], passphrase: str) -> dict[str, Any]:
    """Decrypt a sealed bundle; BundleError for a wrong passphrase or a damaged file."""
    try:
        kdf = raw["kdf"]
        if kdf.get("name") != "scrypt" or raw.get("cipher") != "AES-256-GCM":
            raise BundleError("unsupported encryption in the export file")
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        if not (2**10 <= n <= SCRYPT_MAX_N and 1 <= r <= SCRYPT_MAX_R and 1 <= p <= SCRYPT_MAX_P):
            raise BundleError(
                "the export file asks for key derivation parameters beyond what export "
                f"writes (scrypt n <= {SCRYPT_MAX_N}, r <= {SCRYPT_MAX_R}, p <= "
                f"{SCRYPT_MAX_P}); it was not made by this tool"
            )
        key = _key(passphrase, base64.b64decode(kdf["salt"]), n, r, p)
        nonce = base64.b64decode(raw["nonce"])
        ciphertext = base64.b64decode(raw["ciphertext"])
    except (KeyError, TypeError, ValueError, AttributeError, MemoryError):
        # MemoryError: parameters within the bounds that scrypt refuses (n >= 2**(16 * r)).
        raise BundleError("the export file is damaged (missing or malformed fields)") from None
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, _AAD)
    except (InvalidTag, ValueError):
        raise BundleError("wrong passphrase, or the export file was altered") from None
    return load_document(plaintext.decode("utf-8"))


def _too_deep(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects deeper than ``limit`` (strings
    skipped), found without parsing it, which recurses once per level."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def load_document(text: str) -> dict[str, Any]:
    """The bundle's JSON object; BundleError when it is too big, too deep or not JSON."""
    if len(text) > MAX_BUNDLE_BYTES:
        raise BundleError(f"the export file is larger than {MAX_BUNDLE_BYTES // 2**20} MiB")
    if _too_deep(text, MAX_DEPTH):
        raise BundleError(f"the export file nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise BundleError("the export file is not JSON") from None
    if not isinstance(doc, dict):
        raise BundleError("the export file is not an export bundle")
    return doc


def entries(doc: Mapping[str, Any]) -> list[Entry]:
    """The connections of a plaintext bundle; BundleError naming the first bad one."""
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise BundleError(f"not an {FORMAT} version {VERSION} file")
    items = doc.get("connections")
    if not isinstance(items, list):
        raise BundleError("the export file has no connections list")
    found: list[Entry] = []
    for index, item in enumerate(items):
        where = f"connection #{index + 1}"
        if not isinstance(item, dict):
            raise BundleError(f"{where} is not an object")
        provider, name, owner = item.get("provider"), item.get("name"), item.get("owner")
        data = item.get("data")
        if not isinstance(provider, str) or not isinstance(name, str):
            raise BundleError(f"{where}: provider and name must be strings")
        if owner is not None and not isinstance(owner, str):
            raise BundleError(f"{where}: owner must be a string or null")
        if not isinstance(data, dict):
            raise BundleError(f"{where}: data must be an object")
        setup, tokens = split_data(data)
        uuid = item.get("uuid") if isinstance(item.get("uuid"), str) else None
        status = data.get("status") if isinstance(data.get("status"), str) else None
        validation = data.get("validation_status")
        found.append(
            Entry(
                provider,
                name,
                owner,
                setup,
                tokens,
                uuid,
                status,
                validation if isinstance(validation, str) else None,
            )
        )
    return found
