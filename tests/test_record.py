"""Status transitions as pure functions: no database, no network."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from integrations import MissingField, ReauthRequired, TokenRequestFailed, oauth
from integrations import _record as record
from integrations._record import StoredRow

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
UUID = "01900000-0000-7000-8000-000000000001"


def row(status: str = "disconnected", **data: Any) -> StoredRow:
    base = {"provider": "openai", "name": "default", "auth_type": "api_key", "status": status}
    return StoredRow(UUID, "user:1", "integration:openai:default", {**base, **data}, 3)


def seal(field: str, value: Any) -> Any:
    return f"sealed:{field}:{value}"


def kinds(done: record.Transition) -> list[str]:
    return [e.kind for e in done.change.events]


def save(before: StoredRow, patch: dict[str, Any], *, runtime: bool = True) -> record.Transition:
    return record.setup_saved(
        before,
        patch,
        fields=patch,
        credential_fields={"api_key"},
        missing=lambda data: [] if data.get("api_key") else ["api_key"],
        runtime=lambda data: runtime and bool(data.get("api_key")),
        oauth_code_flow=False,
        actor="admin",
    )


def test_added_is_disconnected_with_an_event() -> None:
    done = record.added(UUID, None, "openai", "api_key", "work", "admin")
    assert done.row.key == "integration:openai:work"
    assert done.row.data["status"] == "disconnected"
    assert kinds(done) == ["connection_added"]
    assert done.change.events[0].actor == "admin"


def test_renamed_rewrites_the_key_and_keeps_the_uuid() -> None:
    done = record.renamed(row("connected"), "work", None)
    assert done.row.uuid == UUID and done.row.key == "integration:openai:work"
    assert done.change.key == "integration:openai:work"
    assert done.change.events[0].detail == {"old_name": "default", "new_name": "work"}


def test_renamed_to_the_same_name_changes_nothing() -> None:
    done = record.renamed(row(), "default", None)
    assert done.change.data is None and done.change.events == []


def test_removed_deletes_with_an_event() -> None:
    done = record.removed(row("connected"), "admin")
    assert done.change.delete and kinds(done) == ["connection_removed"]
    assert done.change.events[0].previous_status == "connected"


def test_saving_a_key_connects() -> None:
    done = save(row(), {"api_key": "sealed"})
    assert done.row.data["status"] == "connected"
    assert kinds(done) == ["setup_saved"]
    assert done.change.events[0].previous_status == "disconnected"


def test_a_missing_required_field_is_refused() -> None:
    with pytest.raises(MissingField):
        save(row(), {"organization": "org-1"})


def test_new_credentials_after_an_error_are_connected_and_unchecked() -> None:
    failed = row("error", api_key="old", validation_status="Invalid credentials")
    failed.data["last_ok_at"] = NOW.isoformat()
    done = save(failed, {"api_key": "new"})
    assert done.row.data["status"] == "connected"
    assert "validation_status" not in done.row.data
    assert "last_ok_at" not in done.row.data


def test_other_setup_after_an_error_keeps_the_error() -> None:
    failed = row("error", api_key="old", validation_status="Invalid credentials")
    done = save(failed, {"organization": "org-1"})
    assert done.row.data["status"] == "error"
    assert done.row.data["validation_status"] == "Invalid credentials"


def test_disconnected_drops_tokens_and_the_given_fields() -> None:
    done = record.disconnected(row("connected", api_key="k", access_token="t"), ["api_key"], None)
    assert "api_key" not in done.row.data and "access_token" not in done.row.data
    assert done.row.data["status"] == "disconnected"
    assert kinds(done) == ["disconnected"]


def test_a_passing_check_connects_and_records_when() -> None:
    done = record.validated(row("disconnected"), True, "Connected", NOW, actor=None)
    assert done.row.data["status"] == "connected"
    assert done.row.data["last_validated_at"] == NOW.isoformat()
    assert done.row.data["last_ok_at"] == NOW.isoformat()
    assert kinds(done) == ["validated"]


def test_a_pass_after_an_error_is_also_recovered() -> None:
    done = record.validated(row("error", validation_status="x"), True, "Connected", NOW, actor=None)
    assert kinds(done) == ["validated", "recovered"]


def test_the_same_outcome_again_rewrites_the_time_without_an_event() -> None:
    before = row("error", validation_status="Invalid credentials")
    done = record.validated(before, False, "Invalid credentials", NOW, actor=None)
    assert done.row.data["last_validated_at"] == NOW.isoformat()
    assert done.change.events == []


def test_a_stale_check_only_records_the_time() -> None:
    before = row("connected", validation_status="Connected")
    done = record.validated(before, False, "Invalid credentials", NOW, actor=None, stale=True)
    assert done.row.data["status"] == "connected"
    assert done.row.data["last_validated_at"] == NOW.isoformat()
    assert done.change.events == []


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (True, (True, "ok")),
        ("ok", (True, "ok")),
        (False, (False, "Validation failed")),
        (("error", "boom"), (False, "boom")),
        ((False, "nope"), (False, "nope")),
        (ValueError("x"), (False, "ValueError")),
        ("Invalid credentials", (False, "Invalid credentials")),
    ],
)
def test_validation_outcome_accepts_the_seed_shapes(result: Any, expected: Any) -> None:
    assert record.validation_outcome(result) == expected


def test_validation_outcome_refuses_nul() -> None:
    with pytest.raises(ValueError) as info:
        record.validation_outcome((False, "bad\x00message"))
    assert info.value.code == "invalid", info.value


def tokens(**kw: Any) -> oauth.TokenSet:
    return oauth.TokenSet(
        access_token=kw.get("access_token", "at"),
        refresh_token=kw.get("refresh_token"),
        scope=kw.get("scope", ("a",)),
        obtained_at=NOW,
    )


def test_tokens_issued_connects_a_new_grant() -> None:
    before = row("error", validation_status="x", refresh_error={"id": "1"}, refresh_token="old")
    done = record.tokens_issued(
        before, tokens(), seal=seal, account={"email": "a@b"}, now=NOW, actor="u"
    )
    data = done.row.data
    assert data["status"] == "connected" and data["reauth_required"] is False
    assert data["access_token"] == "sealed:access_token:at"
    assert "refresh_token" not in data  # a new grant without one drops the old
    assert "refresh_error" not in data and "validation_status" not in data
    assert data["account"] == {"email": "a@b"}
    assert kinds(done) == ["connected"]


def test_refreshed_keeps_the_refresh_token_when_none_comes_back() -> None:
    before = row("connected", refresh_token="sealed:refresh_token:r1")
    done = record.refreshed(before, tokens(), seal=seal, previous_refresh_token="r1")
    assert done.row.data["refresh_token"] == "sealed:refresh_token:r1"
    assert kinds(done) == ["token_refreshed"]


def test_refreshed_after_an_error_is_recovered() -> None:
    before = row("error", validation_status="x")
    done = record.refreshed(
        before, tokens(refresh_token="r2"), seal=seal, previous_refresh_token="r1"
    )
    assert done.row.data["refresh_token"] == "sealed:refresh_token:r2"
    assert kinds(done) == ["recovered", "token_refreshed"]
    assert "validation_status" not in done.row.data


def test_a_terminal_refresh_failure_requires_reauthorization() -> None:
    done = record.refresh_failed(
        row("connected"), ReauthRequired("revoked"), NOW, cooldown=lambda n, r: 5.0
    )
    data = done.row.data
    assert data["status"] == "error" and data["reauth_required"] is True
    assert "retry_at" not in data["refresh_error"]
    assert kinds(done) == ["refresh_failed"]


def test_a_transient_failure_sets_a_cool_down_and_counts() -> None:
    exc = TokenRequestFailed("down", transient=True)
    first = record.refresh_failed(row("connected"), exc, NOW, cooldown=lambda n, r: 5.0 * n)
    second = record.refresh_failed(first.row, exc, NOW, cooldown=lambda n, r: 5.0 * n)
    assert second.row.data["refresh_error"]["failures"] == 2
    assert second.row.data["refresh_error"]["retry_at"] == "2030-01-02T03:04:15+00:00"
    # The same failure again is not news.
    assert second.change.events == []


def test_status_and_event_kinds_are_closed_sets() -> None:
    from integrations._models import EVENT_KINDS

    assert {"connected", "disconnected", "error"} == record.STATUSES
    assert set(record.EventKind.__args__) == set(EVENT_KINDS)  # type: ignore[attr-defined]
