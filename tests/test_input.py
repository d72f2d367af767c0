"""Unit tests of the hostile-input validators (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from integrations._errors import InvalidAttrs, InvalidInput
from integrations._input import (
    EARLIEST_TIME,
    LATEST_TIME,
    MAX_ATTRS_BYTES,
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    check_attrs,
    check_header_value,
    check_method,
    check_secret_text,
    check_text,
    check_timestamp,
    has_bad_chars,
    parse_timestamp,
)

SECRET = "sk-do-not-echo-0123456789"


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def test_documented_bounds() -> None:
    assert MAX_DEPTH == 32
    assert MAX_ATTRS_BYTES == 64 * 1024
    assert MAX_SAFE_INTEGER == 2**53 - 1


@pytest.mark.parametrize("text", ["a\x00b", "\ud800", "x\udfffy", "\x00"])
def test_nul_and_lone_surrogates_are_bad(text: str) -> None:
    assert has_bad_chars(text)
    with pytest.raises(InvalidInput) as info:
        check_text(text, "owner")
    assert info.value.code == "invalid"
    assert "owner" in info.value.message


@pytest.mark.parametrize("text", ["", "plain", "ünïcödé 😀", "tab\there", "\U0010ffff"])
def test_ordinary_text_passes(text: str) -> None:
    assert not has_bad_chars(text)
    assert check_text(text, "owner") == text


def test_check_text_refuses_non_strings_with_the_chosen_error() -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_text(5, "state", error=InvalidAttrs)
    assert info.value.code == "invalid_attrs", info.value


def test_attrs_at_the_depth_bound_pass_and_one_deeper_is_refused() -> None:
    # The top-level value counts as level 1.
    assert check_attrs({"a": nested(MAX_DEPTH - 1)})
    with pytest.raises(InvalidAttrs) as info:
        check_attrs({"a": nested(MAX_DEPTH)})
    assert "nested deeper" in info.value.message
    assert info.value.context["field"].startswith("a")


def test_very_deep_attrs_are_refused_without_recursion_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidAttrs) as info:
        check_attrs({"a": deep})
    assert info.value.code == "invalid_field", info.value


@pytest.mark.parametrize(
    "number",
    [MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1, 10**5000],
    ids=["above", "below", "huge"],
)
def test_integers_outside_the_json_safe_range_are_refused(number: int) -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_attrs({"n": [number]})
    assert info.value.context["field"] == "n"


def test_integers_at_the_json_safe_bound_pass() -> None:
    attrs = {"n": MAX_SAFE_INTEGER, "m": -MAX_SAFE_INTEGER, "b": True}
    assert check_attrs(attrs) == attrs


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused(number: float) -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_attrs({"f": {"g": number}})
    assert info.value.code == "invalid_field", info.value


def test_attrs_larger_than_the_bound_are_refused_and_the_bound_is_configurable() -> None:
    attrs = {"blob": "x" * MAX_ATTRS_BYTES}
    with pytest.raises(InvalidAttrs) as info:
        check_attrs(attrs)
    assert str(MAX_ATTRS_BYTES) in info.value.message
    assert check_attrs(attrs, max_bytes=2 * MAX_ATTRS_BYTES) == attrs
    with pytest.raises(InvalidAttrs) as raised:
        check_attrs({"a": "é" * 60}, max_bytes=100)
    assert raised.value.code == "invalid_attrs", raised.value


@pytest.mark.parametrize(
    ("attrs", "code"),
    [
        # A bad key is a fault of the mapping; a bad value is the fault of its field.
        ({"k\x00": 1}, "invalid_attrs"),
        ({"\ud800": 1}, "invalid_attrs"),
        ({"a": {"k\x00": 1}}, "invalid_attrs"),
        ({"a": ["x", {"\udc00": 1}]}, "invalid_attrs"),
        ({"a": "v\x00"}, "invalid_field"),
        ({"a": ["\ud83d"]}, "invalid_field"),
        ({5: 1}, "invalid_attrs"),
        ({"a": {5: 1}}, "invalid_attrs"),
        ({"a": {1, 2}}, "invalid_field"),
        ({"a": object()}, "invalid_field"),
    ],
)
def test_bad_keys_and_values_are_refused_at_any_depth(attrs: dict[Any, Any], code: str) -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_attrs(attrs)
    assert info.value.code == code, info.value


def test_check_attrs_refuses_a_non_mapping() -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_attrs(["a"])
    assert info.value.code == "invalid_attrs", info.value


@pytest.mark.parametrize(
    "attrs",
    [
        {"$enc": 1},
        {"api_key": {"$enc": 1, "kid": "deadbeef", "n": "AA==", "ct": "AA=="}},
        {"credentials": {"password": {"$enc": 1.0}}},
        {"x": [{"y": {"$enc": "1"}}]},
    ],
)
def test_envelope_marker_is_refused_at_any_depth(attrs: dict[str, Any]) -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_attrs(attrs)
    assert "reserved" in info.value.message
    assert "deadbeef" not in info.value.message


def test_check_attrs_returns_plain_json_copies() -> None:
    assert check_attrs({"a": ("x", {"b": None}), "c": 1.5}) == {"a": ["x", {"b": None}], "c": 1.5}


def test_errors_never_echo_the_value() -> None:
    for attrs in ({"k": SECRET + "\x00"}, {"k": [SECRET, float("nan")]}):
        with pytest.raises(InvalidAttrs) as info:
            check_attrs(attrs)
        assert SECRET not in str(info.value)


@pytest.mark.parametrize("value", ["a\x0bb", "line\nbreak", "cr\r", "tab\t", "del\x7f", "\x00"])
def test_control_characters_in_secrets_are_refused_without_echo(value: str) -> None:
    with pytest.raises(InvalidAttrs) as info:
        check_secret_text(SECRET + value, "api_key")
    assert info.value.context["field"] == "api_key"
    assert SECRET not in str(info.value)


def test_ordinary_secrets_pass() -> None:
    assert check_secret_text(SECRET + " ü", "api_key") == SECRET + " ü"


@pytest.mark.parametrize("method", ["GET", "post", "PROPFIND", "M-SEARCH", "x!#$%&'*+.^_`|~"])
def test_token_methods_pass(method: str) -> None:
    assert check_method(method) == method


@pytest.mark.parametrize("method", ["", "GÉT", "GET ", "G\x00T", "\ud800", "GE(T", "GET\r\n", 5])
def test_non_token_methods_are_refused(method: object) -> None:
    with pytest.raises(InvalidInput) as info:
        check_method(method)
    assert info.value.code == "invalid", info.value


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "\x00", "\x0b", "\ud800", "\x7f"])
def test_header_values_with_controls_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_header_value(value, "X-Thing")
    assert "X-Thing" in info.value.message


def test_header_values_may_hold_tabs_and_non_ascii() -> None:
    assert check_header_value("a\tb é", "X") == "a\tb é"


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00+00:00",
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:01:00-14:00",
    ],
)
def test_far_past_timestamps_clamp_without_overflow(text: str) -> None:
    moment = parse_timestamp(text)
    assert moment == EARLIEST_TIME
    assert moment is not None
    moment - timedelta(days=365)  # room for any leeway arithmetic


@pytest.mark.parametrize(
    "text", ["9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59+14:00"]
)
def test_far_future_timestamps_clamp_without_overflow(text: str) -> None:
    moment = parse_timestamp(text)
    assert moment == LATEST_TIME
    assert moment is not None
    moment + timedelta(days=365)


def test_ordinary_timestamps_parse_to_utc() -> None:
    moment = parse_timestamp("2030-05-01T12:00:00+02:00")
    assert moment == datetime(2030, 5, 1, 10, tzinfo=UTC)
    assert moment is not None and moment.utcoffset() == timedelta(0)
    aware = datetime(2030, 5, 1, tzinfo=timezone(timedelta(hours=-3)))
    assert parse_timestamp(aware) == aware


@pytest.mark.parametrize(
    "value", ["not a date", "2030-05-01T12:00:00", "2030\x00", "\ud800", 1700000000, None]
)
def test_unreadable_or_naive_timestamps_are_none(value: object) -> None:
    assert parse_timestamp(value) is None


def test_check_timestamp_refuses_out_of_range_and_unreadable_values() -> None:
    assert check_timestamp("2030-01-01T00:00:00Z", "expires_at") == datetime(2030, 1, 1, tzinfo=UTC)
    for value in ("0001-01-01T00:00:00+00:00", "9999-12-31T00:00:00+00:00", "soon", None):
        with pytest.raises(InvalidInput) as info:
            check_timestamp(value, "expires_at")
        assert info.value.context["field"] == "expires_at"
