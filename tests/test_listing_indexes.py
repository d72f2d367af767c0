"""The indexes that keep listings, counts and rotation proportional to what they return or
have left to do: the plans use them, and the answers are complete at page boundaries."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from integrations import ALL_OWNERS, Integrations, InvalidInput, generate_key
from integrations._connections import SEARCH_EXAMINE
from integrations._record import _SAVED_EXEMPT, has_saved_data
from integrations._vault import Keyring, Vault

from .conftest import TEST_KEY


async def plan(db: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await db.fetch("EXPLAIN (FORMAT JSON) " + sql, *args)
    return json.dumps(json.loads(rows[0][0]))


async def fill(
    db: asyncpg.Connection,
    rows: int,
    *,
    owner: str = "",
    providers: int = 20,
    value: str = '{"status": "connected", "token_type": "x"}',
    start: int = 0,
) -> None:
    await db.execute(
        """
        INSERT INTO integrations.connections (uuid, owner, key, value_json)
        SELECT gen_random_uuid(), $1, 'integration:p' || (i % $3) || ':n' || i, $4::jsonb
        FROM generate_series($5::int, $5::int + $2 - 1) AS i
        """,
        owner,
        rows,
        providers,
        value,
        start,
    )


async def generic(db: asyncpg.Connection, name: str, types: str, sql: str, call: str) -> str:
    """The plan of ``sql`` prepared as ``name``, forced generic (blind to the values)."""
    await db.execute("SET plan_cache_mode = force_generic_plan")
    try:
        await db.execute(f"PREPARE {name} ({types}) AS {sql}")
        return await plan(db, f"EXECUTE {name}{call}")
    finally:
        await db.execute("RESET plan_cache_mode")


# -- saved data ---------------------------------------------------------------------------


async def test_the_sql_test_of_saved_data_matches_the_python_one(db: asyncpg.Connection) -> None:
    cases: list[dict[str, Any]] = [{}, {"provider": "x", "name": "y", "status": "connected"}]
    for field in sorted(_SAVED_EXEMPT):
        cases += [{field: "v"}, {field: {"a": 1}}]
    for field in ("api_key", "access_token", "refresh_token", "client_id", "credentials"):
        for value in (None, "", {}, [], "v", 0, False, {"a": 1}):
            cases.append({"status": "connected", field: value})
    for case in cases:
        found = await db.fetchval(
            "SELECT integrations.connection_saved($1::text::jsonb)", json.dumps(case)
        )
        assert found is has_saved_data(case), case


async def test_list_integrations_reads_only_saved_rows_through_their_index(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # An owner whose rows are mostly unsaved: 3 saved among 5,000.
    await fill(db, 5_000, owner="big")
    await db.execute(
        """UPDATE integrations.connections SET value_json = value_json || '{"api_key": "k"}'
           WHERE owner = 'big' AND key IN ('integration:p1:n1', 'integration:p2:n2',
                                           'integration:p3:n3')"""
    )
    await fill(db, 50, owner="small", value='{"status": "connected", "client_id": "c"}')
    await db.execute("ANALYZE integrations.connections")
    q = integ._repo.q
    for owner in ("big", "small"):
        found = await generic(
            db,
            f"saved_{owner}",
            "text, text, text, text, int",
            q.list_saved_page,
            f"('{owner}', 'integration:', 'integration;', '', 51)",
        )
        assert "connections_saved" in found
        assert "Seq Scan" not in found and '"Sort"' not in found
    big = integ.for_owner("big")
    first = await big.list_integrations(limit=2)
    assert [c.name for c in first] == ["n1", "n2"] and first.next_after is not None
    rest = await big.list_integrations(limit=2, after=first.next_after)
    assert [c.name for c in rest] == ["n3"] and rest.next_after is None
    # A page exactly as long as what is left says there is no more.
    exact = await big.list_integrations(limit=3)
    assert len(exact) == 3 and exact.next_after is None
    small = integ.for_owner("small")
    walked, after = [], None
    while True:
        page = await small.list_integrations(limit=7, after=after)
        walked.extend(c.uuid for c in page)
        if page.next_after is None:
            break
        after = page.next_after
    everything = await small.list_integrations()
    assert len(walked) == len(set(walked)) == len(everything) == 50
    assert set(walked) == {c.uuid for c in everything}
    # Other owners' saved rows never show.
    assert await integ.list_integrations() == []


# -- filtered pages -----------------------------------------------------------------------


async def collect(handle: Any, **kwargs: Any) -> tuple[list[Any], int]:
    items: list[Any] = []
    pages = 0
    after = None
    while True:
        page = await handle.list_page(after=after, **kwargs)
        items.extend(page.items)
        pages += 1
        if page.next_after is None:
            return items, pages
        after = page.next_after


async def test_filtered_pages_examine_a_bounded_number_of_rows_and_miss_nothing(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    rows = SEARCH_EXAMINE * 2 + 500
    await fill(db, rows, owner="alice", providers=3)
    # Rare matches: every 997th row is in error.
    await db.execute(
        """UPDATE integrations.connections SET value_json = '{"status": "error"}'
           WHERE owner = 'alice' AND (split_part(key, ':n', 2))::int % 997 = 0"""
    )
    await fill(db, 40, owner="bob", providers=3, value='{"status": "error"}')
    await db.execute("ANALYZE integrations.connections")
    alice = integ.for_owner("alice")
    errors, pages = await collect(alice, status="error", limit=50)
    expected = await db.fetch(
        """SELECT key FROM integrations.connections
           WHERE owner = 'alice' AND value_json->>'status' = 'error' ORDER BY key COLLATE "C" """
    )
    assert [f"integration:{c.provider}:{c.name}" for c in errors] == [r["key"] for r in expected]
    assert all(c.owner == "alice" for c in errors)
    # A filter by status alone reads matching rows only: one full page holds them all.
    assert pages == 1
    # With a name search too, each page reads at most SEARCH_EXAMINE rows: the walk takes
    # at least rows/examine pages.
    both, pages = await collect(alice, status="error", search="n", limit=50)
    assert [c.uuid for c in both] == [c.uuid for c in errors]
    assert pages >= rows // SEARCH_EXAMINE
    # A name search, any case, within a provider; pages exactly at the boundary.
    found, _ = await collect(alice, provider="p1", search="N10", limit=5)
    names = sorted(c.name for c in found)
    assert names == sorted(f"n{i}" for i in range(rows) if i % 3 == 1 and "n10" in f"n{i}"), names[
        :5
    ]
    # Bob's rows are all errors but are never on Alice's pages, nor hers on his.
    bob, _ = await collect(integ.for_owner("bob"), status="error", limit=7)
    assert len(bob) == 40 and all(c.owner == "bob" for c in bob)


async def test_every_owners_pages_in_key_then_owner_order(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    for owner in ("", "a", "b\x1fc", "z"):
        await fill(db, 30, owner=owner, providers=2)
    await db.execute("ANALYZE integrations.connections")
    walked, pages = await collect(integ, owner=ALL_OWNERS, limit=30)
    assert pages == 4  # 120 rows, 30 a page: the last one says there is no more
    pairs = [(f"integration:{c.provider}:{c.name}", c.owner or "") for c in walked]
    assert len(set(pairs)) == 120
    assert pairs == sorted(pairs, key=lambda p: (p[0].encode(), p[1].encode()))
    some, _ = await collect(integ, owner=ALL_OWNERS, provider="p1", search="n1", limit=4)
    assert {c.owner or "" for c in some} == {"", "a", "b\x1fc", "z"}
    assert all(c.provider == "p1" and "n1" in c.name for c in some)
    await fill(db, 20_000, owner="many", start=1000)
    await db.execute("ANALYZE integrations.connections")
    found = await generic(
        db,
        "every",
        "text, text, text, text, int, int, text, text",
        integ._repo.q.search_every_owner,
        "('integration:', 'integration;', 'integration:p1:n1', 'a', 2000, 51, 'error', '')",
    )
    assert "connections_key_owner" in found
    assert "Seq Scan" not in found and '"Sort"' not in found
    # A mark of one owner's listing is refused by every owner's, and the other way round.
    one = await integ.list_page(owner="a", status="connected", limit=1)
    assert one.next_after is not None
    with pytest.raises(InvalidInput) as info:
        await integ.list_page(owner=ALL_OWNERS, after=one.next_after)
    assert info.value.code == "invalid", info.value
    every = await integ.list_page(owner=ALL_OWNERS, limit=1)
    with pytest.raises(InvalidInput) as info:
        await integ.list_page(owner="a", status="connected", after=every.next_after)
    assert info.value.code == "invalid", info.value


async def test_every_owners_pages_are_planned_once_whatever_the_values(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # The server plans a prepared statement for each call's values while such a plan looks
    # cheaper than the generic one; on a large table the every-owner pages' did (the
    # generic plan's guess at a key range's rows grows with the table), so they were planned
    # on every call, which cost more than running them. The values are hidden from the
    # planner: a plan for the values is the generic plan, which the server then keeps.
    for owner in ("", "a", "b"):
        await fill(db, 2000, owner=owner, providers=4)
    await db.execute(
        """UPDATE integrations.connections SET value_json = '{"status": "error"}'
           WHERE (split_part(key, ':n', 2))::int % 101 = 7"""
    )
    await db.execute("ANALYZE integrations.connections")
    q = integ._repo.q
    every = "text, text, text, text, int, int, text, text"
    for name, types, sql, calls in (
        ("every", every, q.search_every_owner, [
            "('integration:', 'integration;', '', '', 2000, 51, '', '')",
            "('integration:p1:', 'integration:p1;', 'integration:p1:n5', 'a', 2000, 26, "
            "'connected', 'n1')",
        ]),
        ("every_status", "text, text, text, text, text, int", q.status_every_owner, [
            "('integration:', 'integration;', '', '', 'error', 6)",
            "('integration:p2:', 'integration:p2;', 'integration:p2:n9', '', 'error', 51)",
        ]),
    ):  # fmt: skip
        await db.execute(f"PREPARE {name} ({types}) AS {sql}")
        for call in calls:
            made: dict[str, Any] = {}
            for mode in ("force_custom_plan", "force_generic_plan"):
                await db.execute(f"SET plan_cache_mode = {mode}")
                made[mode] = json.loads(
                    await db.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}{call}")
                )
            await db.execute("RESET plan_cache_mode")
            assert made["force_custom_plan"] == made["force_generic_plan"], call
            found = json.dumps(made["force_generic_plan"])
            assert "Seq Scan" not in found and '"Sort"' not in found
        # Left to choose, the server settles on the generic plan after its first few calls.
        for _ in range(8):
            await db.execute(f"EXECUTE {name}{calls[0]}")
        generic_plans = await db.fetchval(
            "SELECT generic_plans FROM pg_prepared_statements WHERE name = $1", name
        )
        assert generic_plans >= 3


async def test_status_pages_read_only_their_rows_through_an_index(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    for owner in ("", "a", "b"):
        await fill(db, 3000, owner=owner, providers=4)
    await db.execute(
        """UPDATE integrations.connections SET value_json = '{"status": "error"}'
           WHERE (split_part(key, ':n', 2))::int % 101 = 7"""
    )
    await db.execute("ANALYZE integrations.connections")
    one = await generic(
        db,
        "status_one",
        "text, text, text, text, text, int",
        integ._repo.q.status_page,
        "('a', 'integration:', 'integration;', '', 'error', 6)",
    )
    assert "connections_owner_status_key" in one
    every = await generic(
        db,
        "status_every",
        "text, text, text, text, text, int",
        integ._repo.q.status_every_owner,
        "('integration:', 'integration;', '', '', 'error', 6)",
    )
    assert "connections_status_key_owner" in every
    for found in (one, every):
        assert "Seq Scan" not in found and '"Sort"' not in found and "Filter" not in found
    # Every page full, and the walk is exact at page boundaries.
    expected = await db.fetch(
        """SELECT key, owner FROM integrations.connections WHERE value_json->>'status' = 'error'
           ORDER BY key COLLATE "C", owner COLLATE "C" """
    )
    walked, pages = await collect(integ, owner=ALL_OWNERS, status="error", limit=5)
    pairs = [(f"integration:{c.provider}:{c.name}", c.owner or "") for c in walked]
    assert pairs == [(r["key"], r["owner"]) for r in expected]
    assert pages == -(-len(expected) // 5)  # full pages, none empty
    mine, _ = await collect(integ.for_owner("a"), status="error", provider="p3", limit=4)
    assert [f"integration:{c.provider}:{c.name}" for c in mine] == [
        r["key"] for r in expected if r["owner"] == "a" and r["key"].startswith("integration:p3:")
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": "nope"},
        {"status": 1},
        {"search": 5},
        {"search": "x" * 101},
        {"search": "a\x00"},
    ],
)
async def test_bad_filters_are_refused(integ: Integrations, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as info:
        await integ.list_page(**kwargs)  # type: ignore[arg-type]
    assert info.value.code == "invalid", info.value


# -- counts -------------------------------------------------------------------------------


async def test_counts_follow_every_kind_of_write(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    a = await integ.add_connection("openai", "default")
    await integ.add_connection("openai", "second")
    await integ.add_connection("slack", "default", owner="user:1")
    assert await integ.count_connections() == {"openai": 2}
    assert await integ.for_owner("user:1").count_connections() == {"slack": 1}
    assert await integ.count_connections(owner=ALL_OWNERS) == {"openai": 2, "slack": 1}
    await integ.rename_connection(a.uuid, "first")
    await integ.save_setup(a.uuid, {"api_key": "sk-0123456789abcdef"})
    await integ.remove_connection(a.uuid)
    assert await integ.count_connections() == {"openai": 1}
    # Writes by hand: a bulk insert, an update that moves rows to another provider.
    await fill(db, 300, owner="user:1", providers=3)
    await db.execute(
        "UPDATE integrations.connections SET key = replace(key, ':p2:', ':p1:') "
        "WHERE owner = 'user:1' AND key LIKE 'integration:p2:%'"
    )
    assert await integ.for_owner("user:1").count_connections() == {
        "p0": 100,
        "p1": 200,
        "slack": 1,
    }
    # Many small writes leave many deltas; a reader folds them and the sums stay.
    for i in range(80):
        await integ.add_connection("stripe", f"s{i}", owner="user:2")
    for _ in range(2):
        assert await integ.count_connections(owner=ALL_OWNERS) == {
            "openai": 1,
            "p0": 100,
            "p1": 200,
            "slack": 1,
            "stripe": 80,
        }
    assert (
        await db.fetchval("SELECT count(*) FROM integrations.connection_counts WHERE scope = 'all'")
        <= 5
    )
    await db.execute("TRUNCATE integrations.connections CASCADE")
    assert await integ.count_connections(owner=ALL_OWNERS) == {}
    # The folds' dead rows are vacuumed after a fixed number, not a fraction of the table.
    options = await db.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'integrations.connection_counts'::regclass"
    )
    assert set(options) >= {"autovacuum_vacuum_scale_factor=0", "autovacuum_vacuum_threshold=200"}


async def test_every_scope_s_deltas_fold_and_the_counts_stay(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # Deltas no reader folds: bulk inserts in many statements, over several owners.
    for i in range(6):
        await fill(db, 30, owner=f"user:{i % 3}", providers=3, start=i * 1000)
    added = [await integ.add_connection("stripe", f"s{i}", owner="user:9") for i in range(5)]
    await integ.add_connection("openai", "default")
    await integ.remove_connection(added[0].uuid)
    owners = [None, "user:0", "user:1", "user:2", "user:9"]
    before = {o: await integ.for_owner(o).count_connections() for o in owners}
    everyone = await integ.count_connections(owner=ALL_OWNERS)
    rows = "SELECT count(*) FROM integrations.connection_counts"
    distinct = (
        "SELECT count(*) FROM "
        "(SELECT DISTINCT scope, provider FROM integrations.connection_counts) AS d"
    )
    assert await db.fetchval(rows) > await db.fetchval(distinct)
    vacuums = (
        "SELECT vacuum_count FROM pg_stat_user_tables "
        "WHERE relid = 'integrations.connection_counts'::regclass"
    )
    vacuumed = await db.fetchval(vacuums)
    await integ._repo.fold_every_connection_count()
    # The deleted deltas are vacuumed away at once, whether autovacuum runs or not.
    await db.execute("SELECT pg_stat_clear_snapshot()")
    assert await db.fetchval(vacuums) == vacuumed + 1
    # One row per scope and provider; none for a provider whose rows are all gone.
    assert await db.fetchval(rows) == await db.fetchval(distinct)
    assert not await db.fetchval("SELECT count(*) FROM integrations.connection_counts WHERE n = 0")
    assert {o: await integ.for_owner(o).count_connections() for o in owners} == before
    assert await integ.count_connections(owner=ALL_OWNERS) == everyone
    assert before["user:9"] == {"stripe": 4}
    assert before["user:0"] == {"p0": 20, "p1": 20, "p2": 20}
    # Folding again changes nothing (and vacuums nothing); later writes still count.
    await integ._repo.fold_every_connection_count()
    await db.execute("SELECT pg_stat_clear_snapshot()")
    assert await db.fetchval(vacuums) == vacuumed + 1
    await integ.add_connection("stripe", "later", owner="user:9")
    assert await integ.for_owner("user:9").count_connections() == {"stripe": 5}


async def test_a_scope_s_counts_are_read_from_the_index_alone(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # The rows of one scope lie on as many heap pages as folds and inserts put them on (at
    # a million connections, fifty rows on thirty-five pages): a count reads the index,
    # which holds the deltas, and no heap page once the sweep's fold has vacuumed.
    # Two statements: two deltas per scope and provider, which the sweep's fold then
    # replaces by one (and vacuums).
    for start in (0, 4000):
        await db.execute(
            """
            INSERT INTO integrations.connections (uuid, owner, key, value_json)
            SELECT gen_random_uuid(), 'user:' || (i / 10 % 400),
                   'integration:p' || (i % 20) || ':n' || i, '{"status": "connected"}'::jsonb
            FROM generate_series($1::int, $1::int + 3999) AS i
            """,
            start,
        )
    await integ._repo.fold_every_connection_count()
    await db.execute("ANALYZE integrations.connection_counts")
    assert await db.fetchval("SELECT count(*) FROM integrations.connection_counts") > 4000
    sql = integ._repo.q.connection_counts
    for scope in ("all", "o:user:7"):
        found = await generic(db, "counts", "text", sql, f"('{scope}')")
        await db.execute("DEALLOCATE counts")
        assert "Index Only Scan" in found and "Seq Scan" not in found, scope
        analyzed = await db.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql.replace("$1", f"'{scope}'")
        )
        scan = json.loads(analyzed)[0]["Plan"]
        while "Plans" in scan:
            scan = scan["Plans"][0]
        assert scan["Node Type"] == "Index Only Scan" and scan["Heap Fetches"] == 0, scope
    assert await integ.count_connections(owner=ALL_OWNERS) == {f"p{i}": 400 for i in range(20)}
    assert await integ.for_owner("user:7").count_connections() == {
        f"p{i}": 2 for i in range(10, 20)
    }


# -- rotation -----------------------------------------------------------------------------


async def test_rotation_finds_its_rows_through_indexes(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    old = generate_key()
    vault = Vault(Keyring.parse(old))
    await fill(db, 5_000, value='{"status": "connected", "client_id": "c"}')
    sealed = vault.seal("0190a0b0-0000-7000-8000-000000000001", {"api_key": "sk-x"})
    await db.execute(
        """INSERT INTO integrations.connections (uuid, owner, key, value_json)
           VALUES ('0190a0b0-0000-7000-8000-000000000001', '', 'integration:openai:old',
                   $1::text::jsonb),
                  ('0190a0b0-0000-7000-8000-000000000002', '', 'integration:openai:plain',
                   '{"status": "connected", "api_key": "sk-plain"}')""",
        json.dumps({"status": "connected", **sealed}),
    )
    await db.execute("ANALYZE integrations.connections")
    async with Integrations(fresh_db, keys=[TEST_KEY, old]) as integ:
        q = integ._repo.q
        primary = Keyring.parse(TEST_KEY).primary_id
        for name, types, sql, call in (
            ("below", "text[], uuid, int, text", q.connections_to_reseal_below,
             f"('{{\"\"}}', '00000000-0000-0000-0000-000000000000', 500, '{primary}')"),
            ("above", "text[], uuid, int", q.connections_to_reseal_above,
             f"('{{{primary}}}', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 500)"),
        ):  # fmt: skip
            found = await generic(db, name, types, sql, call)
            assert "connections_envelope_kids" in found and "Seq Scan" not in found
        plain = await generic(
            db,
            "plain",
            "uuid, int, text[]",
            q.connections_plain_to_reseal,
            "('00000000-0000-0000-0000-000000000000', 500, '{api_key}')",
        )
        assert "connections_plain_fields" in plain and "Seq Scan" not in plain
        done = await integ.rotate_keys(batch_size=1)
        # Only the two rows with work were read: the old envelope and the plaintext.
        assert (done.total, done.scanned, done.rotated) == (2, 2, 2)
        again = await integ.rotate_keys()
        assert (again.total, again.scanned, again.rotated) == (0, 0, 0)
        assert (await integ.get_credentials("openai:old"))["api_key"] == "sk-x"
        assert (await integ.get_credentials("openai:plain"))["api_key"] == "sk-plain"


async def test_rows_a_writer_moves_behind_the_rotation_are_still_rotated(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    # A save re-seals the field it writes under the new key and keeps the other envelopes
    # under the old one: with the old key id above the new one, the row's array of key ids
    # sorts lower than before, possibly behind the rotation's cursor.
    while True:
        old, new = generate_key(), generate_key()
        if Keyring.parse(old).primary_id > Keyring.parse(new).primary_id:
            break
    async with Integrations(fresh_db, keys=old) as integ:
        uuids = []
        for i in range(6):
            conn = await integ.add_connection("aws", f"r{i}")
            await integ.save_setup(
                conn.uuid,
                {"access_key": "AKIA", "secret_key": f"s{i}", "session_token": f"t{i}"},
            )
            uuids.append(conn.uuid)
    async with Integrations(fresh_db, keys=[new, old]) as integ:
        writes = 0

        async def write_the_rest(progress: Any) -> None:
            nonlocal writes
            if writes == 0:
                for row_uuid in uuids:
                    await integ.save_setup(row_uuid, {"secret_key": "moved"})
                writes += 1

        await integ.rotate_keys(batch_size=1, progress=write_the_rest)
    old_kid = Keyring.parse(old).primary_id
    left = await db.fetchval(
        "SELECT count(*) FROM integrations.connections WHERE value_json::text LIKE $1",
        f"%{old_kid}%",
    )
    assert writes == 1 and left == 0


async def test_after_a_big_rotation_the_next_pass_reads_the_indexes(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    old = generate_key()
    vault = Vault(Keyring.parse(old))
    rows = []
    for i in range(3_000):
        row_uuid = f"0190a0b0-0000-7000-8000-{i:012d}"
        data = {"status": "connected", **vault.seal(row_uuid, {"api_key": f"sk-{i:08d}-x"})}
        rows.append((row_uuid, f"integration:openai:n{i}", json.dumps(data)))
    await db.executemany(
        "INSERT INTO integrations.connections (uuid, owner, key, value_json) "
        "VALUES ($1::uuid, '', $2, $3::jsonb)",
        rows,
    )
    # The statistics describe every row as under the old key.
    await db.execute("ANALYZE integrations.connections")
    async with Integrations(fresh_db, keys=[TEST_KEY, old]) as integ:
        done = await integ.rotate_keys()
        assert done.rotated == 3_000
        primary = Keyring.parse(TEST_KEY).primary_id
        q = integ._repo.q
        for query, args in (
            (q.count_reseal_below_end, ([""], uuid.UUID(int=0), 49_999, primary)),
            (q.count_reseal_below_rest, ([""], uuid.UUID(int=0), primary)),
            (q.count_reseal_above_end, ([primary], uuid.UUID(int=2**128 - 1), 49_999)),
            (q.count_reseal_above_rest, ([primary], uuid.UUID(int=2**128 - 1))),
        ):
            shown = await plan(db, query, *args)
            assert "Seq Scan" not in shown and "connections_envelope_kids" in shown, shown
        shown = await plan(db, q.count_plain_to_reseal, primary, ["api_key", "access_token"])
        assert "Seq Scan" not in shown and "connections_plain_fields" in shown, shown
        again = await integ.rotate_keys()
        assert (again.rotated, again.scanned) == (0, 0)
    assert (await integ_reads(fresh_db, old))["api_key"] == "sk-00002999-x"


async def integ_reads(dsn: str, old: str) -> dict[str, object]:
    async with Integrations(dsn, keys=[TEST_KEY]) as integ:
        return await integ.get_credentials("0190a0b0-0000-7000-8000-000000002999")
