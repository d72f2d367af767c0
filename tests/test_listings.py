"""Listings: keyset pages in index order, and plans that use the index on a large table."""

from __future__ import annotations

import json

import asyncpg
import pytest

from integrations import ALL_OWNERS, Integrations, InvalidInput, InvalidProviderKey, Page

ROWS = 20_000


async def fill(db: asyncpg.Connection, rows: int, *, owner: str = "", providers: int = 40) -> None:
    """``rows`` connections over ``providers`` providers (p0, p1, ...), in one statement."""
    await db.execute(
        """
        INSERT INTO integrations.connections (uuid, owner, key, value_json)
        SELECT gen_random_uuid(), $1, 'integration:p' || (i % $3) || ':n' || i,
               '{"status": "connected", "token_type": "x"}'
        FROM generate_series(1, $2) AS i
        """,
        owner,
        rows,
        providers,
    )
    await db.execute("ANALYZE integrations.connections")


async def plan(db: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await db.fetch("EXPLAIN (FORMAT JSON) " + sql, *args)
    return json.dumps(json.loads(rows[0][0]))


async def test_pages_walk_every_connection_once_in_key_order(integ: Integrations) -> None:
    made = []
    for provider in ("openai", "slack", "stripe"):
        for name in ("default", "a", "b", "work"):
            made.append(await integ.add_connection(provider, name))
    await integ.add_connection("openai", "hers", owner="alice")
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await integ.list_page(limit=5, after=after)
        assert isinstance(page, Page) and len(page.items) <= 5
        seen.extend(f"{c.provider}:{c.name}" for c in page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert pages == 3
    assert seen == sorted(f"{c.provider}:{c.name}" for c in made)
    only = await integ.list_page(provider="slack", limit=50)
    assert [c.name for c in only.items] == ["a", "b", "default", "work"]
    assert only.next_after is None
    hers = await integ.for_owner("alice").list_page()
    assert [c.name for c in hers.items] == ["hers"]
    assert (await integ.list_page(owner="alice", provider="slack")).items == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"limit": 0}, InvalidInput),
        ({"limit": 1001}, InvalidInput),
        ({"limit": True}, InvalidInput),
        ({"limit": "10"}, InvalidInput),
        ({"after": 5}, InvalidInput),
        ({"after": "x" * 1001}, InvalidInput),
        ({"provider": "Not A Key"}, InvalidProviderKey),
        ({"owner": ""}, InvalidInput),
    ],
)
async def test_bad_page_arguments_are_refused(
    integ: Integrations, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await integ.list_page(**kwargs)  # type: ignore[arg-type]


async def test_list_integrations_reads_past_one_page(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    await fill(db, 1_234, providers=3)
    await db.execute(
        'UPDATE integrations.connections SET value_json = value_json || \'{"api_key": "k"}\' '
        "WHERE key LIKE '%0'"
    )
    listed = await integ.list_integrations()
    assert len(listed) == 123
    assert len({c.uuid for c in listed}) == 123
    assert listed == sorted(listed, key=lambda c: (c.provider, c.name))


async def test_listings_use_the_index_where_a_seq_scan_would_otherwise_win(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    await fill(db, ROWS)
    await fill(db, 2_000, owner="alice")
    q = integ._repo.q
    # The table is big enough: the former LIKE ANY predicate is read sequentially.
    old = await plan(
        db,
        "SELECT * FROM integrations.connections WHERE owner = $1 AND key LIKE ANY ($2::text[])",
        "",
        ["integration:p1:%", "integration:p2:%"],
    )
    assert "Seq Scan" in old
    for owner in ("", "alice"):
        for prefixes in (["integration:p1:"], [f"integration:p{i}:" for i in range(8)]):
            highs = [p[:-1] + ";" for p in prefixes]
            found = await plan(db, q.list_by_prefixes, owner, prefixes, highs)
            assert "connections_owner_key_prefix" in found and "Seq Scan" not in found
        page = await plan(db, q.list_page, owner, "integration:", "integration;", "", 51)
        assert "connections_owner_key_prefix" in page
        assert "Seq Scan" not in page and '"Sort"' not in page
        after = await plan(
            db, q.list_page, owner, "integration:p3:", "integration:p3;", "integration:p3:n9", 51
        )
        assert "Seq Scan" not in after and '"Sort"' not in after
    # A prepared statement may run on a generic plan, blind to which owner it is for: the
    # system owner holds most rows here, and the index must still be probed per range.
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(f"PREPARE listing (text, text[], text[]) AS {q.list_by_prefixes}")
    await db.execute(f"PREPARE paging (text, text, text, text, int) AS {q.list_page}")
    generic = [
        await plan(db, "EXECUTE listing('', '{integration:p1:}', '{integration:p1;}')"),
        await plan(db, "EXECUTE paging('', 'integration:', 'integration;', '', 51)"),
    ]
    for found in generic:
        assert "connections_owner_key_prefix" in found
        assert "Seq Scan" not in found and '"Sort"' not in found
    await db.execute("RESET plan_cache_mode")
    # And the answers are the same as a plain scan's.
    listed = await integ.list_connections("p1")
    expected = await db.fetchval(
        "SELECT count(*) FROM integrations.connections WHERE owner = '' AND key LIKE $1",
        "integration:p1:%",
    )
    assert len(listed) == expected == ROWS // 40


@pytest.mark.parametrize("after", ["junk", "integration:other:", "integration:\x00", "\ud800", 5])
async def test_a_page_mark_that_no_page_gave_is_refused(integ: Integrations, after: object) -> None:
    await integ.add_connection("openai", "default")
    with pytest.raises(InvalidInput) as info:
        await integ.list_page(provider="openai", after=after)  # type: ignore[arg-type]
    assert info.value.code == "invalid"  # a page mark: input, not an option


async def test_checks_of_a_provider_no_longer_registered(integ: Integrations) -> None:
    # Rows may outlive their provider: a well-formed key is a filter, registered or not.
    assert len(await integ.check_all(provider="retired", owner=ALL_OWNERS)) == 0
    with pytest.raises(InvalidInput) as info:
        await integ.check_all(provider="Not A Key")
    assert info.value.code == "invalid_provider_key", info.value


async def test_list_integrations_pages_by_keyset(integ: Integrations) -> None:
    saved = []
    for name in ("a", "b", "c", "d", "e"):
        conn = await integ.add_connection("openai", name)
        await integ.save_setup(conn.uuid, {"api_key": f"sk-{name}-0123456789"})
        saved.append(conn.uuid)
    await integ.add_connection("openai", "empty")  # nothing saved: never listed
    whole = await integ.list_integrations()
    assert [c.uuid for c in whole] == saved and whole.next_after is None
    first = await integ.list_integrations(limit=2)
    assert [c.uuid for c in first] == saved[:2] and first.next_after is not None
    second = await integ.list_integrations(limit=2, after=first.next_after)
    assert [c.uuid for c in second.items] == saved[2:4]
    # The uuid of a page's last connection works as well as its next_after.
    by_uuid = await integ.list_integrations(limit=2, after=second[-1].uuid)
    assert [c.uuid for c in by_uuid] == saved[4:] and by_uuid.next_after is None
    for bad in ({"limit": 0}, {"limit": True}, {"after": "x"}, {"limit": 2, "after": "x"}):
        with pytest.raises(InvalidInput) as info:
            await integ.list_integrations(**bad)  # type: ignore[arg-type]
        assert info.value.code == "invalid", info.value
    handle = integ.for_owner("user:1")
    assert await handle.list_integrations(limit=2) == []
