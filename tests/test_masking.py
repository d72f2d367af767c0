"""Masking proof: marker secrets never show in logs, reprs, errors, events or stored rows."""

from __future__ import annotations

import asyncio
import logging
import traceback
import uuid as uuid_mod
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aioresponses import aioresponses

from integrations import (
    ALL_OWNERS,
    ConfigurationError,
    Connection,
    DecryptionFailed,
    EncryptionNotConfigured,
    Event,
    HostNotAllowed,
    Integrations,
    IntegrationsError,
    InvalidField,
    NotConfigured,
    RequestFailed,
    StorageError,
    Subscription,
    UnknownKey,
    generate_key,
)

from .conftest import TEST_KEY, settle, store_setup

MASK = "••••"
NEW_KEY = generate_key()

# Each marker is at least 12 characters, so its masked form may show its last 4 and
# nothing else; everything before those 4 must never appear anywhere.
SETUPS: dict[str, dict[str, Any]] = {
    "openai": {"api_key": "sk-MARKER-apikey-3Xq7Lm9Pz2"},
    "google": {
        "client_id": "cid.apps.example.com",
        "client_secret": "GOCSPX-MARKER-csecret-8Rt5",
        "access_token": "ya29.MARKER-access-6Wn2Kp",
        "refresh_token": "1//MARKER-refresh-4Hs8Vd",
    },
    "telegram": {"bot_token": "123456:MARKER-bot-9Jf3Qc"},
    "smtp": {"host": "mail.example.com", "username": "u", "password": "MARKER-smtp-pw-2Zb7"},
    "aws": {"access_key": "AKIAEXAMPLE", "secret_key": "MARKER-aws-secret-5Ty1Nm"},
    # A provider-declared secret that is not in the built-in list of secret fields.
    "twilio": {"account_sid": "AC" + "0" * 32, "auth_token": "MARKER-twilio-token-7Ge4"},
}
SECRET_KEYS = {
    "api_key",
    "client_secret",
    "access_token",
    "refresh_token",
    "bot_token",
    "password",
    "secret_key",
    "auth_token",
}
MARKERS = [v for attrs in SETUPS.values() for k, v in attrs.items() if k in SECRET_KEYS]
LEGACY_MARKER = "sk-MARKER-legacy-1Pw6Yu"
BOOM_MARKER = "MARKER-in-an-app-error-0Aa1"
ALL_MARKERS = [*MARKERS, LEGACY_MARKER]

OPENAI_MODELS = "https://api.openai.com/v1/models"


def leaks(text: str) -> list[str]:
    return [m for m in [*ALL_MARKERS, BOOM_MARKER] if m[:-4] in text]


