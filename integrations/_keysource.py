"""Where encryption keys come from: key strings, env:, file:, command:, aws-kms: and pkcs11:."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import secrets
import shlex
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

from ._errors import ConfigurationError
from ._vault import KEY_BYTES, KEY_FORMAT, Keyring, _key_id, _parse_key

__all__ = [
    "CALLS",
    "Custody",
    "DataKeyStore",
    "KeySource",
    "WrappingSource",
    "load_keyring",
    "parse_sources",
]

#: Calls made to each kind of outside key holder (a KMS request, an HSM operation, a command
#: run), counted for the benchmarks and the tests that show the hot path never calls out.
CALLS: collections.Counter[str] = collections.Counter()

COMMAND_TIMEOUT = 30.0
_STDERR_SHOWN = 300
_KEY_TEXT = re.compile(r"ik1:[0-9A-Za-z_:=-]+")
# The data keys of a KMS are bound to this use: a blob lifted into another decrypt call fails.
_KMS_CONTEXT = {"purpose": "integrations data key"}
_IV_BYTES = 16


class DataKeyStore(Protocol):
    """Wrapped data keys kept in the database, by the identity of what wrapped them."""

    async def data_keys(self, wrapper: str) -> list[tuple[str, bytes]]: ...

    async def create_data_key(
        self, wrapper: str, make: Callable[[], Awaitable[tuple[str, bytes]]]
    ) -> list[tuple[str, bytes]]: ...

    async def all_data_keys(self) -> list[tuple[str, str]]: ...

    async def put_data_key(self, kid: str, wrapper: str, wrapped: bytes) -> None: ...


class KeySource:
    """One entry of the key setting: yields ``(key id, material)`` pairs, primary first."""

    kind = "key"
    #: Safe to show: names the source, never a key or a PIN.
    label = "a key string"

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def fail(self, what: str) -> ConfigurationError:
        return ConfigurationError(f"key source {self.label}: {what}")


def _keys_in(text: str, source: KeySource) -> list[tuple[str, bytes]]:
    parts = [p.strip() for p in re.split(r"[,\s]+", text) if p.strip()]
    if not parts:
        raise source.fail("it holds no key; expected " + KEY_FORMAT)
    found = []
    for position, part in enumerate(parts, start=1):
        try:
            found.append(_parse_key(part, position))
        except ConfigurationError as exc:
            raise source.fail(exc.message) from None
    return found


@dataclass(slots=True)
class _Literal(KeySource):
    text: str
    position: int

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        return [_parse_key(self.text, self.position)]


class _Env(KeySource):
    kind = "env"

    def __init__(self, name: str) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigurationError(
                f"key source env:{name[:40]!r} names no environment variable; write env:NAME"
            )
        self.name = name
        self.label = f"env:{name}"

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        value = os.environ.get(self.name, "")
        if not value.strip():
            raise self.fail(f"the environment variable {self.name} is not set or empty")
        return _keys_in(value, self)


class _File(KeySource):
    kind = "file"

    def __init__(self, path: str) -> None:
        if not path:
            raise ConfigurationError("key source file: names no file; write file:/path/to/keys")
        self.path = Path(path).expanduser()
        self.label = f"file:{path}"

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        from ._embedded import _check_key_file

        try:
            _check_key_file(self.path, os.lstat(self.path))
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise self.fail(f"cannot be read ({exc.strerror})") from None
        except ConfigurationError as exc:
            raise self.fail(exc.message) from None
        return _keys_in(text, self)


class _Command(KeySource):
    kind = "command"

    def __init__(self, command: str) -> None:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigurationError(f"key source command:{command}: {exc}") from None
        if not argv:
            raise ConfigurationError("key source command: names no command")
        self.argv = argv
        self.label = f"command:{command}"

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        CALLS[self.kind] += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise self.fail(f"could not run {self.argv[0]!r} ({exc.strerror})") from None
        try:
            out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise self.fail(f"did not finish within {COMMAND_TIMEOUT:g} s") from None
        # Standard output is the key and never shown; standard error may name the fault,
        # with anything shaped like a key cut out.
        said = _KEY_TEXT.sub("ik1:…", err.decode("utf-8", "replace")).strip()
        if len(said) > _STDERR_SHOWN:
            said = "…" + said[-_STDERR_SHOWN:]
        if process.returncode != 0:
            tail = f": {said}" if said else " and printed nothing on standard error"
            raise self.fail(f"exited with status {process.returncode}{tail}")
        try:
            text = out.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("printed something that is not text on standard output") from None
        return _keys_in(text, self)


class WrappingSource(KeySource):
    """A key-encryption key held elsewhere (a KMS, an HSM): the data keys it wraps are kept
    in the database next to their key id and unwrapped once, at ``open()``."""

    #: What the stored data keys name as their wrapper: ``kind:<the key>``, no secrets.
    async def identity(self) -> str:
        raise NotImplementedError

    async def wrap(self, material: bytes) -> bytes:
        raise NotImplementedError

    async def unwrap(self, wrapped: bytes) -> bytes:
        raise NotImplementedError

    async def generate(self) -> tuple[bytes, bytes]:
        """A new data key: its material and its wrapped form."""
        material = secrets.token_bytes(KEY_BYTES)
        return material, await self.wrap(material)

    async def keys(self, store: DataKeyStore | None, *, primary: bool) -> list[tuple[str, bytes]]:
        if store is None:
            raise self.fail("needs the database to keep its data keys")
        ident = await self.identity()
        stored = await store.data_keys(ident)
        if not stored and primary:

            async def make() -> tuple[str, bytes]:
                material, wrapped = await self.generate()
                return _key_id(material), wrapped

            stored = await store.create_data_key(ident, make)
        found = []
        for kid, wrapped in stored:
            material = await self.unwrap(wrapped)
            if len(material) != KEY_BYTES or _key_id(material) != kid:
                raise self.fail(f"the data key {kid} does not unwrap to the key it names")
            found.append((kid, material))
        return found


def _query(text: str) -> tuple[str, dict[str, str]]:
    body, _, query = text.partition("?")
    return body, dict(parse_qsl(query, keep_blank_values=True))


class _AwsKms(WrappingSource):
    kind = "aws-kms"

    def __init__(self, value: str) -> None:
        key, options = _query(value)
        if not key:
            raise ConfigurationError(
                "key source aws-kms: names no key; write aws-kms:<key id, ARN or alias/NAME>"
            )
        unknown = sorted(set(options) - {"region", "endpoint", "profile"})
        if unknown:
            raise ConfigurationError(
                f"key source aws-kms:{key}: unknown option {unknown[0]!r}; "
                "known: region, endpoint, profile"
            )
        self.key = key
        self.region = options.get("region") or None
        self.endpoint = options.get("endpoint") or None
        self.profile = options.get("profile") or None
        where = f" at {self.endpoint}" if self.endpoint else ""
        self.label = f"aws-kms:{key}{where}"
        self._client: Any = None
        self._arn: str | None = None

    def _kms(self) -> Any:
        if self._client is None:
            try:
                import botocore.config
                import botocore.session
            except ImportError:
                raise self.fail("needs botocore: pip install 'integrations[kms]'") from None
            session = botocore.session.Session(profile=self.profile)
            region = self.region
            if region is None and self.key.startswith("arn:"):
                region = self.key.split(":")[3] or None
            config = botocore.config.Config(
                connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}
            )
            self._client = session.create_client(
                "kms", region_name=region, endpoint_url=self.endpoint, config=config
            )
        return self._client

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            CALLS[self.kind] += 1
            result: dict[str, Any] = getattr(self._kms(), operation)(**kwargs)
            return result

        try:
            return await asyncio.to_thread(call)
        except ConfigurationError:
            raise
        except Exception as exc:
            # botocore's messages name the operation and the service's error code; they
            # never carry key material.
            raise self.fail(f"{type(exc).__name__}: {exc}") from None

    async def identity(self) -> str:
        if self._arn is None:
            answer = await self._call("describe_key", KeyId=self.key)
            self._arn = str(answer["KeyMetadata"]["Arn"])
        return f"aws-kms:{self._arn}"

    async def generate(self) -> tuple[bytes, bytes]:
        await self.identity()
        answer = await self._call(
            "generate_data_key", KeyId=self._arn, KeySpec="AES_256", EncryptionContext=_KMS_CONTEXT
        )
        return bytes(answer["Plaintext"]), bytes(answer["CiphertextBlob"])

    async def wrap(self, material: bytes) -> bytes:
        await self.identity()
        answer = await self._call(
            "encrypt", KeyId=self._arn, Plaintext=material, EncryptionContext=_KMS_CONTEXT
        )
        return bytes(answer["CiphertextBlob"])

    async def unwrap(self, wrapped: bytes) -> bytes:
        await self.identity()
        answer = await self._call(
            "decrypt", CiphertextBlob=wrapped, KeyId=self._arn, EncryptionContext=_KMS_CONTEXT
        )
        return bytes(answer["Plaintext"])


_PKCS11_LIBS: dict[str, Any] = {}


class _Pkcs11(WrappingSource):
    kind = "pkcs11"

    def __init__(self, value: str) -> None:
        path, options = _query(value)
        attrs = {}
        for part in path.split(";"):
            if part:
                name, _, attr = part.partition("=")
                attrs[name] = unquote(attr)
        token, label = attrs.get("token"), attrs.get("object")
        if not token or not label:
            raise ConfigurationError(
                "key source pkcs11: needs the token and the key's label: write "
                "pkcs11:token=<token label>;object=<key label>?module-path=<library>"
            )
        unknown = sorted(set(options) - {"module-path", "pin-value", "pin-source"})
        if unknown:
            raise ConfigurationError(
                f"key source pkcs11:token={token};object={label}: unknown option "
                f"{unknown[0]!r}; known: module-path, pin-value, pin-source"
            )
        self.token = token
        self.object = label
        self.module = options.get("module-path") or os.environ.get("INTEGRATIONS_PKCS11_MODULE")
        self._pin_value = options.get("pin-value")
        self._pin_source = options.get("pin-source")
        self.label = f"pkcs11:token={token};object={label}"

    def _pin(self) -> str | None:
        if self._pin_value is not None:
            return self._pin_value
        if self._pin_source is not None:
            source = self._pin_source.removeprefix("file:")
            try:
                return Path(source).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise self.fail(f"the PIN file cannot be read ({exc.strerror})") from None
        return os.environ.get("INTEGRATIONS_PKCS11_PIN")

    def _run(self, work: Callable[[Any, Any], bytes]) -> bytes:
        try:
            import pkcs11
            from pkcs11 import KeyType, ObjectClass
        except ImportError:
            raise self.fail("needs python-pkcs11: pip install 'integrations[pkcs11]'") from None
        if not self.module:
            raise self.fail(
                "names no PKCS#11 library: add ?module-path=/path/to/library.so or set "
                "INTEGRATIONS_PKCS11_MODULE"
            )
        pin = self._pin()
        try:
            lib = _PKCS11_LIBS.get(self.module)
            if lib is None:
                lib = _PKCS11_LIBS[self.module] = pkcs11.lib(self.module)
            token = lib.get_token(token_label=self.token)
            with token.open(user_pin=pin) as session:
                key = session.get_key(
                    object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, label=self.object
                )
                CALLS[self.kind] += 1
                return work(key, pkcs11.Mechanism.AES_CBC_PAD)
        except ConfigurationError:
            raise
        except Exception as exc:
            # The library's exception names say what went wrong (NoSuchToken, PinIncorrect,
            # NoSuchKey); the PIN is never part of them.
            reason = type(exc).__name__
            detail = str(exc)
            raise self.fail(f"{reason}{': ' + detail if detail else ''}") from None

    async def identity(self) -> str:
        return self.label

    async def wrap(self, material: bytes) -> bytes:
        iv = secrets.token_bytes(_IV_BYTES)

        def work(key: Any, mechanism: Any) -> bytes:
            return bytes(key.encrypt(material, mechanism=mechanism, mechanism_param=iv))

        # CBC alone does not authenticate: the key id, a hash of the material, is checked
        # after every unwrap.
        return iv + await asyncio.to_thread(self._run, work)

    async def unwrap(self, wrapped: bytes) -> bytes:
        iv, body = wrapped[:_IV_BYTES], wrapped[_IV_BYTES:]

        def work(key: Any, mechanism: Any) -> bytes:
            return bytes(key.decrypt(body, mechanism=mechanism, mechanism_param=iv))

        return await asyncio.to_thread(self._run, work)


_KINDS: dict[str, Callable[[str], KeySource]] = {
    "env": _Env,
    "file": _File,
    "command": _Command,
    "aws-kms": _AwsKms,
    "pkcs11": _Pkcs11,
}
_SOURCE = re.compile(r"(env|file|command|aws-kms|pkcs11):")


def _items(keys: str | Sequence[str]) -> Iterable[str]:
    values: Iterable[object] = [keys] if isinstance(keys, str) else keys
    for value in values:
        if not isinstance(value, str):
            raise ConfigurationError(f"encryption keys must be strings, not {type(value).__name__}")
        rest = value
        while rest:
            stripped = rest.lstrip(" \t\r\n,")
            if stripped.startswith("command:"):
                # A command's own commas belong to it: it runs to the end of the value.
                yield stripped.strip()
                break
            item, _, rest = stripped.partition(",")
            if item.strip():
                yield item.strip()


def parse_sources(keys: str | Sequence[str]) -> list[KeySource]:
    """The sources of a ``keys=`` / ``INTEGRATIONS_KEYS`` value, primary first; a malformed
    entry is a ConfigurationError (naming a plain key only by its position)."""
    if not isinstance(keys, str | Sequence):
        raise ConfigurationError(
            f"keys must be a string or a sequence of strings, not {type(keys).__name__}; "
            "generate a key with integrations.generate_key()"
        )
    sources: list[KeySource] = []
    for position, item in enumerate(_items(keys), start=1):
        match = _SOURCE.match(item)
        if match is None:
            _parse_key(item, position)
            sources.append(_Literal(item, position))
        else:
            sources.append(_KINDS[match.group(1)](item[match.end() :]))
    if not sources:
        raise ConfigurationError(
            "keys= (or INTEGRATIONS_KEYS) holds no encryption key; generate one with "
            "integrations.generate_key()."
        )
    return sources


@dataclass(slots=True)
class Custody:
    """The sources the keyring came from and the data keys they unwrapped, for re-wrapping
    under the primary source and adding a new data key."""

    sources: list[KeySource]
    materials: dict[str, bytes] = field(default_factory=dict)

    @property
    def needs_store(self) -> bool:
        return any(isinstance(s, WrappingSource) for s in self.sources)

    def _primary_wrapper(self) -> WrappingSource | None:
        first = self.sources[0]
        return first if isinstance(first, WrappingSource) else None

    async def rewrap(self, store: DataKeyStore) -> int:
        """Data keys wrapped by another source than the primary's, wrapped again by it."""
        primary = self._primary_wrapper()
        if primary is None:
            return 0
        ident = await primary.identity()
        moved = 0
        for kid, wrapper in await store.all_data_keys():
            material = self.materials.get(kid)
            if wrapper != ident and material is not None:
                await store.put_data_key(kid, ident, await primary.wrap(material))
                moved += 1
        return moved

    async def new_data_key(self, store: DataKeyStore) -> str:
        """A new data key wrapped by the primary source; processes opened from now on
        encrypt with it. Returns its key id."""
        primary = self._primary_wrapper()
        if primary is None:
            raise ConfigurationError(
                "a new data key needs an aws-kms: or pkcs11: source first in the keys; "
                "with plain keys, generate one with integrations.generate_key()"
            )
        material, wrapped = await primary.generate()
        kid = _key_id(material)
        await store.put_data_key(kid, await primary.identity(), wrapped)
        self.materials[kid] = material
        return kid


async def load_keyring(sources: list[KeySource], store: DataKeyStore | None) -> Keyring:
    """Every source's keys in order, the first source's first key as the primary. Returns
    a keyring whose ``custody`` remembers the sources."""
    found: list[tuple[str, bytes]] = []
    custody = Custody(sources)
    for index, source in enumerate(sources):
        keys = await source.keys(store, primary=index == 0)
        if isinstance(source, WrappingSource):
            custody.materials.update(keys)
        found.extend(keys)
    seen: dict[str, bytes] = {}
    for kid, material in found:
        if not secrets.compare_digest(seen.setdefault(kid, material), material):
            raise ConfigurationError(f"two different encryption keys share the id {kid!r}")
    keyring = Keyring(found)
    keyring.custody = custody
    return keyring
