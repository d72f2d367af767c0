"""Unit tests of the I/O-free OAuth functions in ``integrations.oauth``."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations import oauth
from integrations._errors import (
    InvalidInput,
    InvalidURL,
    OAuthError,
    ReauthRequired,
    RequestFailed,
    TokenRequestFailed,
)
from integrations._registry import ProviderRegistry

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
TOKEN_URL = "https://auth.example.com/oauth/token"
VERIFIER_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def form(body: str) -> dict[str, str]:
    return dict(parse_qsl(body, keep_blank_values=True))


def parse(status: int, body: object, **kwargs: object) -> oauth.TokenSet:
    kwargs.setdefault("requested_scopes", ["read"])
    kwargs.setdefault("previous_refresh_token", None)
    return oauth.parse_token_response(status, body, now=NOW, **kwargs)  # type: ignore[arg-type]


# --- state and PKCE -------------------------------------------------------------


def test_generate_state_is_url_safe_long_and_unique() -> None:
    states = {oauth.generate_state() for _ in range(200)}
    assert len(states) == 200
    for state in states:
        assert len(state) >= 32
        assert re.fullmatch(r"[A-Za-z0-9_-]+", state)


def test_generate_code_verifier_follows_rfc7636() -> None:
    verifier = oauth.generate_code_verifier()
    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set(VERIFIER_CHARS)
    assert verifier != oauth.generate_code_verifier()


def test_code_challenge_matches_rfc7636_appendix_b_example() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert oauth.code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize("verifier", ["short", "x" * 129, "a" * 42 + "!", "é" * 50])
def test_code_challenge_refuses_malformed_verifier_without_echoing_it(verifier: str) -> None:
    with pytest.raises(ValueError) as info:
        oauth.code_challenge(verifier)
    assert verifier not in str(info.value)


@given(st.text(alphabet=VERIFIER_CHARS, min_size=43, max_size=128))
def test_code_challenge_is_unpadded_base64url_sha256(verifier: str) -> None:
    challenge = oauth.code_challenge(verifier)
    assert len(challenge) == 43
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)
    digest = base64.urlsafe_b64decode(challenge + "=")
    assert digest == hashlib.sha256(verifier.encode("ascii")).digest()


@given(st.integers(min_value=0, max_value=50))
def test_generated_verifiers_always_yield_valid_challenges(_: int) -> None:
    verifier = oauth.generate_code_verifier()
    assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", verifier)
    assert oauth.code_challenge(verifier) != oauth.code_challenge(oauth.generate_code_verifier())


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1))
def test_hash_state_is_sha256_hex_and_never_the_state(state: str) -> None:
    hashed = oauth.hash_state(state)
    assert hashed == hashlib.sha256(state.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hashed)
    assert hashed != state


@pytest.mark.parametrize("state", ["st\x00ate", "\ud800", "a\udfffb"])
def test_hash_state_refuses_nul_and_lone_surrogates_as_invalid(state: str) -> None:
    with pytest.raises(InvalidInput) as info:
        oauth.hash_state(state)
    assert info.value.code == "invalid"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"code": "c\x00de", "redirect_uri": "https://app.test/cb"}, "code"),
        ({"code": "\ud800", "redirect_uri": "https://app.test/cb"}, "code"),
        ({"code": "c", "redirect_uri": "https://app.test/cb", "scope": ["a", "b\udc00"]}, "scope"),
    ],
)
def test_token_request_refuses_text_that_cannot_be_sent(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        oauth.token_request(
            "authorization_code",
            token_url="https://auth.test/token",
            client_id="cid",
            client_secret="secret",
            auth_method="client_secret_post",
            **params,
        )
    assert info.value.context["field"] == field


def test_expiry_checks_do_not_overflow_at_the_ends_of_time() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    plus14 = timezone(timedelta(hours=14))
    minus14 = timezone(timedelta(hours=-14))
    first = datetime(1, 1, 1, tzinfo=plus14)
    last = datetime(9999, 12, 31, 23, 59, tzinfo=minus14)
    assert oauth.expires_within(first, 3600, now)
    assert not oauth.expires_within(last, 3600, now)
    assert oauth.refresh_due(first, datetime(1, 1, 1, tzinfo=UTC), 3600, now)
    assert not oauth.refresh_due(last, first, 10**9, now)


# --- authorization URL -------------------------------------------------------------


def test_authorization_url_carries_client_redirect_scopes_state_and_pkce() -> None:
    verifier = oauth.generate_code_verifier()
    url = oauth.authorization_url(
        "https://accounts.example.com/o/oauth2/auth",
        client_id="client-1",
        redirect_uri="http://127.0.0.1:8765/callback",
        scopes=["openid", "email", "https://www.googleapis.com/auth/drive"],
        state="state-123",
        code_challenge=oauth.code_challenge(verifier),
        extra_params={"access_type": "offline", "prompt": "consent"},
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "accounts.example.com",
        "/o/oauth2/auth",
    )
    assert query(url) == {
        "response_type": ["code"],
        "client_id": ["client-1"],
        "redirect_uri": ["http://127.0.0.1:8765/callback"],
        "scope": ["openid email https://www.googleapis.com/auth/drive"],
        "state": ["state-123"],
        "code_challenge": [oauth.code_challenge(verifier)],
        "code_challenge_method": ["S256"],
        "access_type": ["offline"],
        "prompt": ["consent"],
    }


def test_authorization_url_uses_the_provider_scope_separator() -> None:
    url = oauth.authorization_url(
        "https://slack.com/oauth/v2/authorize",
        client_id="c",
        redirect_uri="https://app.example/cb",
        scopes=["chat:write", "channels:read"],
        scope_separator=",",
        state="s",
        code_challenge=None,
    )
    assert query(url)["scope"] == ["chat:write,channels:read"]


def test_authorization_url_omits_absent_state_pkce_and_empty_scopes() -> None:
    url = oauth.authorization_url(
        "https://example.com/authorize",
        client_id="c",
        redirect_uri="https://app.example/cb",
        scopes=[],
        state=None,
        code_challenge=None,
    )
    assert set(query(url)) == {"response_type", "client_id", "redirect_uri"}


def test_authorization_url_keeps_an_existing_query() -> None:
    url = oauth.authorization_url(
        "https://login.example.com/authorize?tenant=common",
        client_id="c",
        redirect_uri="https://app.example/cb",
        scopes=["a"],
        state="s",
        code_challenge=None,
    )
    assert query(url)["tenant"] == ["common"]
    assert query(url)["state"] == ["s"]


@pytest.mark.parametrize("key", ["state", "client_id", "redirect_uri", "code_challenge_method"])
def test_authorization_url_refuses_extra_params_that_override_core_ones(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        oauth.authorization_url(
            "https://example.com/authorize",
            client_id="c",
            redirect_uri="https://app.example/cb",
            scopes=["a"],
            state="s",
            code_challenge=None,
            extra_params={key: "evil"},
        )


@pytest.mark.parametrize("bad", ["example.com/authorize", "ftp://example.com/a", "/authorize", ""])
def test_authorization_url_refuses_non_http_urls(bad: str) -> None:
    with pytest.raises(InvalidURL):
        oauth.authorization_url(
            bad,
            client_id="c",
            redirect_uri="https://app.example/cb",
            scopes=[],
            state="s",
            code_challenge=None,
        )


def test_authorization_url_refuses_a_bare_string_as_scopes() -> None:
    with pytest.raises(TypeError, match="scopes must be a sequence of str"):
        oauth.authorization_url(
            "https://example.com/authorize",
            client_id="c",
            redirect_uri="https://app.example/cb",
            scopes="openid email",
            state="s",
            code_challenge=None,
        )


# --- token and revocation requests ------------------------------------------------


def test_token_request_for_authorization_code_with_client_secret_post() -> None:
    url, headers, body = oauth.token_request(
        "authorization_code",
        token_url=TOKEN_URL,
        client_id="client-1",
        client_secret="s3cret",
        auth_method="client_secret_post",
        code="the-code",
        redirect_uri="http://127.0.0.1:9/cb",
        code_verifier="v" * 43,
    )
    assert url == TOKEN_URL
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert headers["Accept"] == "application/json"
    assert "Authorization" not in headers
    assert form(body) == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "http://127.0.0.1:9/cb",
        "code_verifier": "v" * 43,
        "client_id": "client-1",
        "client_secret": "s3cret",
    }


def test_token_request_with_client_secret_basic_puts_credentials_in_the_header() -> None:
    _, headers, body = oauth.token_request(
        "refresh_token",
        token_url=TOKEN_URL,
        client_id="client-1",
        client_secret="s3cret",
        auth_method="client_secret_basic",
        refresh_token="rt-1",
    )
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == "client-1:s3cret"
    assert form(body) == {"grant_type": "refresh_token", "refresh_token": "rt-1"}


def test_token_request_for_refresh_joins_a_scope_list() -> None:
    _, _, body = oauth.token_request(
        "refresh_token",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret="s",
        auth_method="client_secret_post",
        refresh_token="rt",
        scope=["a", "b"],
    )
    assert form(body)["scope"] == "a b"


def test_token_request_for_client_credentials_with_custom_scope_separator() -> None:
    _, _, body = oauth.token_request(
        "client_credentials",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret="s",
        auth_method="client_secret_post",
        scope_separator=",",
        scope=["x", "y"],
    )
    assert form(body) == {
        "grant_type": "client_credentials",
        "scope": "x,y",
        "client_id": "c",
        "client_secret": "s",
    }


def test_token_request_drops_none_values() -> None:
    _, _, body = oauth.token_request(
        "authorization_code",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret=None,
        auth_method="none",
        code="k",
        redirect_uri="https://app.example/cb",
        code_verifier=None,
    )
    assert form(body) == {
        "grant_type": "authorization_code",
        "code": "k",
        "redirect_uri": "https://app.example/cb",
        "client_id": "c",
    }


@pytest.mark.parametrize(
    ("grant", "params", "missing"),
    [
        ("authorization_code", {"redirect_uri": "https://a.example/cb"}, "code"),
        ("authorization_code", {"code": "k"}, "redirect_uri"),
        ("refresh_token", {}, "refresh_token"),
    ],
)
def test_token_request_refuses_missing_grant_parameters(
    grant: oauth.GrantType, params: dict[str, str], missing: str
) -> None:
    with pytest.raises(ValueError, match=missing):
        oauth.token_request(
            grant,
            token_url=TOKEN_URL,
            client_id="c",
            client_secret="s",
            auth_method="client_secret_post",
            **params,
        )


def test_token_request_refuses_unknown_grant_and_auth_method() -> None:
    with pytest.raises(ValueError, match="grant_type"):
        oauth.token_request(
            "password",  # type: ignore[arg-type]
            token_url=TOKEN_URL,
            client_id="c",
            client_secret="s",
            auth_method="client_secret_post",
        )
    with pytest.raises(ValueError, match="auth method"):
        oauth.token_request(
            "client_credentials",
            token_url=TOKEN_URL,
            client_id="c",
            client_secret="s",
            auth_method="client_secret_jwt",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="needs a private key"):
        oauth.token_request(
            "client_credentials",
            token_url=TOKEN_URL,
            client_id="c",
            client_secret=None,
            auth_method="private_key_jwt",
        )


def test_token_request_needs_a_secret_for_secret_auth_methods() -> None:
    with pytest.raises(ValueError, match="client_secret"):
        oauth.token_request(
            "client_credentials",
            token_url=TOKEN_URL,
            client_id="c",
            client_secret=None,
            auth_method="client_secret_post",
        )


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
def test_revoke_request_follows_rfc7009(method: oauth.AuthMethod) -> None:
    url, headers, body = oauth.revoke_request(
        "https://auth.example.com/revoke",
        token="rt-9",
        token_type_hint="refresh_token",
        client_id="c",
        client_secret="s",
        auth_method=method,
    )
    assert url == "https://auth.example.com/revoke"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    fields = form(body)
    assert fields["token"] == "rt-9"
    assert fields["token_type_hint"] == "refresh_token"
    if method == "client_secret_post":
        assert (fields["client_id"], fields["client_secret"]) == ("c", "s")
    else:
        assert headers["Authorization"].startswith("Basic ")
        assert "client_secret" not in fields


def test_revoke_request_without_hint_sends_only_the_token() -> None:
    _, _, body = oauth.revoke_request(
        "https://auth.example.com/revoke",
        token="at",
        client_id="c",
        client_secret="s",
        auth_method="client_secret_basic",
    )
    assert form(body) == {"token": "at"}


# --- token responses ----------------------------------------------------------------


def test_parse_token_response_json_with_expiry_and_granted_scope() -> None:
    tokens = parse(
        200,
        json.dumps(
            {
                "access_token": "at-1",
                "refresh_token": "rt-1",
                "token_type": "bearer",
                "expires_in": 3600,
                "scope": "read write",
                "ext_expires_in": 3600,
            }
        ).encode(),
    )
    assert tokens.access_token == "at-1"
    assert tokens.refresh_token == "rt-1"
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at == NOW + timedelta(hours=1)
    assert tokens.expires_at.tzinfo is not None
    assert tokens.scope == ("read", "write")
    assert tokens.obtained_at == NOW
    assert tokens.extras == {"ext_expires_in": 3600}


def test_parse_token_response_form_encoded_github_style() -> None:
    tokens = parse(200, "access_token=gho_abc&scope=repo%2Cgist&token_type=bearer")
    assert tokens.access_token == "gho_abc"
    assert tokens.scope == ("repo", "gist")
    assert tokens.expires_at is None


def test_parse_token_response_accepts_a_mapping_and_string_expires_in() -> None:
    tokens = parse(200, {"access_token": "a", "expires_in": "3599"})
    assert tokens.expires_at == NOW + timedelta(seconds=3599)


def test_parse_token_response_expires_in_zero_is_already_expired() -> None:
    tokens = parse(200, {"access_token": "a", "expires_in": 0})
    assert tokens.expires_at == NOW
    assert oauth.expires_within(tokens.expires_at, 0, NOW)


def test_parse_token_response_converts_now_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    tokens = oauth.parse_token_response(
        200,
        {"access_token": "a", "expires_in": 60},
        now=NOW.astimezone(plus_two),
        requested_scopes=[],
        previous_refresh_token=None,
    )
    assert tokens.obtained_at.utcoffset() == timedelta(0)
    assert tokens.expires_at == NOW + timedelta(seconds=60)


def test_parse_token_response_refuses_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone"):
        oauth.parse_token_response(
            200,
            {"access_token": "a"},
            now=datetime(2025, 1, 1),
            requested_scopes=[],
            previous_refresh_token=None,
        )


def test_parse_token_response_rotated_refresh_token_replaces_the_old_one() -> None:
    tokens = parse(
        200, {"access_token": "a2", "refresh_token": "rt-2"}, previous_refresh_token="rt-1"
    )
    assert tokens.refresh_token == "rt-2"


@pytest.mark.parametrize(
    "body", [{"access_token": "a2"}, {"access_token": "a2", "refresh_token": ""}]
)
def test_parse_token_response_missing_refresh_token_keeps_the_previous_one(
    body: dict[str, str],
) -> None:
    tokens = parse(200, body, previous_refresh_token="rt-1")
    assert tokens.refresh_token == "rt-1"


def test_parse_token_response_without_scope_assumes_the_requested_scopes() -> None:
    tokens = parse(200, {"access_token": "a"}, requested_scopes=["x", "y"])
    assert tokens.scope == ("x", "y")


def test_parse_token_response_scope_list_is_accepted() -> None:
    assert parse(200, {"access_token": "a", "scope": ["p", "q"]}).scope == ("p", "q")


def test_parse_token_response_strips_tokens_from_extras_recursively() -> None:
    tokens = parse(
        200,
        {
            "ok": True,
            "access_token": "xoxb-bot",
            "id_token": "eyJ.id.token",
            "team": {"id": "T1", "name": "Team"},
            "authed_user": {"id": "U1", "access_token": "xoxp-user", "refresh_token": "xoxe-r"},
            "bot_user_id": "B1",
        },
    )
    assert tokens.id_token == "eyJ.id.token"
    assert tokens.extras == {
        "ok": True,
        "team": {"id": "T1", "name": "Team"},
        "authed_user": {"id": "U1"},
        "bot_user_id": "B1",
    }
    assert "xox" not in json.dumps(tokens.extras)


def test_token_set_repr_masks_every_token() -> None:
    tokens = parse(
        200,
        {"access_token": "AT-SECRET", "refresh_token": "RT-SECRET", "id_token": "ID-SECRET"},
    )
    for text in (repr(tokens), str(tokens), f"{tokens}", repr([tokens])):
        assert "SECRET" not in text
        assert "<masked>" in text


def test_token_set_is_frozen_and_comparable() -> None:
    a = parse(200, {"access_token": "a", "expires_in": 10})
    b = parse(200, {"access_token": "a", "expires_in": 10})
    assert a == b
    with pytest.raises(AttributeError):
        a.access_token = "other"  # type: ignore[misc]


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "unauthorized_client"])
def test_terminal_oauth_errors_raise_reauth_required(code: str) -> None:
    body = {"error": code, "error_description": "Token has been expired or revoked."}
    with pytest.raises(ReauthRequired) as info:
        parse(400, body, previous_refresh_token="rt-old")
    exc = info.value
    assert code in str(exc)
    assert "Token has been expired or revoked." in str(exc)
    assert exc.context["error"] == code
    assert exc.context["status"] == 400
    assert oauth.is_terminal_error(exc)
    assert not oauth.is_transient_error(exc)


def test_invalid_client_with_401_is_terminal() -> None:
    with pytest.raises(ReauthRequired):
        parse(401, '{"error": "invalid_client"}')


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"error": "bad_verification_code", "error_description": "The code is incorrect."}),
        (200, {"ok": False, "error": "invalid_refresh_token"}),
        (200, "error=bad_refresh_token&error_description=expired"),
    ],
)
def test_vendor_terminal_errors_on_200_raise_reauth_required(status: int, body: object) -> None:
    with pytest.raises(ReauthRequired):
        parse(status, body)


def test_error_messages_never_contain_tokens() -> None:
    body = {"error": "invalid_grant", "error_description": "refresh token rt-LEAK is spent"}
    with pytest.raises(ReauthRequired) as info:
        parse(400, body, previous_refresh_token="rt-LEAK", redact=["code-LEAK"])
    assert "LEAK" not in str(info.value)
    assert "LEAK" not in repr(info.value)
    assert "LEAK" not in repr(info.value.context)
    body = {"error": "invalid_request", "error_description": "code code-LEAK\nis malformed"}
    with pytest.raises(TokenRequestFailed) as failed:
        parse(400, body, redact=["code-LEAK"])
    assert "LEAK" not in str(failed.value)
    assert "\n" not in str(failed.value)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, ""),
        (502, "<html>Bad gateway</html>"),
        (503, {"error": "temporarily_unavailable"}),
        (504, b"upstream timeout"),
        (429, {"error": "rate_limited"}),
        (408, ""),
        (400, {"error": "temporarily_unavailable"}),
        (200, {"ok": False, "error": "ratelimited"}),
    ],
)
def test_server_errors_and_rate_limits_are_transient(status: int, body: object) -> None:
    with pytest.raises(TokenRequestFailed) as info:
        parse(status, body)
    assert info.value.transient is True
    assert info.value.context["status"] == status
    assert oauth.is_transient_error(info.value)
    assert not oauth.is_terminal_error(info.value)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": "invalid_request", "error_description": "missing code"}),
        (400, {"error": "invalid_scope"}),
        (400, {"error": "unsupported_grant_type"}),
        (404, "not found"),
        (401, ""),
        (302, ""),
    ],
)
def test_other_client_errors_are_permanent_token_request_failures(
    status: int, body: object
) -> None:
    with pytest.raises(TokenRequestFailed) as info:
        parse(status, body)
    assert info.value.transient is False
    assert isinstance(info.value, OAuthError)
    assert not oauth.is_transient_error(info.value)
    assert not oauth.is_terminal_error(info.value)


@pytest.mark.parametrize(
    "body",
    [
        "<html>login</html>",
        b"\xff\xfe",
        "",
        "[1, 2]",
        "null",
        "plain words",
        {"token_type": "Bearer"},
    ],
)
def test_success_status_without_an_access_token_is_a_permanent_failure(body: object) -> None:
    with pytest.raises(TokenRequestFailed, match="HTTP 200") as info:
        parse(200, body)
    assert info.value.transient is False


def test_error_code_that_is_not_a_plain_identifier_is_not_echoed() -> None:
    with pytest.raises(TokenRequestFailed) as info:
        parse(400, {"error": "<script>alert(1)</script>"})
    assert "<script>" not in str(info.value)
    assert info.value.context["error"] == "unknown_error"


# --- error classification of I/O failures ---------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        ConnectionResetError(),
        aiohttp.ClientConnectionError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError(),
        RequestFailed(),
        TokenRequestFailed(transient=True),
    ],
)
def test_network_failures_are_transient(exc: BaseException) -> None:
    assert oauth.is_transient_error(exc)
    assert not oauth.is_terminal_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(),
        KeyError(),
        TokenRequestFailed(),
        ReauthRequired(),
        OAuthError(),
    ],
)
def test_programming_and_protocol_errors_are_not_transient(exc: BaseException) -> None:
    assert not oauth.is_transient_error(exc)


def test_client_response_errors_are_transient_only_for_5xx_and_429() -> None:
    def response_error(status: int) -> aiohttp.ClientResponseError:
        return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]

    assert oauth.is_transient_error(response_error(503))
    assert oauth.is_transient_error(response_error(429))
    assert not oauth.is_transient_error(response_error(400))


# --- expiry ---------------------------------------------------------------------------


def test_expires_within_applies_the_leeway() -> None:
    expires_at = NOW + timedelta(seconds=90)
    assert not oauth.expires_within(expires_at, 60, NOW)
    assert oauth.expires_within(expires_at, 90, NOW)
    assert oauth.expires_within(expires_at, 120, NOW)
    assert oauth.expires_within(expires_at, 0, NOW + timedelta(seconds=90))


def test_expires_within_unknown_expiry_is_never_due() -> None:
    assert oauth.expires_within(None, 10**9, NOW) is False


def test_expires_within_compares_across_timezones() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert oauth.expires_within((NOW + timedelta(seconds=30)).astimezone(tokyo), 60, NOW)


def test_expires_within_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="expires_at must be timezone-aware"):
        oauth.expires_within(datetime(2025, 1, 1), 60, NOW)


def test_refresh_due_uses_at_most_half_the_lifetime_as_leeway() -> None:
    # A 45-second token with a 60-second leeway: due after half its life, not at once.
    obtained = NOW
    expires_at = NOW + timedelta(seconds=45)
    assert not oauth.refresh_due(expires_at, obtained, 60, NOW)
    assert not oauth.refresh_due(expires_at, obtained, 60, NOW + timedelta(seconds=22))
    assert oauth.refresh_due(expires_at, obtained, 60, NOW + timedelta(seconds=23))


def test_refresh_due_keeps_the_leeway_for_long_lived_tokens() -> None:
    obtained = NOW - timedelta(hours=1)
    assert oauth.refresh_due(NOW + timedelta(seconds=59), obtained, 60, NOW)
    assert not oauth.refresh_due(NOW + timedelta(seconds=61), obtained, 60, NOW)


def test_refresh_due_without_an_obtained_time_uses_the_leeway() -> None:
    assert oauth.refresh_due(NOW + timedelta(seconds=30), None, 60, NOW)
    assert not oauth.refresh_due(None, NOW, 60, NOW)


def test_refresh_due_for_an_already_expired_token() -> None:
    assert oauth.refresh_due(NOW, NOW, 60, NOW)
    assert oauth.refresh_due(NOW - timedelta(seconds=1), NOW, 60, NOW)


def test_token_set_expires_within_delegates() -> None:
    tokens = parse(200, {"access_token": "a", "expires_in": 30})
    assert tokens.expires_within(60, NOW)
    assert not tokens.expires_within(10, NOW)


@given(
    seconds=st.integers(min_value=-(10**6), max_value=10**6),
    leeway=st.floats(min_value=0, max_value=10**6, allow_nan=False),
)
def test_expires_within_is_monotonic_in_leeway(seconds: int, leeway: float) -> None:
    expires_at = NOW + timedelta(seconds=seconds)
    if oauth.expires_within(expires_at, leeway, NOW):
        assert oauth.expires_within(expires_at, leeway + 1, NOW)


# --- userinfo -------------------------------------------------------------------------


def _account(provider: str, info: dict[str, object]) -> dict[str, object]:
    return ProviderRegistry().get(provider).map_userinfo(info)


def test_map_userinfo_google() -> None:
    info = {"sub": "1090", "email": "a@gmail.com", "name": "Ada", "picture": "https://p/a.png"}
    assert _account("google", info) == {
        "email": "a@gmail.com",
        "name": "Ada",
        "picture": "https://p/a.png",
        "account_id": "1090",
    }


def test_map_userinfo_microsoft_prefers_mail() -> None:
    info = {
        "id": "abc-1",
        "displayName": "Grace",
        "mail": "g@contoso.com",
        "userPrincipalName": "g@x",
    }
    assert _account("microsoft", info) == {
        "email": "g@contoso.com",
        "name": "Grace",
        "picture": None,
        "account_id": "abc-1",
    }


def test_map_userinfo_microsoft_falls_back_to_user_principal_name() -> None:
    info = {
        "id": "abc-2",
        "displayName": "Alan",
        "mail": None,
        "userPrincipalName": "alan@contoso.com",
    }
    assert _account("microsoft", info)["email"] == "alan@contoso.com"


def test_map_userinfo_github_uses_login_when_name_is_null_and_int_id() -> None:
    info = {
        "id": 583231,
        "login": "octocat",
        "name": None,
        "email": None,
        "avatar_url": "https://a/o",
    }
    assert _account("github", info) == {
        "email": None,
        "name": "octocat",
        "picture": "https://a/o",
        "account_id": "583231",
    }


def test_map_userinfo_slack_openid_and_legacy_identity() -> None:
    openid = {"sub": "U1", "email": "s@x.io", "name": "Sam", "picture": "https://s/p.png"}
    assert _account("slack", openid) == {
        "email": "s@x.io",
        "name": "Sam",
        "picture": "https://s/p.png",
        "account_id": "U1",
    }
    legacy = {
        "ok": True,
        "user": {"id": "U2", "name": "sam", "email": "s@x.io", "image_192": "https://i"},
    }
    assert _account("slack", legacy) == {
        "email": "s@x.io",
        "name": "sam",
        "picture": "https://i",
        "account_id": "U2",
    }


def test_map_userinfo_takes_dotted_paths_and_whole_keys_with_dots() -> None:
    info = {"user": {"email": "u@x.test"}, "https://slack.com/user_id": "U3"}
    assert oauth.map_userinfo(info, email=("user.email",)) == {
        "email": "u@x.test",
        "name": None,
        "picture": None,
        "account_id": "U3",
    }


def test_map_userinfo_generic_fallback() -> None:
    assert oauth.map_userinfo({"id": 7, "email": "e@acme.io", "name": "E"}) == {
        "email": "e@acme.io",
        "name": "E",
        "picture": None,
        "account_id": "7",
    }
    assert oauth.map_userinfo({}) == {
        "email": None,
        "name": None,
        "picture": None,
        "account_id": None,
    }
    graph_like = {"id": "x", "displayName": "G", "userPrincipalName": "g@t.com"}
    assert oauth.map_userinfo(graph_like) == {
        "email": "g@t.com",
        "name": "G",
        "picture": None,
        "account_id": "x",
    }


# --- backoff --------------------------------------------------------------------------


def test_backoff_delays_grow_and_respect_the_cap() -> None:
    delays = oauth.backoff_delays(8, 0.5, 10.0, rng=random.Random(1))
    assert len(delays) == 8
    for i, delay in enumerate(delays):
        ceiling = min(10.0, 0.5 * 2**i)
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_delays_are_jittered() -> None:
    assert oauth.backoff_delays(5, 1, 30) != oauth.backoff_delays(5, 1, 30)


def test_backoff_delays_refuse_negative_input_and_allow_zero_attempts() -> None:
    assert oauth.backoff_delays(0, 1, 1) == []
    with pytest.raises(ValueError, match="attempts must be >= 0"):
        oauth.backoff_delays(-1, 1, 1)
    with pytest.raises(ValueError, match="base and cap must be >= 0"):
        oauth.backoff_delays(1, -1, 1)


@given(
    attempts=st.integers(min_value=0, max_value=200),
    base=st.floats(min_value=0, max_value=100, allow_nan=False),
    cap=st.floats(min_value=0, max_value=1000, allow_nan=False),
)
def test_backoff_delays_are_bounded_by_the_cap(attempts: int, base: float, cap: float) -> None:
    delays = oauth.backoff_delays(attempts, base, cap)
    assert len(delays) == attempts
    assert all(0 <= d <= cap for d in delays)
