"""Error messages name the value at fault, what was expected and the next step, in plain text."""

from __future__ import annotations

import socket

import pytest

import integrations
from integrations import (
    EncryptionNotConfigured,
    Integrations,
    IntegrationsError,
    InvalidField,
    InvalidInput,
    InvalidName,
    InvalidProviderKey,
    InvalidUUID,
    NotConfigured,
    StorageError,
)
from integrations._repository import mask_dsn

from .conftest import TEST_KEY, _with_database


def every_error_class() -> list[type[IntegrationsError]]:
    found: list[type[IntegrationsError]] = []
    pending = [IntegrationsError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_class_is_exported_and_walked() -> None:
    classes = {cls.__name__ for cls in every_error_class()}
    exported = {
        name
        for name in integrations.__all__
        if isinstance(getattr(integrations, name), type)
        and issubclass(getattr(integrations, name), IntegrationsError)
    }
    assert exported == classes
    assert len(classes) >= 30


# Every error class: its parent and its code. A class with no subclass here stays one, so
# a test that expects such a class by name expects exactly its code.
ERROR_TREE = {
    "IntegrationsError": (None, "error"),
    "ConfigurationError": ("IntegrationsError", "configuration"),
    "EncryptionNotConfigured": ("ConfigurationError", "encryption_not_configured"),
    "SchemaOutdated": ("ConfigurationError", "schema_outdated"),
    "MissingExtra": ("ConfigurationError", "missing_extra"),
    "LifecycleError": ("IntegrationsError", "lifecycle"),
    "StorageError": ("IntegrationsError", "storage"),
    "LockTimeout": ("StorageError", "lock_timeout"),
    "AuditFailed": ("StorageError", "audit_failed"),
    "InvalidInput": ("IntegrationsError", "invalid"),
    "InvalidArgument": ("InvalidInput", "invalid"),
    "EmptyName": ("InvalidInput", "empty_name"),
    "InvalidName": ("InvalidInput", "invalid_name"),
    "InvalidUUID": ("InvalidInput", "invalid_uuid"),
    "InvalidProviderKey": ("InvalidInput", "invalid_provider_key"),
    "InvalidAttrs": ("InvalidInput", "invalid_attrs"),
    "MissingField": ("InvalidAttrs", "missing_field"),
    "InvalidField": ("InvalidAttrs", "invalid_field"),
    "InvalidURL": ("InvalidInput", "invalid_url"),
    "ProviderConflict": ("InvalidInput", "provider_conflict"),
    "AlreadyExists": ("IntegrationsError", "already_exists"),
    "NotFound": ("IntegrationsError", "not_found"),
    "NotConfigured": ("NotFound", "not_configured"),
    "Deleted": ("NotFound", "deleted"),
    "CryptoError": ("IntegrationsError", "crypto"),
    "UnknownKey": ("CryptoError", "unknown_key"),
    "DecryptionFailed": ("CryptoError", "decryption_failed"),
    "HostNotAllowed": ("IntegrationsError", "host_not_allowed"),
    "RequestFailed": ("IntegrationsError", "request_failed"),
    "OAuthError": ("IntegrationsError", "oauth"),
    "InvalidState": ("OAuthError", "invalid_state"),
    "AuthorizationDenied": ("OAuthError", "authorization_denied"),
    "NotConnected": ("OAuthError", "not_connected"),
    "ReauthRequired": ("OAuthError", "reauth_required"),
    "TokenRequestFailed": ("OAuthError", "token_request_failed"),
    "AuthorizationTimeout": ("OAuthError", "authorization_timeout"),
    "WebhookVerificationFailed": ("IntegrationsError", "webhook_verification_failed"),
}


def test_the_error_tree_is_exactly_the_documented_one() -> None:
    tree = {}
    for cls in every_error_class():
        parents = [b.__name__ for b in cls.__bases__ if issubclass(b, IntegrationsError)]
        tree[cls.__name__] = (parents[0] if parents else None, cls.code)
    assert tree == ERROR_TREE


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
def test_default_message_is_one_plain_sentence(cls: type[IntegrationsError]) -> None:
    message = cls().message
    assert str(cls()) == message
    assert "`" not in message, "no reST markup in messages"
    assert "\n" not in message
    assert "  " not in message
    assert message[0].isupper()
    assert message.endswith(".")


# -- values at fault and next steps -------------------------------------------------------


async def test_unknown_provider_suggests_the_closest_keys(integ: Integrations) -> None:
    with pytest.raises(InvalidProviderKey) as info:
        await integ.add_connection("OpenAI", "default")
    assert "'OpenAI'" in info.value.message
    assert "Did you mean 'openai'?" in info.value.message
    assert "list_providers()" in info.value.message
    with pytest.raises(InvalidProviderKey) as info:
        await integ.add_connection("gogle", "default")
    assert "'google'" in info.value.message


async def test_unknown_provider_without_a_close_key_says_what_keys_look_like(
    integ: Integrations,
) -> None:
    # A key shaped like one is simply not registered; any other shape gets the rule.
    with pytest.raises(InvalidProviderKey) as info:
        await integ.add_connection("zzqqxx", "default")
    assert "Did you mean" not in info.value.message
    assert "No registered provider has this key" in info.value.message
    with pytest.raises(InvalidProviderKey) as info:
        await integ.add_connection("ZZ QQ", "default")
    assert "lowercase" in info.value.message


@pytest.mark.parametrize("name", ["-work", "a b", "x" * 101])
async def test_name_error_states_the_rule_in_words(integ: Integrations, name: str) -> None:
    with pytest.raises(InvalidName) as info:
        await integ.add_connection("openai", name)
    message = info.value.message
    assert "letters, digits, '_' and '-', starting with a letter or digit" in message
    assert "at most 100 characters" in message
    assert "^" not in message and "[" not in message, "no regex in the message"
    assert repr(name[:40]) in message or repr(name[:40] + "…") in message


async def test_a_ref_where_a_uuid_is_wanted_is_echoed_with_the_way_out(
    integ: Integrations,
) -> None:
    with pytest.raises(InvalidUUID) as info:
        await integ.save_setup("openai:default", {"api_key": "sk-test-123456789"})
    message = info.value.message
    assert "'openai:default'" in message
    assert "uuid" in message
    assert "resolve_to_uuid('provider:name')" in message


async def test_a_long_value_is_cut_in_the_message(integ: Integrations) -> None:
    with pytest.raises(InvalidUUID) as info:
        await integ.is_connected("z" * 500)
    assert "z" * 40 + "…" in info.value.message
    assert "z" * 41 not in info.value.message


async def test_malformed_ref_says_the_expected_form(integ: Integrations) -> None:
    with pytest.raises(InvalidInput) as info:
        await integ.get_credentials("Open AI:default")
    assert "'Open AI:default'" in info.value.message
    assert "'provider:name'" in info.value.message


async def test_wrong_format_says_the_expected_form(integ: Integrations) -> None:
    conn = await integ.add_connection("twilio", "default")
    with pytest.raises(InvalidField) as info:
        await integ.save_setup(conn.uuid, {"account_sid": "AC12", "auth_token": "t" * 32})
    message = info.value.message
    assert "'account_sid'" in message
    assert "'AC12'" in message
    assert "32 hexadecimal digits" in message


async def test_write_without_keys_is_one_plain_sentence(fresh_db: str) -> None:
    async with Integrations(fresh_db) as keyless:
        conn = await keyless.add_connection("openai", "default")
        with pytest.raises(EncryptionNotConfigured) as info:
            await keyless.save_setup(conn.uuid, {"api_key": "sk-test-123456789"})
    message = info.value.message
    assert "`" not in message and "\n" not in message and "  " not in message
    assert "keys=" in message and "INTEGRATIONS_KEYS" in message
    assert "sk-test" not in message


# -- the driver's reason ------------------------------------------------------------------


async def open_error(dsn: str) -> StorageError:
    with pytest.raises(StorageError) as info:
        async with Integrations(dsn, keys=TEST_KEY):
            pass
    return info.value


async def test_missing_database_names_it(admin_dsn: str) -> None:
    error = await open_error(_with_database(admin_dsn, "integrations_nope"))
    assert 'database "integrations_nope" does not exist' in error.message
    assert "Create the database" in error.message


async def test_refused_connection_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = await open_error(f"postgresql://app:hunter2-secret@127.0.0.1:{port}/app")
    assert "connection refused" in error.message
    assert "host and port" in error.message
    assert "hunter2-secret" not in error.message


async def test_sqlalchemy_dsn_says_to_drop_the_driver() -> None:
    error = await open_error("postgresql+asyncpg://app:hunter2-secret@127.0.0.1/app")
    assert "drop '+asyncpg'" in error.message
    assert "hunter2-secret" not in error.message


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://app:s3cret@db/app", "postgresql://app:***@db/app"),
        ("got 'postgresql+asyncpg://u:p%40ss@h:5/d'", "got 'postgresql+asyncpg://u:***@h:5/d'"),
        ("host=db password=s3cret user=app", "host=db password=*** user=app"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
    ],
)
def test_passwords_in_dsns_are_masked(text: str, masked: str) -> None:
    assert mask_dsn(text) == masked


