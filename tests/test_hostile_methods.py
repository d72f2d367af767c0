"""Every public method with hostile values in every parameter: an IntegrationsError or success.

Each parameter of each public method of ``Integrations`` and of an owner handle gets every
value of the families below in turn (the others keep a valid value): JSON-typed values,
huge and non-finite numbers, JSON nested to and past the parser's limit, strings with
controls, NUL, lone surrogates and envelope markers, and objects of the wrong type. A call
ends in success or in an ``IntegrationsError`` (whose ``InvalidArgument`` is also a
TypeError and ``InvalidInput`` a ValueError); a failed call changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from integrations import Integrations, IntegrationsError

from .conftest import TEST_KEY
from .test_hostile_input import REDIRECT, SECRET, SNAPSHOT, loopback, providers

# Methods whose job is the instance's lifecycle, not input: covered by test_lifecycle.
LIFECYCLE = {"open", "close", "migrate", "diagnose", "run_legacy_migrations"}
# Keyword options a method passes on (``**opts``), fuzzed like parameters.
OPTIONS = {"authenticated_request": ["json", "data", "params", "headers", "timeout"]}
# A call that is still running after this long took its input (a sweep, a login wait).
RUNNING = 0.1


def _deep_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _deep_dict(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


class _Weird:
    def __str__(self) -> str:
        raise RuntimeError("str() of a hostile object")

    def __repr__(self) -> str:
        raise RuntimeError("repr() of a hostile object")


def _families() -> dict[str, list[Callable[[], Any]]]:
    limit = sys.getrecursionlimit()
    return {
        "json": [
            lambda: None,
            lambda: True,
            lambda: False,
            lambda: 0,
            lambda: -1,
            lambda: 1.5,
            lambda: "",
            lambda: "x",
            lambda: [],
            lambda: {},
            lambda: ["a", 1],
            lambda: {"a": 1},
            lambda: {"api_key": SECRET},
        ],
        "numbers": [
            lambda: 2**31,
            lambda: 2**63,
            lambda: -(2**63),
            lambda: 10**400,
            lambda: 1e308,
            lambda: float("inf"),
            lambda: float("-inf"),
            lambda: float("nan"),
            lambda: timedelta.max,
            lambda: timedelta(days=-1),
        ],
        "nesting": [
            lambda: _deep_list(60),
            lambda: _deep_dict(limit - 40),
            lambda: _deep_list(limit * 2),
            lambda: _deep_dict(limit * 2),
            lambda: "[" * (limit * 4),
        ],
        "strings": [
            lambda: "\x00",
            lambda: "a\x00b",
            lambda: "\ud800",
            lambda: "\x1b]0;PWNED\x07\x1b[2J",
            lambda: "x" * 100_000,
            lambda: "hapi:default\n",
            lambda: "hapi:\x00",
            lambda: "user:\udfff",
            lambda: str(uuid_mod.uuid4()),
            lambda: "00000000-0000-0000-0000-000000000000",
            lambda: "$enc",
            lambda: {"$enc": 1, "kid": "deadbeef", "n": "AAAA", "ct": "AAAA"},
        ],
        "types": [
            lambda: b"bytes",
            lambda: bytearray(b"x"),
            lambda: object(),
            lambda: _Weird(),
            lambda: {1, 2},
            lambda: (x for x in range(3)),
            lambda: 5,
            lambda: ("hapi", "default", "extra"),
            lambda: [object()],
            lambda: {"k": object()},
            lambda: {object(): 1},
            lambda: print,
        ],
    }


@dataclass
class Tally:
    calls: int = 0
    successes: int = 0
    typed: int = 0
    escaped: list[str] = field(default_factory=list)
    by_family: dict[str, int] = field(default_factory=dict)


def _valid(name: str, w: dict[str, str]) -> Any:
    """A good value for a parameter, by its name."""
    table: dict[str, Any] = {
        "uuid": w["api"],
        "ref": w["api"],
        "value": w["api"],
        "provider": "hapi",
        "providers": ["hapi"],
        "name": "n" + uuid_mod.uuid4().hex[:8],
        "new_name": "n" + uuid_mod.uuid4().hex[:8],
        "attrs": {"limit": 3},
        "data": {"api_key": SECRET},
        "tokens": {"access_token": "at-imported"},
        "redirect_uri": REDIRECT,
        "url": w["base"] + "/x",
        "method": "GET",
        "state": "unknown-state",
        "code": "a-code",
        "result": True,
        "interval": 60,
        "stale_after": 60,
        "concurrency": 2,
        "batch_size": 10,
        "maxsize": 10,
        "limit": 5,
        "timeout": 0.2,
        "max_attempts": 1,
        "owner": "user:fuzz",
        "migrator": lambda integ: None,
        "endpoint_id": str(uuid_mod.uuid4()),
        "delivery_id": str(uuid_mod.uuid4()),
        "older_than": timedelta(days=365),
    }
    if name in table:
        return table[name]
    return inspect.Parameter.empty


async def _call(target: Any, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    fn = getattr(target, method)
    result = fn(*args, **kwargs)
    if method == "subscribe":
        async with result as events:
            return events
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        done, _ = await asyncio.wait({task}, timeout=RUNNING)
        if not done:
            # Took its input and is now at work (a sweep loop, a login wait).
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, IntegrationsError):
                await task
            return None
        return task.result()
    return result


async def _snapshot(db: asyncpg.Connection) -> list[Any]:
    return list(await db.fetch(SNAPSHOT))


async def _fuzz(integ: Integrations, db: asyncpg.Connection, w: dict[str, str]) -> Tally:
    tally = Tally()
    targets: list[tuple[str, Any, type]] = [
        ("Integrations", integ, Integrations),
        ("OwnerHandle", integ.for_owner("user:fuzz"), type(integ.for_owner("user:fuzz"))),
    ]
    families = _families()
    before = await _snapshot(db)
    for label, target, cls in targets:
        for method, function in inspect.getmembers(cls, callable):
            if method.startswith("_") or method in LIFECYCLE:
                continue
            signature = inspect.signature(function)
            params = [
                p
                for p in signature.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            ]
            params += [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                for name in OPTIONS.get(method, ())
            ]
            for hostile in params:
                for family, makers in families.items():
                    for make in makers:
                        args: list[Any] = []
                        kwargs: dict[str, Any] = {}
                        for p in params:
                            if p is hostile:
                                value = make()
                            else:
                                value = _valid(p.name, w)
                                if value is inspect.Parameter.empty:
                                    if p.default is inspect.Parameter.empty:
                                        raise AssertionError(f"no valid value for {p.name}")
                                    continue
                            if p.kind is p.POSITIONAL_OR_KEYWORD:
                                args.append(value)
                            else:
                                kwargs[p.name] = value
                        tally.calls += 1
                        tally.by_family[family] = tally.by_family.get(family, 0) + 1
                        where = f"{label}.{method}({hostile.name}=<{family}>)"
                        # Taken before every call: work an earlier call started (a sweep's
                        # check, a delivery) may still land, and is not this call's write.
                        before = await _snapshot(db)
                        try:
                            await _call(target, method, args, kwargs)
                        except IntegrationsError:
                            tally.typed += 1
                            after = await _snapshot(db)
                            assert after == before, f"{where} wrote before failing"
                        except Exception as exc:
                            tally.escaped.append(f"{where}: {type(exc).__name__}: {exc!s:.80}")
                            before = await _snapshot(db)
                        else:
                            tally.successes += 1
                            before = await _snapshot(db)
    return tally


# Thousands of calls: on a loaded 2-core machine this takes minutes, not the suite's default.
@pytest.mark.timeout(900)
async def test_every_public_method_answers_hostile_values_typed(fresh_db: str) -> None:
    async with (
        loopback() as base,
        Integrations(fresh_db, keys=TEST_KEY, providers=providers(base), check_timeout=2.0) as i,
    ):
        api = await i.add_connection("hapi", "default")
        await i.save_setup(api.uuid, {"api_key": SECRET})
        oauth = await i.add_connection("hoauth", "default")
        await i.save_setup(oauth.uuid, {"client_id": "cid", "client_secret": "csecret"})
        db = await asyncpg.connect(fresh_db)
        try:
            tally = await _fuzz(i, db, {"api": api.uuid, "oauth": oauth.uuid, "base": base})
        finally:
            await db.close()
    print(
        f"\nhostile methods: {tally.calls} calls {tally.by_family}, {tally.successes} "
        f"succeeded, {tally.typed} typed errors, {len(tally.escaped)} untyped"
    )
    assert tally.escaped == [], "\n".join(tally.escaped)
    assert tally.typed > tally.calls // 2