def exception_text(exc: BaseException) -> str:
    """Everything an exception can show: message, repr, context, the chained causes and,
    for driver errors, their detail fields."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "context", None))]
        as_dict = getattr(seen, "as_dict", None)
        if callable(as_dict):
            parts.append(repr(as_dict()))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def assert_masked(data: Mapping[str, Any]) -> None:
    """Secret values show as •••• plus at most the last 4 characters of the marker."""
    for key, value in data.items():
        if key == "credentials" and isinstance(value, Mapping):
            assert_masked_values(value.values())
        elif key in SECRET_KEYS:
            assert_masked_values([value])


def assert_masked_values(values: Iterable[Any]) -> None:
    for value in values:
        assert isinstance(value, str) and value.startswith(MASK), value
        assert len(value) - len(MASK) in (0, 4), value


async def events_through(
    subscription: Subscription, payloads: list[str], sentinel: str
) -> list[Event]:
    """Every event up to the sentinel's, which was written last: notifications arrive in
    commit order, so once the sentinel's has come (to the subscription and to the raw
    listener collecting ``payloads``) every earlier one has too."""
    events: list[Event] = []
    while not events or events[-1].uuid != sentinel:
        events.append(await asyncio.wait_for(subscription.get(), 15))
    for _ in range(1500):
        if any(sentinel in payload for payload in payloads):
            return events
        await asyncio.sleep(0.01)
    raise AssertionError("the sentinel's notification did not reach the raw listener")


async def stored_texts(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT value_json::text AS t FROM integrations.connections")
    pending = await db.fetch(
        "SELECT code_verifier::text AS t FROM integrations.pending_authorizations"
    )
    logged = await db.fetch("SELECT body AS t FROM integrations.events")
    return [r["t"] for r in [*rows, *pending, *logged]]


async def test_marker_secrets_never_show_outside_the_plaintext_accessors(
    fresh_db: str,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    caplog.set_level(logging.DEBUG)
    payloads: list[str] = []
    await db.add_listener("integrations_events", lambda *args: payloads.append(args[3]))
    shown: list[Any] = []  # every object a masked method returned
    errors: list[BaseException] = []
    stored: list[str] = []
    exercised: set[str] = set()

    def record(name: str, value: Any = None) -> Any:
        exercised.add(name)
        shown.append(value)
        return value

    async def expect(kind: type[IntegrationsError], call: Any) -> None:
        with pytest.raises(kind) as info:
            await call
        errors.append(info.value)

    integ = Integrations(fresh_db, keys=TEST_KEY)
    await integ.open()
    exercised.add("open")
    subscriptions = AsyncExitStack()
    subscription = await subscriptions.enter_async_context(integ.subscribe(owner=ALL_OWNERS))
    record("subscribe", subscription)
    record("migrate", await integ.migrate())
    uuids: dict[str, str] = {}
    for provider, attrs in SETUPS.items():
        conn = record("add_connection", await integ.add_connection(provider, "default"))
        uuids[provider] = conn.uuid
        saved = record("save_setup", await store_setup(integ, conn.uuid, attrs, actor="admin"))
        assert_masked(saved)

    # Reads that mask.
    record("list_providers", integ.list_providers())
    for provider, row_uuid in uuids.items():
        for connection in record("list_connections", await integ.list_connections(provider)):
            assert_masked(connection.data)
        by_uuid = await integ.get_integration_by_uuid(row_uuid)
        assert_masked(record("get_integration_by_uuid", by_uuid).data)
        record("find_uuid_by_provider_name", await integ.find_uuid_by_provider_name(provider))
        record("resolve_to_uuid", await integ.resolve_to_uuid(f"{provider}:default"))
        record("is_connected", await integ.is_connected(row_uuid))
        record("settings_key", integ.settings_key(provider))
    handle = record("for_owner", integ.for_owner(None))
    assert [c.uuid for c in await handle.list_integrations()] == [
        c.uuid for c in await integ.list_integrations()
    ]
    exercised.add("import_tokens")  # by store_setup above, for the OAuth tokens
    everything = record("load_all_connections", await integ.load_all_connections(list(SETUPS)))
    listed = record("list_integrations", await integ.list_integrations())
    assert len(listed) == len(SETUPS)
    page = record("list_page", await integ.list_page(limit=1000))
    counts = record("count_connections", await integ.count_connections())
    assert counts == {provider: 1 for provider in SETUPS}
    assert {c.uuid for c in page.items} == {c.uuid for c in listed}
    for connection in [*listed, *page.items, *(c for cs in everything.values() for c in cs)]:
        assert isinstance(connection, Connection)
        assert_masked(connection.data)

    # The plaintext accessors do see the secrets; their results are not shown anywhere.
    exercised |= {"get_credentials", "get_integration"}
    creds = await integ.get_credentials(uuids["openai"])
    assert creds["api_key"] == SETUPS["openai"]["api_key"]
    full = await integ.get_integration("smtp")
    assert full["credentials"]["password"] == SETUPS["smtp"]["password"]
    stored += await stored_texts(db)

    # Outgoing requests carry the plaintext; nothing else about them does.
    with aioresponses() as mock:
        mock.get(OPENAI_MODELS, status=401, payload={"error": "invalid_api_key"})
        attrs = {"api_key": SETUPS["openai"]["api_key"]}
        record("validate_credentials", await integ.validate_credentials("openai", attrs))
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        record("validate_connection", await integ.validate_connection(uuids["openai"]))
        mock.get(OPENAI_MODELS, status=200, payload={"data": []})
        response = await integ.authenticated_request(uuids["openai"], "GET", OPENAI_MODELS)
        record("authenticated_request", response)
        sent = [call.kwargs["headers"] for calls in mock.requests.values() for call in calls]
        assert all(h["Authorization"] == "Bearer " + SETUPS["openai"]["api_key"] for h in sent)
        await expect(
            HostNotAllowed,
            integ.authenticated_request(uuids["openai"], "GET", "https://collect.example.net/"),
        )
        mock.get(OPENAI_MODELS, exception=aiohttp.ClientConnectionError("connection reset"))
        await expect(
            RequestFailed,
            integ.authenticated_request(uuids["openai"], "GET", OPENAI_MODELS, max_attempts=1),
        )

    # Writes.
    renamed = record("rename_connection", await integ.rename_connection(uuids["google"], "work"))
    assert_masked(renamed)
    record("record_validation", await integ.record_validation(uuids["openai"], (False, "Nope")))

    async def migrator(instance: Integrations) -> None:
        await instance.legacy_upsert("openai", "legacy", {"api_key": LEGACY_MARKER})
        raise RuntimeError(f"legacy data was odd: {BOOM_MARKER}")

    record("register_legacy_migrator", integ.register_legacy_migrator("odd", migrator))
    record("run_all_legacy_migrations", await integ.run_all_legacy_migrations())
    with pytest.deprecated_call():
        record("run_legacy_migrations", await integ.run_legacy_migrations())
    upserted = record(
        "legacy_upsert", await integ.legacy_upsert("openai", "legacy", {"organization": "o"})
    )
    assert_masked(upserted.data)

    # Rotation, then the old-key-only instance meets rows it cannot read.
    async with Integrations(fresh_db, keys=[NEW_KEY, TEST_KEY]) as rotating:
        progress: list[Any] = []
        result = record("rotate_keys", await rotating.rotate_keys(progress=progress.append))
        shown.extend(progress)
        assert result.rotated == len(SETUPS) + 1
        stored += await stored_texts(db)

        # The operator calls: tokens from elsewhere, a sweep of checks, a diagnosis.
        google = SETUPS["google"]
        tokens = {"access_token": google["access_token"], "refresh_token": google["refresh_token"]}
        imported = await rotating.import_tokens(uuids["google"], tokens, actor="admin")
        assert_masked(record("import_tokens", imported).data)
        with aioresponses():
            record("check_all", await rotating.check_all(provider="openai"))
        record("diagnose", await integ.diagnose())
        stored += await stored_texts(db)

        # Forced error paths, each with a marker in play.
        await expect(UnknownKey, integ.get_credentials(uuids["openai"]))
        await expect(
            InvalidField,
            rotating.save_setup(uuids["smtp"], {"password": MARKERS[0], "port": "not-a-port"}),
        )
        await expect(
            NotConfigured, rotating.save_setup(str(uuid_mod.uuid4()), {"api_key": MARKERS[0]})
        )
        async with Integrations(fresh_db) as keyless:
            await expect(
                EncryptionNotConfigured,
                keyless.save_setup(uuids["openai"], {"api_key": MARKERS[0]}),
            )
        # A ciphertext moved to another row does not decrypt there.
        await db.execute(
            """UPDATE integrations.connections
               SET value_json = jsonb_set(value_json, '{api_key}',
                   (SELECT value_json -> 'api_key' FROM integrations.connections WHERE uuid = $2))
               WHERE uuid = $1""",
            uuid_mod.UUID(await rotating.find_uuid_by_provider_name("openai:legacy")),
            uuid_mod.UUID(uuids["openai"]),
        )
        await settle()
        await expect(DecryptionFailed, rotating.get_credentials("openai:legacy"))
        # A forged envelope carrying a marker is refused without echoing it.
        await expect(
            InvalidField,
            rotating.save_setup(uuids["openai"], {"api_key": {"$enc": 1, "kid": MARKERS[0]}}),
        )
        # Rows under a key this instance lacks are skipped and reported, by uuid only.
        skipped = record("rotate_keys", await integ.rotate_keys())
        assert skipped.undecryptable
        # A database error while a secret is being written: the driver's detail quotes
        # the failing row, which only ever holds sealed values.
        await db.execute(
            """ALTER TABLE integrations.connections
               ADD CONSTRAINT no_trip CHECK (NOT value_json ? 'trip') NOT VALID"""
        )
        await expect(
            StorageError,
            rotating.save_setup(uuids["aws"], {"trip": 1, "secret_key": MARKERS[0]}),
        )
        await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_trip")
        assert "Failing row contains" in exception_text(errors[-1])
        for error in errors:
            logging.getLogger("app").error("call failed", exc_info=error)

        # The audit trail holds names, never values; a data key needs a KMS or HSM source.
        record("audit", await rotating.audit(limit=1000))
        record("verify_audit", await rotating.verify_audit())
        record("sweep_audit", await rotating.sweep_audit(older_than=timedelta(days=1)))
        await expect(ConfigurationError, rotating.new_data_key())
        exercised.add("new_data_key")

        # Last, the calls that drop data.
        record("disconnect", await rotating.disconnect(uuids["openai"]))
        record("remove_connection", await rotating.remove_connection(uuids["telegram"]))
    stored += await stored_texts(db)
    sentinel = await integ.add_connection("openai", "sentinel")
    delivered = await events_through(subscription, payloads, sentinel.uuid)
    assert {"connection_added", "setup_saved", "connection_removed"} <= {e.kind for e in delivered}
    shown.extend(delivered)
    async with integ.subscribe(owner=ALL_OWNERS, after=0) as replay:
        replayed = [await replay.get() for _ in range(len(delivered))]
    assert [e.position for e in replayed] == [e.position for e in delivered]
    shown.extend(replayed)
    record("prune_events", await integ.prune_events(max_age=None, max_count=1))
    record("event_stats", integ.event_stats)
    record("cache_stats", integ.cache_stats)
    await subscriptions.aclose()
    shown.append(integ)
    await integ.close()
    exercised.add("close")

    # Every public method ran, here or (the OAuth ones) in the test below.
    exercised |= OAUTH_METHODS
    # The sweep's log records and events are checked for markers in tests/test_sweep.py.
    exercised.add("run_health_sweeps")
    # Webhook secrets are checked for in logs, errors and listings in tests/test_webhooks.py.
    exercised |= {
        "add_webhook",
        "list_webhooks",
        "remove_webhook",
        "replay_webhook",
        "run_webhooks",
        "test_webhook",
        "webhook_deliveries",
    }
    # A new data key needs a KMS or PKCS#11 source: tests/test_key_sources.py runs it and
    # checks what it prints and logs.
    exercised.add("new_data_key")
    # The device flow needs a provider that offers it: tests/test_device_flow.py runs it
    # against a real OpenID provider and checks logs and listings for the tokens.
    exercised |= {"start_device_authorization", "complete_device_authorization"}
    public = {name for name in dir(Integrations) if not name.startswith("_")}
    assert public - exercised == set(), "add new public methods to this test"

    assert len(errors) == 10
    assert payloads, "no NOTIFY payload was received"
    for payload in payloads:
        assert leaks(payload) == [], payload
        assert leaks(repr(Event.from_payload(payload))) == []
    for value in shown:
        assert leaks(repr(value)) == [], value
    for error in errors:
        assert leaks(exception_text(error)) == [], type(error).__name__
    for text in stored:
        assert leaks(text) == [], text
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    for log_record in caplog.records:
        assert leaks(formatter.format(log_record)) == [], log_record.getMessage()
        assert leaks(repr(log_record.args)) == []
    # The masked form is really there: the last 4 characters of a long secret, no more.
    assert all(MASK + m[-4:] in repr(shown) for m in MARKERS)


OAUTH_METHODS = {
    "access_token",
    "authorization_url",
    "begin_authorization",
    "complete_authorization",
    "connect_interactive",
    "exchange_code",
    "refresh_access_token",
}
OAUTH_CLIENT_SECRET = "MARKER-oauth-client-secret-3Kd9"


async def test_oauth_secrets_never_show_outside_the_token_accessors(
    fresh_db: str,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from .oauth_server import DEFAULT_CLIENT_ID, OAuthTestServer
    from .oauthkit import REDIRECT_URI, approve, open_integrations

    caplog.set_level(logging.DEBUG)
    payloads: list[str] = []
    await db.add_listener("integrations_events", lambda *args: payloads.append(args[3]))
    secrets: set[str] = {OAUTH_CLIENT_SECRET}
    shown: list[Any] = []
    errors: list[BaseException] = []
    stored: list[str] = []
    exercised: set[str] = set()

    async def collect_tokens(integ: Integrations, uuid: str) -> None:
        creds = await integ.get_credentials(uuid)
        secrets.update(creds[k] for k in ("access_token", "refresh_token") if creds.get(k))

    async with (
        OAuthTestServer(clients={DEFAULT_CLIENT_ID: OAUTH_CLIENT_SECRET}) as server,
        open_integrations(fresh_db, server.base_url) as integ,
        integ.subscribe(owner=ALL_OWNERS) as subscription,
    ):
        conn = await integ.add_connection("loopback", "default")
        setup = {"client_id": DEFAULT_CLIENT_ID, "client_secret": OAUTH_CLIENT_SECRET}
        assert_masked(await store_setup(integ, conn.uuid, setup))

        url, state = await integ.begin_authorization(conn.uuid, REDIRECT_URI)
        exercised.add("begin_authorization")
        shown += [url, state]
        query = await approve(url)
        secrets.add(query["code"])
        connected = await integ.complete_authorization(query["state"], code=query["code"])
        exercised.add("complete_authorization")
        shown.append(connected)
        assert_masked(connected.data)
        await collect_tokens(integ, conn.uuid)

        # The seed's pair: a URL, then the code exchanged by uuid.
        url = await integ.authorization_url(conn.uuid, REDIRECT_URI)
        exercised.add("authorization_url")
        shown.append(url)
        query = await approve(url)
        secrets.add(query["code"])
        exchanged = await integ.exchange_code(conn.uuid, query["code"], REDIRECT_URI)
        exercised.add("exchange_code")
        shown.append(exchanged)
        assert_masked(exchanged)
        await collect_tokens(integ, conn.uuid)

        # Token accessors hand out plaintext; nothing else about them does.
        exercised |= {"access_token", "refresh_access_token"}
        secrets.add(await integ.access_token(conn.uuid))
        secrets.add(await integ.refresh_access_token(conn.uuid))
        await collect_tokens(integ, conn.uuid)
        server.expire_access_tokens()
        shown.append(await integ.authenticated_request(conn.uuid, "GET", server.api_url + "/me"))
        await collect_tokens(integ, conn.uuid)
        stored += await stored_texts(db)

        # The loopback flow for scripts prints its URL; that output is checked too.
        other = await integ.add_connection("loopback", "script")
        await store_setup(integ, other.uuid, setup)
        task = asyncio.create_task(integ.connect_interactive(other.uuid, timeout=30))
        exercised.add("connect_interactive")
        printed = ""
        while "/authorize?" not in printed:
            await asyncio.sleep(0.02)
            printed += capsys.readouterr().out
        interactive_url = printed[printed.index("http://") :].split()[0]
        async with aiohttp.ClientSession() as http, http.get(interactive_url) as resp:
            assert resp.status == 200
        shown.append(await task)
        shown.append(printed)
        await collect_tokens(integ, other.uuid)

        # Failure paths with secrets in play.
        with pytest.raises(IntegrationsError) as forged:
            await integ.complete_authorization("forged-state", code="some-code-value")
        errors.append(forged.value)
        server.config.force_invalid_client = True
        with pytest.raises(IntegrationsError) as refused:
            await integ.refresh_access_token(conn.uuid)
        errors.append(refused.value)
        server.config.force_invalid_client = False
        stored += await stored_texts(db)
        await integ.disconnect(conn.uuid)
        sentinel = await integ.add_connection("loopback", "sentinel")
        delivered = await events_through(subscription, payloads, sentinel.uuid)
        assert {"connection_added", "connected", "disconnected"} <= {e.kind for e in delivered}
        shown += delivered

    assert OAUTH_METHODS - exercised == set()
    assert len(secrets) > 6
    assert payloads

    def leaked(text: str) -> list[str]:
        return [s for s in secrets if len(s) >= 12 and s[:-4] in text]

    for payload in payloads:
        assert leaked(payload) == [], payload
    for value in shown:
        assert leaked(repr(value)) == [], value
    for error in errors:
        assert leaked(exception_text(error)) == [], type(error).__name__
    for text in stored:
        assert leaked(text) == [], text
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for log_record in caplog.records:
        assert leaked(formatter.format(log_record)) == [], log_record.getMessage()
