"""Converting provider files written for other tools into this package's format: Nango's
``providers.yaml`` (an application's own file; no catalogue data ships with the package)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from ._names import PROVIDER_KEY_RE
from ._provider_file import entry_of
from ._providers import Provider

__all__ = ["Conversion", "convert_nango"]

# A strict host name, for a field that is a whole host and declares no pattern.
_HOST_PATTERN = (
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
# One DNS label, for a field that is part of a host and declares no pattern.
_LABEL_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLACEHOLDER = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}")
_SUPPORTED = ("OAUTH2", "OAUTH2_CC", "OAUTH1", "API_KEY", "BASIC", "JWT")
# Signing algorithms the jwt_bearer scheme uses (by the key's type): RSA and EC keys.
_JWT_ALGORITHMS = re.compile(r"(RS|ES|PS)(256|384|512)")
_UNSUPPORTED = {
    "TWOSTEP": "two-step token exchanges are not an auth scheme here",
    "SIGNATURE": "request signatures are not an auth scheme here",
}


class _Skip(Exception):
    """This entry can't be converted; the message says why."""


@dataclass
class Conversion:
    """What a conversion gives: the converted entries (as file entries), and the keys left
    out with the reason for each."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [str(entry["key"]) for entry in self.entries]


def convert_nango(doc: Any) -> Conversion:
    """Convert a parsed Nango ``providers.yaml`` (a mapping of key to entry)."""
    result = Conversion()
    if not isinstance(doc, Mapping):
        result.skipped.append(("(file)", "a providers.yaml maps provider keys to entries"))
        return result
    for raw_key, raw in doc.items():
        key = str(raw_key)
        try:
            entry = _convert_one(key, _with_alias(key, raw, doc))
        except _Skip as why:
            result.skipped.append((key, str(why)))
            continue
        result.entries.append(entry)
    return result


def _with_alias(key: str, raw: Any, doc: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise _Skip("the entry is not a mapping")
    entry = dict(raw)
    seen = {key}
    while isinstance(entry.get("alias"), str):
        base_key = entry.pop("alias")
        base = doc.get(base_key)
        if base_key in seen or not isinstance(base, Mapping):
            raise _Skip(f"alias {base_key!r} names no other entry of the file")
        seen.add(base_key)
        merged = dict(base)
        proxy = {**dict(base.get("proxy") or {}), **dict(entry.get("proxy") or {})}
        merged.update(entry)
        if proxy:
            merged["proxy"] = proxy
        entry = merged
    return entry


def _convert_one(key: str, raw: dict[str, Any]) -> dict[str, Any]:
    if not PROVIDER_KEY_RE.fullmatch(key) or key != key.lower():
        raise _Skip("its key is not a provider key here (lowercase letters, digits, '-', '_')")
    mode = str(raw.get("auth_mode", ""))
    if mode not in _SUPPORTED:
        reason = _UNSUPPORTED.get(mode, f"auth mode {mode or '(none)'} has no equivalent here")
        raise _Skip(f"mode unsupported: {reason}")
    fields = _Fields(raw.get("connection_config"))
    found = raw.get("proxy")
    proxy: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    out: dict[str, Any] = {"key": key, "name": str(raw.get("display_name") or key)}
    if isinstance(raw.get("docs"), str) and raw["docs"].startswith("https://"):
        out["docs_url"] = raw["docs"]
    if mode in ("OAUTH2", "OAUTH2_CC"):
        out.update(_oauth(raw, mode, fields))
    elif mode == "OAUTH1":
        out.update(_oauth1(raw, fields))
    elif mode == "JWT":
        out.update(_jwt(raw, fields))
    elif mode == "API_KEY":
        out.update(_api_key(proxy, fields))
    else:
        out["auth_type"] = "key_secret"
        out["auth_header"] = {"kind": "basic", "template": "{username}:{password}"}
        fields.credential("username", "User name", secret=False)
        fields.credential("password", "Password", secret=True)
    base_url = proxy.get("base_url")
    if isinstance(base_url, str) and base_url:
        out["api_hosts"] = [_host_of(fields.template(base_url), fields, "proxy.base_url")]
    verification = proxy.get("verification")
    if isinstance(verification, Mapping):
        out["validation"] = _check(verification, base_url, fields)
    if fields.used:
        out["setup_fields"] = fields.setup_fields(out)
    try:
        provider = Provider.model_validate(out)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(entry)"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise _Skip(f"the result is not a valid provider ({where}: {message})") from None
    return entry_of(provider)


def _oauth(raw: Mapping[str, Any], mode: str, fields: _Fields) -> dict[str, Any]:
    out: dict[str, Any] = {
        "auth_type": "oauth2" if mode == "OAUTH2" else "oauth2_client_credentials"
    }
    token_url = raw.get("token_url")
    if isinstance(token_url, Mapping):
        token_url = token_url.get(mode)
    if not isinstance(token_url, str) or not token_url:
        raise _Skip("no token_url")
    out["token_url"] = fields.template(token_url)
    if mode == "OAUTH2":
        authorize = raw.get("authorization_url")
        if not isinstance(authorize, str) or not authorize:
            raise _Skip("no authorization_url")
        out["authorize_url"] = fields.template(authorize)
        params = raw.get("authorization_params")
        if isinstance(params, Mapping):
            kept = {k: str(v) for k, v in params.items() if k not in ("response_type", "scope")}
            if kept:
                out["authorize_params"] = {k: fields.template(v) for k, v in kept.items()}
        if raw.get("disable_pkce") is True:
            out["pkce"] = False
    out.update(_scopes(raw))
    if raw.get("token_request_auth_method") == "basic":
        out["token_auth"] = "client_secret_basic"
    return out


def _scopes(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    separator = raw.get("scope_separator")
    if isinstance(separator, str) and separator:
        out["scope_separator"] = separator
    scopes = raw.get("default_scopes")
    if isinstance(scopes, str):
        scopes = [s for s in re.split(r"[\s,]+", scopes) if s]
    if isinstance(scopes, list) and scopes:
        split: list[str] = []
        for scope in scopes:
            split += [s for s in re.split(r"[\s,]+", str(scope)) if s]
        out["scopes"] = split
    return out


def _jwt(raw: Mapping[str, Any], fields: _Fields) -> dict[str, Any]:
    """A JWT entry whose signed token is exchanged at a token endpoint is the RFC 7523 grant
    (``jwt_bearer``); one whose token goes to the API itself has no equivalent here."""
    token_url = raw.get("token_url")
    if isinstance(token_url, Mapping):
        token_url = token_url.get("JWT")
    if not isinstance(token_url, str) or not token_url:
        raise _Skip(
            "mode unsupported: a JWT entry without a token_url is a token the client signs "
            "and sends to the API itself; here JWTs are only exchanged at a token endpoint "
            "(jwt_bearer, RFC 7523)"
        )
    found = raw.get("token")
    token: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    headers = token.get("headers")
    algorithm = headers.get("alg") if isinstance(headers, Mapping) else None
    if algorithm is not None and not _JWT_ALGORITHMS.fullmatch(str(algorithm)):
        raise _Skip(
            f"mode unsupported: the JWT is signed with {algorithm!s}; jwt_bearer signs with "
            "an RSA or EC private key"
        )
    return {"auth_type": "jwt_bearer", "token_url": fields.template(token_url), **_scopes(raw)}


def _oauth1(raw: Mapping[str, Any], fields: _Fields) -> dict[str, Any]:
    method = raw.get("signature_method", "HMAC-SHA1")
    if method != "HMAC-SHA1":
        raise _Skip(f"mode unsupported: OAuth 1.0a signature method {method!r} (HMAC-SHA1 only)")
    urls = {
        "request_token_url": raw.get("request_url"),
        "authorize_url": raw.get("authorization_url"),
        "token_url": raw.get("token_url"),
    }
    for name, url in urls.items():
        if not isinstance(url, str) or not url:
            raise _Skip(f"OAuth 1.0a needs {name.replace('_', ' ')}")
    return {"auth_type": "oauth1", **{k: fields.template(str(v)) for k, v in urls.items()}}


def _api_key(proxy: Mapping[str, Any], fields: _Fields) -> dict[str, Any]:
    found = proxy.get("headers")
    headers: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    for name, value in headers.items():
        if isinstance(value, str) and _names_key(value):
            fields.credential("api_key", "API key", secret=True)
            # Header names are case-insensitive; the usual spelling is the default.
            header = "Authorization" if str(name).lower() == "authorization" else str(name)
            return {
                "auth_type": "api_key",
                "auth_header": {"name": header, "template": fields.template(value)},
            }
    query = proxy.get("query")
    if isinstance(query, Mapping):
        for name, value in query.items():
            if isinstance(value, str) and _names_key(value):
                fields.credential("api_key", "API key", secret=True)
                template = fields.template(value)
                return {
                    "auth_type": "api_key",
                    "auth_header": {"kind": "query", "name": str(name), "template": template},
                }
    raise _Skip("no proxy header carries the API key")


def _names_key(value: str) -> bool:
    return any(name in ("apiKey", "credentials.apiKey") for name in _PLACEHOLDER.findall(value))


def _check(verification: Mapping[str, Any], base_url: Any, fields: _Fields) -> dict[str, Any]:
    endpoints = verification.get("endpoints") or verification.get("endpoint")
    endpoint = endpoints[0] if isinstance(endpoints, list) and endpoints else endpoints
    if not isinstance(endpoint, str):
        raise _Skip("proxy.verification names no endpoint")
    base = verification.get("base_url_override") or base_url
    if not isinstance(base, str) or not base:
        raise _Skip("proxy.verification has no base URL")
    url = base.rstrip("/") + "/" + endpoint.lstrip("/")
    check: dict[str, Any] = {"url": fields.template(url)}
    method = str(verification.get("method") or "GET").upper()
    if method != "GET":
        check["method"] = method
    headers = verification.get("headers")
    if isinstance(headers, Mapping) and headers:
        check["headers"] = {str(k): fields.template(str(v)) for k, v in headers.items()}
    return check


def _host_of(url: str, fields: _Fields, where: str) -> str:
    if url.startswith("{") and "}" in url and "://" not in url.split("}", 1)[0]:
        raise _Skip(f"{where} is a whole URL taken from the connection; a host is needed")
    parts = urlsplit(url.replace("{", "\x00").replace("}", "\x01"))
    host = (parts.netloc or "").replace("\x00", "{").replace("\x01", "}")
    if not host or parts.scheme not in ("https", "http"):
        raise _Skip(f"{where} is not an absolute URL")
    for name in re.findall(r"{(\w+)}", host):
        fields.in_host(name, whole=host == f"{{{name}}}")
    return host.lower()


class _Fields:
    """The setup fields an entry needs: its connection_config fields that the converted
    entry uses, and the credentials its auth mode reads."""

    def __init__(self, config: Any) -> None:
        self.config: Mapping[str, Any] = config if isinstance(config, Mapping) else {}
        self.used: dict[str, dict[str, Any]] = {}
        self.hosts: dict[str, bool] = {}

    def template(self, text: str) -> str:
        """``${connectionConfig.x}`` → ``{x}``; ``${apiKey}`` → ``{api_key}``;
        ``${credentials.username}`` → ``{username}``."""

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in ("apiKey", "credentials.apiKey"):
                return "{api_key}"
            if name.startswith("credentials."):
                return "{" + name.split(".", 1)[1] + "}"
            if name.startswith("connectionConfig."):
                field_name = name.split(".", 1)[1]
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field_name):
                    raise _Skip(f"placeholder ${{{name}}} names no plain field")
                self.used.setdefault(field_name, {})
                return "{" + field_name + "}"
            raise _Skip(f"placeholder ${{{name}}} has no equivalent here")

        return _PLACEHOLDER.sub(replace, text)

    def credential(self, key: str, label: str, *, secret: bool) -> None:
        self.used[key] = {"label": label, "secret": secret, "credential": True}

    def in_host(self, name: str, *, whole: bool) -> None:
        self.hosts[name] = whole or self.hosts.get(name, False)

    def setup_fields(self, out: Mapping[str, Any]) -> list[dict[str, Any]]:
        made: list[dict[str, Any]] = []
        if out.get("auth_type") == "jwt_bearer":
            # The scheme's own fields (key file, issuer, private key...), which an explicit
            # list would otherwise replace.
            base = Provider.model_validate({"key": "x", "name": "x", "auth_type": "jwt_bearer"})
            made += [f.model_dump(mode="json", exclude_defaults=True) for f in base.setup_fields]
        if out.get("auth_type") in ("oauth2", "oauth2_client_credentials", "oauth1"):
            made += [
                {"key": "client_id", "label": "Client ID", "required": True},
                {
                    "key": "client_secret",
                    "label": "Client secret",
                    "required": True,
                    "secret": True,
                },
            ]
        for name, known in self.used.items():
            if known.get("credential"):
                made.append(
                    {
                        "key": name,
                        "label": known["label"],
                        "required": True,
                        "secret": known["secret"],
                    }
                )
                continue
            spec = self.config.get(name)
            spec = spec if isinstance(spec, Mapping) else {}
            made.append(self._config_field(name, spec))
        return made

    def _config_field(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        made: dict[str, Any] = {
            "key": name,
            "label": str(spec.get("title") or name.replace("_", " ").capitalize()),
            "required": not spec.get("optional", False),
        }
        if spec.get("description"):
            made["help"] = str(spec["description"])
        pattern = spec.get("pattern")
        if isinstance(pattern, str) and pattern:
            made["pattern"] = pattern.removeprefix("^").removesuffix("$")
        if name in self.hosts:
            whole = self.hosts[name] or spec.get("format") == "hostname"
            declared = made.get("pattern")
            # A value put into a host must be a host name part; a declared pattern that
            # allows more (a dot in a subdomain, a path) is narrowed to one that does not.
            strict = _HOST_PATTERN if whole else _LABEL_PATTERN
            loose = declared is None or any(
                re.fullmatch(declared, probe) for probe in ("evil.com/", "x@evil.com")
            )
            if loose or (not whole and re.fullmatch(str(declared), "a.b")):
                made["pattern"] = strict
        if spec.get("example"):
            made["expected"] = f"such as {str(spec['example'])!r}"
        if spec.get("default_value") is not None:
            made["default"] = str(spec["default_value"])
        return made
