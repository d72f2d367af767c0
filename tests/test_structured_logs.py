"""Every log record of the library carries the same structured fields, and no secret."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses

from integrations import ReauthRequired
from integrations._telemetry import LOG_FIELDS, fields

from .conftest import save_and_settle, store_setup
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer
from .oauthkit import open_integrations

PACKAGE = Path(__file__).resolve().parent.parent / "integrations"
OPENAI_MODELS = "https://api.openai.com/v1/models"
API_KEY = "sk-MARKER-logs-apikey-7Vb3Xn"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def library_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] == "integrations"]


async def test_records_of_a_refresh_failure_a_check_and_a_request_carry_the_fields(
    fresh_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        OAuthTestServer() as server,
        open_integrations(fresh_db, server.base_url) as integ,
    ):
        owned = await integ.add_connection("loopback", "default", owner="alice")
        oauth_uuid = owned.uuid
        secrets = [DEFAULT_CLIENT_SECRET, "MARKER-access-2Fg8Lp", "MARKER-refresh-6Tz1Kc"]
        setup = {
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": secrets[0],
            "access_token": secrets[1],
            "refresh_token": secrets[2],
        }
        await store_setup(integ, oauth_uuid, setup)

        conn = await integ.add_connection("openai", "default")
        await store_setup(integ, conn.uuid, {"api_key": API_KEY})
        secrets.append(API_KEY)
        caplog.clear()

        server.config.force_invalid_client = True
        with pytest.raises(ReauthRequired):
            await integ.refresh_access_token(oauth_uuid, owner="alice")
        with aioresponses() as mock:
            mock.get(OPENAI_MODELS, status=200, payload={"data": []})
            assert (await integ.validate_connection(conn.uuid)).ok
            mock.get(OPENAI_MODELS, status=503, headers={"Retry-After": "0"})
            mock.get(OPENAI_MODELS, status=200, payload={"data": []})
            assert (await integ.authenticated_request(conn.uuid, "GET", OPENAI_MODELS)).ok

    records = library_records(caplog)
    kinds = {r.integrations_event_kind: r for r in records}  # type: ignore[attr-defined]
    assert {"token_refresh_failed", "check_finished", "http_retry"} <= set(kinds)
    for record in records:
        for name in LOG_FIELDS:
            assert hasattr(record, name), (record.getMessage(), name)
        assert isinstance(record.integrations_event_kind, str)  # type: ignore[attr-defined]

    def connection_of(kind: str) -> tuple[object, object, object]:
        record = kinds[kind]
        return (
            record.integrations_uuid,  # type: ignore[attr-defined]
            record.integrations_provider,  # type: ignore[attr-defined]
            record.integrations_owner,  # type: ignore[attr-defined]
        )

    assert connection_of("token_refresh_failed") == (oauth_uuid, "loopback", "alice")
    assert connection_of("check_finished") == (conn.uuid, "openai", None)
    # A retry deep inside the HTTP client still names the connection it was for.
    assert connection_of("http_retry") == (conn.uuid, "openai", None)

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        text = formatter.format(record) + repr(vars(record))
        for secret in secrets:
            assert secret not in text


@pytest.mark.parametrize(
    ("method", "opts"),
    [("GET", {}), ("PUT", {"json": {"q": 1}}), ("GET", {"params": {"page": 2}})],
    ids=["plain", "body", "params"],
)
async def test_a_retry_of_a_cached_connection_names_it_and_the_name_goes_no_further(
    integ: Any, caplog: pytest.LogCaptureFixture, method: str, opts: dict[str, Any]
) -> None:
    conn = await integ.add_connection("openai", "default", owner="alice")
    await save_and_settle(integ, conn.uuid, {"api_key": API_KEY})
    await integ.get_credentials(conn.uuid)
    hits = integ.cache_stats.hits
    caplog.set_level(logging.DEBUG, logger="integrations")
    caplog.clear()
    with aioresponses() as mock:
        url = OPENAI_MODELS + ("?page=2" if "params" in opts else "")
        mock.add(url, method, status=503, headers={"Retry-After": "0"})
        mock.add(url, method, status=200, payload={})
        response = await integ.authenticated_request(conn.uuid, method, OPENAI_MODELS, **opts)
    assert response.ok
    assert integ.cache_stats.hits == hits + 1  # served from the cache: the fast lane
    (retry,) = [r for r in library_records(caplog) if r.integrations_event_kind == "http_retry"]  # type: ignore[attr-defined]
    assert (retry.integrations_uuid, retry.integrations_owner) == (conn.uuid, "alice")  # type: ignore[attr-defined]
    # Back in the caller: a record made now names no connection.
    assert fields("after")["integrations_uuid"] is None


def _log_calls(tree: ast.AST) -> list[ast.Call]:
    calls = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LOG_METHODS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in {"log", "logger"}
        ):
            calls.append(node)
    return calls


def test_every_logging_call_of_the_package_passes_the_structured_fields() -> None:
    missing: list[str] = []
    seen = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _log_calls(ast.parse(path.read_text(encoding="utf-8"))):
            seen += 1
            if not any(k.arg == "extra" for k in call.keywords):
                missing.append(f"{path.name}:{call.lineno}")
    assert seen >= 20
    assert missing == []


def test_every_event_kind_logged_is_documented() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    kinds: set[str] = set()
    for path in (root / "integrations").rglob("*.py"):
        kinds |= set(re.findall(r'fields\(\s*"([a-z_]+)"', path.read_text()))
    documented = (root / "docs" / "operating.md").read_text()
    assert kinds, "no log event kinds found"
    assert sorted(k for k in kinds if f"`{k}`" not in documented) == []