async def test_a_port_that_is_not_a_number_is_named_without_contacting_anyone() -> None:
    error = await open_error("postgresql://postgres:pw@127.0.0.1:notaport/x")
    assert "port is not a number" in error.message
    assert "pw" not in error.message


async def test_a_bad_dsn_option_is_quoted_without_driver_markup() -> None:
    error = await open_error("postgresql://postgres@127.0.0.1:5432/x?sslmode=bogus")
    assert "sslmode" in error.message and "`" not in error.message


async def test_an_uppercase_provider_in_a_ref_suggests_the_lowercase_key(
    integ: Integrations,
) -> None:
    with pytest.raises(InvalidInput, match=r"did you mean 'openai'\?"):
        await integ.get_credentials("OpenAI")
    with pytest.raises(InvalidInput, match=r"did you mean 'openai:Work'\?"):
        await integ.get_credentials("OpenAI:Work")


async def test_saving_to_a_uuid_that_resolves_to_nothing_names_it(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.remove_connection(conn.uuid)
    with pytest.raises(NotConfigured) as info:
        await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    assert conn.uuid in info.value.message and "add_connection()" in info.value.message


async def test_messages_say_what_to_do_instead(integ: Integrations) -> None:
    from integrations import AlreadyExists

    conn = await integ.add_connection("openai", "m1")
    with pytest.raises(AlreadyExists, match=r"^An openai connection named 'm1'"):
        await integ.add_connection("openai", "m1")
    with pytest.raises(InvalidProviderKey, match=r"'openai'.*save_setup"):
        await integ.begin_authorization(conn.uuid, "https://app.example/cb")
    with pytest.raises(InvalidProviderKey, match="get_credentials"):
        await integ.access_token(conn.uuid)
    with pytest.raises(InvalidInput, match=r"\['connected', 'disconnected'\]"):
        integ.subscribe(kinds="connected")
    with pytest.raises(InvalidInput, match=r"code= \(or error=\)"):
        await integ.complete_authorization("some-state")
