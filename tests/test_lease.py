"""Refresh lease decisions as pure functions: no database, no network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from integrations import ReauthRequired, TokenRequestFailed, oauth
from integrations import _lease as lease
from integrations._client_auth import CLIENT_AUTH_METHODS, Client, client_auth_method
from integrations._record import StoredRow
from integrations._settings import TokenPolicy

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
UUID = "01900000-0000-7000-8000-000000000001"
POLICY = TokenPolicy()


def at(seconds: float) -> str:
    return (NOW + timedelta(seconds=seconds)).isoformat()


def row(version: int = 7, **data: Any) -> StoredRow:
    base = {"provider": "acme", "name": "default", "auth_type": "oauth2", "status": "connected"}
    return StoredRow(UUID, "user:1", "integration:acme:default", {**base, **data}, version)


def plain(**data: Any) -> dict[str, Any]:
    return {"access_token": "old", "refresh_token": "r1", "expires_at": at(30), **data}


def need(mode: lease.Mode = "expiring", token: str | None = "old", since: datetime = NOW) -> Any:
    return lease.Need(lease.Seen(token, None), mode, since)


def look(
    stored: StoredRow, secrets: dict[str, Any], wanted: Any, rotates: bool = True, **policy: Any
) -> Any:
    settings = {"write_retry" if k == "token_write_retry" else k: v for k, v in policy.items()}
    return lease.look(
        stored,
        secrets,
        wanted,
        holder="me",
        now=NOW,
        clock=NOW,
        policy=TokenPolicy(**settings) if settings else POLICY,
        rotates=rotates,
    )


def seal(field: str, value: Any) -> Any:
    return f"sealed:{field}:{value}"


# -- look ----------------------------------------------------------------------------------


def test_a_token_that_is_not_due_is_handed_out_and_nothing_is_written() -> None:
    change, decided = look(row(), plain(expires_at=at(3600)), need())
    assert decided.outcome == "old"
    assert change.data is None and decided.lease is None


def test_a_token_another_process_stored_meanwhile_is_handed_out() -> None:
    _, decided = look(row(), plain(access_token="new"), need(mode="rejected"))
    assert decided.outcome == "new"


def test_a_forced_refresh_takes_a_token_obtained_after_its_call_began() -> None:
    stored = row(token_obtained_at=at(1))
    _, decided = look(stored, plain(), need(mode="force"))
    assert decided.outcome == "old"
    _, decided = look(row(token_obtained_at=at(-1)), plain(), need(mode="force"))
    assert decided.lease is not None


def test_a_due_token_takes_the_lease_fenced_by_the_next_version() -> None:
    change, decided = look(row(version=7), plain(), need())
    taken = decided.lease
    assert taken is not None and taken.fence == 8 and taken.holder == "me"
    written = change.data["refresh_lease"]
    assert written["holder"] == "me" and written["fence"] == 8
    assert written["until"] == at(POLICY.lease)
    assert taken.held_in(change.data)
    # The token still works for 30 s: it is the fallback if the request fails.
    assert decided.fallback == "old" and decided.taken_from is None


def test_an_expired_token_has_no_fallback() -> None:
    _, decided = look(row(), plain(expires_at=at(-1)), need())
    assert decided.lease is not None and decided.fallback is None


def test_a_live_lease_of_another_holder_is_waited_for_until_it_ends() -> None:
    held = {"holder": "other", "fence": 3, "until": at(4)}
    change, decided = look(row(refresh_lease=held), plain(), need())
    assert decided.wait == pytest.approx(4.0)
    assert change.data is None and decided.lease is None


def test_an_expired_lease_is_taken_over_and_its_holder_named() -> None:
    held = {"holder": "other", "fence": 3, "until": at(-1)}
    _, decided = look(row(refresh_lease=held), plain(), need())
    assert decided.lease is not None and decided.taken_from == "other"


def test_an_expired_lease_that_sent_nothing_is_taken_over_under_either_policy() -> None:
    held = {"holder": "other", "fence": 3, "until": at(-1)}
    for takeover in ("refresh", "reauthorize"):
        _, decided = look(row(refresh_lease=held), plain(), need(), takeover=takeover)
        assert decided.lease is not None and decided.taken_from == "other"


MARKED = {"holder": "other", "fence": 3, "until": at(-1), "sending": at(-2)}


def test_a_marked_lease_is_waited_for_while_its_holder_may_still_write() -> None:
    change, decided = look(
        row(refresh_lease=MARKED), plain(expires_at=at(-1)), need(), token_write_retry=10
    )
    assert decided.wait == pytest.approx(9.0) and change.data is None
    # A caller whose token still works gets it meanwhile.
    _, decided = look(row(refresh_lease=MARKED), plain(), need(), token_write_retry=10)
    assert decided.outcome == "old"


def test_after_the_wait_a_rotating_provider_is_marked_never_sent_the_spent_token() -> None:
    change, decided = look(
        row(refresh_lease=MARKED), plain(expires_at=at(-1)), need(), token_write_retry=0.5
    )
    assert isinstance(decided.outcome, ReauthRequired)
    assert "other" in decided.outcome.message and "authorized again" in decided.outcome.message
    assert decided.lease is None and decided.taken_from == "other"
    # Kept, marked abandoned: the holder that comes back may still store its answer.
    assert change.data["refresh_lease"] == {**MARKED, "abandoned": True}
    assert change.data["refresh_error"]["code"] == "reauth_required"


def test_after_the_wait_a_provider_that_does_not_rotate_is_asked_again() -> None:
    _, decided = look(
        row(refresh_lease=MARKED),
        plain(expires_at=at(-1)),
        need(),
        rotates=False,
        token_write_retry=0.5,
    )
    assert decided.lease is not None and decided.taken_from == "other"
    # ... unless every provider is treated as rotating.
    _, decided = look(
        row(refresh_lease=MARKED),
        plain(expires_at=at(-1)),
        need(),
        rotates=False,
        token_write_retry=0.5,
        takeover="reauthorize",
    )
    assert isinstance(decided.outcome, ReauthRequired)


def test_the_sending_mark_is_written_only_under_a_held_lease() -> None:
    taken, stored = held_row()
    change, kept = lease.sending(taken, stored, NOW, 15)
    assert kept
    assert change.data["refresh_lease"]["sending"] == NOW.isoformat()
    assert change.data["refresh_lease"]["until"] == at(15)
    # Renewals keep the mark.
    renewed, _ = lease.renewed(taken, StoredRow(UUID, "u", "k", change.data, 9), NOW, 15)
    assert renewed.data["refresh_lease"]["sending"] == NOW.isoformat()
    other = row(9, refresh_lease={"holder": "other", "fence": 9, "until": at(5)})
    assert lease.sending(taken, other, NOW, 15) == (lease.Change(), False)


def test_an_abandoned_lease_is_taken_without_a_takeover() -> None:
    held = {"holder": "other", "fence": 3, "until": at(60), "abandoned": True}
    _, decided = look(row(refresh_lease=held), plain(), need(mode="force"))
    assert decided.lease is not None and decided.taken_from is None


def test_a_recorded_failure_holds_automatic_refreshes_back_until_retry_at() -> None:
    failure = {"id": "f1", "code": "token_request_failed", "message": "down", "retry_at": at(5)}
    stored = row(refresh_error=failure)
    wanted = lease.Need(lease.Seen("old", "f1"), "rejected", NOW)
    _, decided = look(stored, plain(expires_at=at(-1)), wanted)
    assert isinstance(decided.outcome, TokenRequestFailed)
    # A forced refresh asks anyway.
    forced = lease.Need(lease.Seen("old", "f1"), "force", NOW)
    _, decided = look(stored, plain(), forced)
    assert decided.lease is not None


def test_a_failure_recorded_while_a_caller_waited_is_its_answer() -> None:
    failure = {"id": "f2", "code": "reauth_required", "message": "dead"}
    _, decided = look(row(refresh_error=failure), plain(), need(mode="force"))
    assert isinstance(decided.outcome, ReauthRequired)
    assert decided.outcome.message == "dead"


# -- renew, release, fail --------------------------------------------------------------------


def held_row(**data: Any) -> tuple[lease.Lease, StoredRow]:
    taken = lease.Lease(UUID, "me", 8, NOW)
    return taken, row(8, refresh_lease={"holder": "me", "fence": 8, "until": at(1)}, **data)


def test_a_held_lease_is_renewed_from_the_database_clock() -> None:
    taken, stored = held_row()
    change, kept = lease.renewed(taken, stored, NOW, 15)
    assert kept and change.data["refresh_lease"]["until"] == at(15)


def test_a_lease_taken_over_is_neither_renewed_nor_released() -> None:
    taken, _ = held_row()
    other = row(9, refresh_lease={"holder": "other", "fence": 9, "until": at(5)})
    assert lease.renewed(taken, other, NOW, 15) == (lease.Change(), False)
    assert lease.released(taken, other).data is None
    assert lease.released(taken, None).data is None


def test_a_released_lease_leaves_the_row() -> None:
    taken, stored = held_row()
    assert "refresh_lease" not in lease.released(taken, stored).data


def test_a_failure_ends_the_lease_and_keeps_a_rotated_refresh_token() -> None:
    taken, stored = held_row()
    exc = TokenRequestFailed("bad answer", transient=False)
    change = lease.failed(taken, stored, plain(), "r1", exc, NOW, POLICY, seal)
    assert "refresh_lease" not in change.data
    assert change.data["refresh_error"]["code"] == "token_request_failed"
    try:
        oauth.parse_token_response(
            200,
            {"access_token": "bad\nvalue", "refresh_token": "r2"},
            now=NOW,
            requested_scopes=(),
            previous_refresh_token="r1",
        )
    except TokenRequestFailed as refused:
        change = lease.failed(taken, stored, plain(), "r1", refused, NOW, POLICY, seal)
    assert change.data["refresh_token"] == "sealed:refresh_token:r2"


def test_a_failure_after_a_takeover_records_nothing() -> None:
    taken, _ = held_row()
    other = row(9, refresh_lease={"holder": "other", "fence": 9, "until": at(5)})
    exc = TokenRequestFailed("down", transient=True)
    assert lease.failed(taken, other, plain(), "r1", exc, NOW, POLICY, seal).data is None


def test_a_failure_after_a_new_grant_only_ends_the_lease() -> None:
    taken, stored = held_row()
    exc = ReauthRequired("refused")
    change = lease.failed(taken, stored, plain(refresh_token="g2"), "r1", exc, NOW, POLICY, seal)
    assert change.data is not None and "refresh_lease" not in change.data
    assert "refresh_error" not in change.data and change.events == []


# -- storing an answer -----------------------------------------------------------------------


def tokens(access: str = "new", refresh: str | None = "r2", obtained: datetime = NOW) -> Any:
    return oauth.TokenSet(access_token=access, refresh_token=refresh, obtained_at=obtained)


def test_an_answer_is_stored_while_the_lease_and_refresh_token_are_unchanged() -> None:
    taken, stored = held_row()
    change, done = lease.written(taken, stored, plain(), tokens(), "r1", seal)
    assert done.stored and not done.gone and done.token == "new"
    assert change.data["access_token"] == "sealed:access_token:new"
    assert change.data["refresh_token"] == "sealed:refresh_token:r2"
    assert "refresh_lease" not in change.data


def test_a_fenced_out_answer_is_not_stored_and_newer_tokens_win() -> None:
    taken, _ = held_row()
    other = row(9, refresh_lease={"holder": "other", "fence": 9, "until": at(5)})
    change, done = lease.written(taken, other, plain(refresh_token="r9"), tokens(), "r1", seal)
    assert change.data is None
    assert (done.stored, done.newer, done.token) == (False, True, "old")


def test_a_fenced_out_answer_newer_than_the_row_serves_its_process() -> None:
    taken, _ = held_row()
    other = row(9, refresh_lease={"holder": "other", "fence": 9, "until": at(5)})
    change, done = lease.written(taken, other, plain(), tokens(), "r1", seal)
    assert change.data is None
    assert (done.stored, done.newer, done.gone, done.token) == (False, False, False, "new")


def test_an_answer_after_a_new_grant_is_not_stored_but_its_lease_ends() -> None:
    taken, stored = held_row()
    granted = plain(access_token="g-access", refresh_token="g2")
    change, done = lease.written(taken, stored, granted, tokens(), "r1", seal)
    assert change.data is not None and "refresh_lease" not in change.data
    assert change.data.get("access_token") == stored.data.get("access_token")
    assert (done.stored, done.newer, done.token) == (False, True, "g-access")


def test_lost_tokens_mark_the_connection_only_while_the_spent_token_is_stored() -> None:
    _, stored = held_row()
    change = lease.spent(stored, plain(), "r1", NOW, POLICY)
    assert change.data["refresh_error"]["code"] == "reauth_required"
    assert "refresh_lease" not in change.data
    assert lease.spent(stored, plain(refresh_token="r9"), "r1", NOW, POLICY).data is None


def test_due_keeps_at_most_half_the_lifetime_as_leeway() -> None:
    short = {"expires_at": at(40), "token_obtained_at": at(-20)}
    assert not lease.due(short, NOW, 60)  # 60 s lifetime: due only in its last 30 s
    assert lease.due({"expires_at": at(30)}, NOW, 60)
    assert not lease.due({}, NOW, 60)


# -- client authentication ------------------------------------------------------------------


def test_each_client_auth_method_is_registered_by_its_name() -> None:
    assert sorted(CLIENT_AUTH_METHODS) == [
        "client_secret_basic",
        "client_secret_post",
        "none",
        "private_key_jwt",
    ]
    with pytest.raises(ValueError, match="client_secret_jwt"):
        client_auth_method("client_secret_jwt")


def test_a_client_needs_an_id_and_the_secret_its_method_needs() -> None:
    with pytest.raises(ValueError, match="client_id"):
        Client("", "s", client_auth_method("none"))
    with pytest.raises(ValueError, match="needs a client_secret"):
        Client("id", None, client_auth_method("client_secret_basic"))
    public = Client("id", None, client_auth_method("none"))
    _, headers, body = public.prepare("https://idp.example/token", "grant_type=x")
    assert "client_id=id" in body and "Authorization" not in headers
    assert "s3cret" not in repr(Client("id", "s3cret", client_auth_method("client_secret_post")))


def test_basic_client_auth_puts_the_secret_in_the_header_not_the_body() -> None:
    client = Client("id", "s3cret", client_auth_method("client_secret_basic"))
    _, headers, body = client.prepare("https://idp.example/token", "grant_type=x")
    assert headers["Authorization"].startswith("Basic ")
    assert "s3cret" not in body


# -- exact comparisons -----------------------------------------------------------------------


def fresh(value: str) -> str:
    """An equal string that is not the same object (as values read from storage are)."""
    return "".join(list(value))


def test_text_is_a_non_empty_string_or_none() -> None:
    assert lease.text("a") == "a"
    assert lease.text("") is None and lease.text(5) is None and lease.text(None) is None


def test_a_token_is_usable_until_the_instant_it_expires() -> None:
    assert lease.usable("t", {"expires_at": at(1)}, NOW)
    assert not lease.usable("t", {"expires_at": at(0)}, NOW)
    assert lease.usable("t", {}, NOW)
    assert not lease.usable(None, {}, NOW)


def test_a_recorded_failure_stands_for_its_own_kind_of_error() -> None:
    auth = lease.recorded_error({"code": fresh("reauth_required"), "message": "m"}, {})
    assert isinstance(auth, ReauthRequired)
    # A code that sorts before reauth_required is no reauthorization.
    other = lease.recorded_error({"code": "invalid_grant", "message": "m"}, {})
    assert isinstance(other, TokenRequestFailed) and not isinstance(other, ReauthRequired)


def test_a_recorded_failure_without_a_message_takes_the_status_or_a_default() -> None:
    status = {"validation_status": "Key revoked"}
    assert lease.recorded_error({"message": ""}, status).message == "Key revoked"
    assert lease.recorded_error({}, status).message == "Key revoked"
    default = "The token refresh failed"
    assert lease.recorded_error({}, {"validation_status": 5}).message == default
    assert lease.recorded_error({"message": ""}, {}).message == default


def test_only_a_pending_retry_at_holds_refreshes_back_and_a_terminal_failure_always() -> None:
    def failure(**fields: Any) -> dict[str, Any]:
        return {"refresh_error": {"id": "f", "code": "token_request_failed", **fields}}

    assert lease.held_back({}, NOW) is None
    assert lease.held_back(failure(), NOW) is None
    assert lease.held_back(failure(code="invalid_grant"), NOW) is None
    assert lease.held_back(failure(retry_at=at(-1)), NOW) is None
    assert lease.held_back(failure(retry_at=at(0)), NOW) is None
    assert isinstance(lease.held_back(failure(retry_at=at(1)), NOW), TokenRequestFailed)
    terminal = {"refresh_error": {"id": "f", "code": fresh("reauth_required")}}
    assert isinstance(lease.held_back(terminal, NOW), ReauthRequired)
    terminal["refresh_error"]["retry_at"] = at(-1)
    assert isinstance(lease.held_back(terminal, NOW), ReauthRequired)


@pytest.mark.parametrize(
    "stored",
    [
        {"holder": "me", "fence": 9},
        {"holder": "me", "fence": 7},
        {"holder": "zz", "fence": 8},
        {"holder": "aa", "fence": 8},
        {"fence": 8},
        None,
    ],
)
def test_a_lease_is_held_only_by_its_exact_holder_and_fence(stored: Any) -> None:
    taken = lease.Lease(UUID, "me", 8, NOW)
    assert not taken.held_in({"refresh_lease": stored})


def test_a_lease_is_held_by_an_equal_fence_read_back_from_storage() -> None:
    fence = int("1000001")
    taken = lease.Lease(UUID, "me", fence, NOW)
    assert taken.held_in({"refresh_lease": {"holder": fresh("me"), "fence": int("1000001")}})


def test_an_expiring_refresh_hands_out_a_token_stored_meanwhile_though_due() -> None:
    # Not a forced refresh: any token other than the one the caller saw will do.
    for stored in ("new", "aaa", "zzz"):
        change, decided = look(row(), plain(access_token=stored), need())
        assert decided.outcome == stored and change.data is None


def test_the_token_a_caller_saw_read_back_from_storage_is_refreshed() -> None:
    _, decided = look(row(), plain(access_token=fresh("old")), need(mode="rejected"))
    assert decided.lease is not None


def test_a_forced_refresh_takes_a_token_obtained_at_the_instant_its_call_began() -> None:
    _, decided = look(row(token_obtained_at=at(0)), plain(), need(mode="force"))
    assert decided.outcome == "old"


def test_a_failure_the_caller_saw_read_back_from_storage_is_not_news() -> None:
    failure = {"id": fresh("f1"), "code": "token_request_failed", "message": "down"}
    forced = lease.Need(lease.Seen("old", "f1"), "force", NOW)
    _, decided = look(row(refresh_error=failure), plain(), forced)
    assert decided.lease is not None


def test_a_due_token_is_held_back_by_a_pending_retry_at() -> None:
    failure = {"id": "f1", "code": "token_request_failed", "message": "down", "retry_at": at(5)}
    wanted = lease.Need(lease.Seen("old", "f1"), "expiring", NOW)
    _, decided = look(row(refresh_error=failure), plain(expires_at=at(-1)), wanted)
    assert isinstance(decided.outcome, TokenRequestFailed)


def test_a_lease_ending_now_is_taken_over() -> None:
    held = {"holder": "other", "fence": 3, "until": at(0)}
    _, decided = look(row(refresh_lease=held), plain(), need())
    assert decided.lease is not None and decided.taken_from == "other"


def test_the_wait_for_a_marked_lease_ends_at_its_instant() -> None:
    _, decided = look(
        row(refresh_lease=MARKED), plain(expires_at=at(-1)), need(), token_write_retry=1
    )
    assert isinstance(decided.outcome, ReauthRequired)


def test_providers_rotate_refresh_tokens_unless_told_otherwise() -> None:
    _, decided = lease.look(
        row(refresh_lease=MARKED),
        plain(expires_at=at(-1)),
        need(),
        holder="me",
        now=NOW,
        clock=NOW,
        policy=TokenPolicy(write_retry=0.5),
    )
    assert isinstance(decided.outcome, ReauthRequired)


def test_no_lease_is_marked_or_renewed_without_a_row_or_a_clock() -> None:
    taken, stored = held_row()
    for change in (lease.sending, lease.renewed):
        assert change(taken, None, NOW, 15) == (lease.Change(), False)
        assert change(taken, stored, None, 15) == (lease.Change(), False)


def test_an_answer_for_a_deleted_row_is_not_stored_and_not_newer() -> None:
    taken, _ = held_row()
    change, done = lease.written(taken, None, plain(), tokens(), "r1", seal)
    assert change.data is None
    assert (done.stored, done.newer, done.gone, done.token) == (False, False, True, "new")


@pytest.mark.parametrize(("obtained", "newer"), [(-1, False), (0, False), (1, True)])
def test_a_fenced_out_answer_is_newer_only_than_tokens_obtained_before_it(
    obtained: float, newer: bool
) -> None:
    taken, _ = held_row()
    other = row(9, refresh_lease={"holder": "o", "fence": 9}, token_obtained_at=at(obtained))
    _, done = lease.written(taken, other, plain(refresh_token=fresh("r1")), tokens(), "r1", seal)
    assert (done.stored, done.newer, done.token) == (False, newer, "old" if newer else "new")


def test_lost_tokens_mark_only_the_exact_spent_refresh_token() -> None:
    _, stored = held_row()
    assert lease.spent(stored, plain(refresh_token="r0"), "r1", NOW, POLICY).data is None
    change = lease.spent(stored, plain(refresh_token=fresh("r1")), "r1", NOW, POLICY)
    assert change.data["refresh_error"]["code"] == "reauth_required"


def test_tokens_stay_out_of_reprs() -> None:
    assert "s3cret" not in repr(lease.Look(fallback="s3cret"))
    assert "s3cret" not in repr(lease.Written(True, "s3cret"))


@pytest.mark.parametrize(
    "value",
    [
        lease.Seen("t", None),
        lease.Need(lease.Seen("t", None), "force", NOW),
        lease.Lease(UUID, "me", 1, NOW),
        lease.Look(),
        lease.Written(False, "t"),
    ],
)
def test_lease_values_are_immutable_and_slotted(value: Any) -> None:
    assert not hasattr(value, "__dict__")
    name = next(iter(type(value).__slots__))
    with pytest.raises(AttributeError):
        setattr(value, name, None)
