-- Named query blocks, loaded once. {schema} is a validated identifier filled in at
-- configuration time; everything else is an asyncpg $n parameter. value_json travels as
-- text both ways so an injected pool's own jsonb codecs cannot change the result.

-- name: migrations_table
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrate_lock
-- $1 int8: advisory lock id derived from the schema name
SELECT pg_advisory_xact_lock($1);

-- name: applied_migrations
SELECT version FROM {schema}.schema_migrations ORDER BY version;

-- name: migrations_table_exists
SELECT to_regclass('{schema}.schema_migrations') IS NOT NULL;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM {schema}.schema_migrations;

-- name: record_migration
-- $1 int: version, $2 text: file name
INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2);

-- name: insert_connection
-- $1 uuid, $2 text owner ('' = system), $3 text key, $4 text value_json
INSERT INTO {schema}.connections (uuid, owner, key, value_json)
VALUES ($1, $2, $3, $4::text::jsonb)
ON CONFLICT (owner, key) DO NOTHING
RETURNING uuid, owner, key, value_json::text AS value_json, version;

-- name: get_by_uuid
-- $1 uuid
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections WHERE uuid = $1;

-- name: lock_by_uuid
-- $1 uuid; row lock held until the surrounding transaction ends. NO KEY UPDATE still
-- serialises every writer of the row, but not the FOR KEY SHARE lock that inserting a
-- pending authorization takes through its foreign key. A rename or delete that changes
-- the key upgrades the lock itself.
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections WHERE uuid = $1 FOR NO KEY UPDATE;

-- name: lock_by_uuid_clocked
-- $1 uuid; like lock_by_uuid, with the server's clock (refresh leases are timed by it)
SELECT uuid, owner, key, value_json::text AS value_json, version, clock_timestamp() AS now
FROM {schema}.connections WHERE uuid = $1 FOR NO KEY UPDATE;

-- name: get_by_key
-- $1 text owner, $2 text key
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections WHERE owner = $1 AND key = $2;

-- name: uuid_by_key
-- $1 text owner, $2 text key
SELECT uuid FROM {schema}.connections WHERE owner = $1 AND key = $2;

-- name: list_by_prefixes
-- $1 text owner, $2 text[] lower bounds (the prefixes), $3 text[] upper bounds (exclusive),
-- pairwise. One index range scan per prefix, however many: the byte-wise operators are
-- those of the text_pattern_ops index (LIKE ANY could not use it). Unordered.
-- The owner travels with each range, and OFFSET 0 keeps the subquery from being
-- flattened into a join, so that every plan (a generic one, which cannot tell a large
-- owner from a small one, included) probes the index once per range.
SELECT c.uuid, c.owner, c.key, c.value_json::text AS value_json, c.version
FROM unnest($2::text[], $3::text[], array_fill($1::text, ARRAY[cardinality($2::text[])]))
    AS p (lo, hi, owner)
CROSS JOIN LATERAL (
    SELECT * FROM {schema}.connections AS r
    WHERE r.owner = p.owner AND r.key ~>=~ p.lo AND r.key ~<~ p.hi
    OFFSET 0
) AS c;

-- name: list_page
-- $1 text owner, $2 text lower bound, $3 text upper bound (exclusive), $4 text keyset
-- cursor (exclusive; '' from the start), $5 int page size. Index order, so no sort.
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE owner = $1 AND key ~>=~ $2 AND key ~<~ $3 AND key ~>~ $4
ORDER BY key USING ~<~
LIMIT $5;

-- name: list_saved_page
-- $1 text owner, $2 text lower bound, $3 text upper bound (exclusive), $4 text keyset
-- cursor (exclusive; '' from the start), $5 int page size. Only rows with saved data, read
-- from the partial index connections_saved: a page costs the same however many unsaved
-- rows the owner has.
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE owner = $1 AND key ~>=~ $2 AND key ~<~ $3 AND key ~>~ $4
  AND {schema}.connection_saved(value_json)
ORDER BY key USING ~<~
LIMIT $5;

-- name: search_page
-- $1 text owner, $2 text lower bound, $3 text upper bound (exclusive), $4 text keyset
-- cursor (exclusive), $5 int rows to examine at most, $6 int matches wanted at most,
-- $7 text status ('' for any), $8 text lowercase part of the name ('' for any).
-- Reads at most $5 rows in index order and returns those that match, plus the $5-th row
-- read (hit false unless it matches too) so that the next page starts after it: a page
-- costs the same whether one row in ten or one in a million matches.
SELECT uuid, owner, key, value_json, version, hit, n = $5 AS last_read FROM (
    SELECT r.*, row_number() OVER () AS n,
           ($7 = '' OR r.status = $7)
           AND ($8 = '' OR strpos(lower(split_part(r.key, ':', 3)), $8) > 0) AS hit
    FROM (
        SELECT uuid, owner, key, value_json::text AS value_json, version,
               value_json ->> 'status' AS status
        FROM {schema}.connections
        WHERE owner = $1 AND key ~>=~ $2 AND key ~<~ $3 AND key ~>~ $4
        ORDER BY key USING ~<~
        LIMIT $5
    ) AS r
) AS s
WHERE hit OR n = $5
LIMIT $6;

-- name: search_every_owner
-- Like search_page over every owner's rows in (key, owner) byte order:
-- $1 text lower bound, $2 text upper bound (exclusive), $3 text key and $4 text owner of
-- the keyset cursor (exclusive; '' and '' from the start), $5 int rows to examine at
-- most, $6 int matches wanted at most, $7 text status ('' for any), $8 text lowercase
-- part of the name ('' for any).
-- Every parameter is read through a scalar subquery, which the planner cannot see into:
-- a plan made for the values of a call (a custom plan) is then the generic plan, and the
-- server keeps that one instead of planning every call. Seeing the values, it would: on a
-- large table the generic plan's guess at the rows a key range holds makes it look
-- dearer than a plan for the whole range with a known LIMIT, and planning then costs
-- more than running. The one plan is the index scan in (key, owner) order.
SELECT uuid, owner, key, value_json, version, hit, n = (SELECT $5::int) AS last_read FROM (
    SELECT r.*, row_number() OVER () AS n,
           ((SELECT $7::text) = '' OR r.status = (SELECT $7::text))
           AND ((SELECT $8::text) = ''
                OR strpos(lower(split_part(r.key, ':', 3)), (SELECT $8::text)) > 0) AS hit
    FROM (
        SELECT uuid, owner, key, value_json::text AS value_json, version,
               value_json ->> 'status' AS status
        FROM {schema}.connections
        WHERE key COLLATE "C" >= (SELECT $1::text) AND key COLLATE "C" < (SELECT $2::text)
          AND (key COLLATE "C", owner COLLATE "C") > ((SELECT $3::text), (SELECT $4::text))
        ORDER BY key COLLATE "C", owner COLLATE "C"
        LIMIT (SELECT $5::int)
    ) AS r
) AS s
WHERE hit OR n = (SELECT $5::int)
LIMIT (SELECT $6::int);

-- name: status_page
-- $1 text owner, $2 text lower bound, $3 text upper bound (exclusive), $4 text keyset
-- cursor (exclusive), $5 text status, $6 int rows wanted at most. search_page's columns,
-- for a page filtered by status alone: read from connections_owner_status_key, so only
-- the rows returned are read.
SELECT uuid, owner, key, value_json::text AS value_json, version, true AS hit,
       false AS last_read
FROM {schema}.connections
WHERE owner = $1 AND value_json ->> 'status' = $5
  AND key ~>=~ $2 AND key ~<~ $3 AND key ~>~ $4
ORDER BY key USING ~<~
LIMIT $6;

-- name: status_every_owner
-- Like status_page over every owner's rows in (key, owner) byte order, read from
-- connections_status_key_owner: $1 text lower bound, $2 text upper bound (exclusive), $3
-- text key and $4 text owner of the keyset cursor (exclusive), $5 text status, $6 int rows
-- wanted at most. The parameters are read through scalar subqueries, as in
-- search_every_owner and for the same reason: one plan, never planned again per call.
SELECT uuid, owner, key, value_json::text AS value_json, version, true AS hit,
       false AS last_read
FROM {schema}.connections
WHERE value_json ->> 'status' = (SELECT $5::text)
  AND key COLLATE "C" >= (SELECT $1::text) AND key COLLATE "C" < (SELECT $2::text)
  AND (key COLLATE "C", owner COLLATE "C") > ((SELECT $3::text), (SELECT $4::text))
ORDER BY key COLLATE "C", owner COLLATE "C"
LIMIT (SELECT $6::int);

-- name: connection_counts
-- $1 text scope ('o:' || owner, or 'all'): connections per provider, and how many delta
-- rows each sum read (the reader folds them when there are many)
SELECT provider, sum(n)::bigint AS connections, count(*) AS deltas
FROM {schema}.connection_counts
WHERE scope = $1
GROUP BY provider
ORDER BY provider;

-- name: fold_connection_counts
-- $1 text scope: its deltas replaced by one row per provider. Deltas appended meanwhile
-- are not in the DELETE's snapshot and stay; two folds at once delete each delta once.
WITH gone AS (
    DELETE FROM {schema}.connection_counts WHERE scope = $1 RETURNING provider, n
)
INSERT INTO {schema}.connection_counts (scope, provider, n)
SELECT $1, provider, sum(n) FROM gone GROUP BY provider HAVING sum(n) <> 0;

-- name: fold_every_connection_count
-- $1 int: at most this many scopes. The scopes holding more delta rows than providers,
-- each replaced by one row per provider, as fold_connection_counts does for one scope
-- (the periodic fold of the scopes no reader folds). Deltas appended meanwhile stay.
-- Returns how many delta rows were deleted.
WITH scopes AS (
    SELECT scope FROM {schema}.connection_counts
    GROUP BY scope
    HAVING count(*) > count(DISTINCT provider)
    LIMIT $1
), gone AS (
    DELETE FROM {schema}.connection_counts AS c
    USING scopes AS s
    WHERE c.scope = s.scope
    RETURNING c.scope, c.provider, c.n
), folded AS (
    INSERT INTO {schema}.connection_counts (scope, provider, n)
    SELECT scope, provider, sum(n) FROM gone GROUP BY scope, provider HAVING sum(n) <> 0
)
SELECT count(*) AS deleted FROM gone;

-- name: vacuum_connection_counts
-- The rows folds deleted, whose index entries a count would otherwise visit until
-- autovacuum comes by (or never, where it is off).
VACUUM {schema}.connection_counts;

-- name: list_every_owner
-- $1 text key prefix, $2 text the least string above every key with that prefix;
-- rows of every owner
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE key ~>=~ $1 AND key ~<~ $2
ORDER BY key, owner;

-- name: update_value
-- $1 uuid, $2 text value_json
UPDATE {schema}.connections
SET value_json = $2::text::jsonb, version = version + 1, updated_at = now()
WHERE uuid = $1
RETURNING version;

-- name: update_key_value
-- $1 uuid, $2 text key, $3 text value_json
UPDATE {schema}.connections
SET key = $2, value_json = $3::text::jsonb, version = version + 1, updated_at = now()
WHERE uuid = $1
RETURNING version;

-- name: delete_connection
-- $1 uuid
DELETE FROM {schema}.connections WHERE uuid = $1
RETURNING uuid, owner, key, value_json::text AS value_json, version;

-- name: notify
-- $1 text channel, $2 text payload
SELECT pg_notify($1, $2);

-- name: connections_to_reseal_below
-- $1 text[] and $2 uuid: keyset cursor (exclusive; '{""}' and the nil uuid to start, which
-- sorts after every row without an envelope), $3 int batch size, $4 text primary key id.
-- Rows with an envelope whose key id sorts before the primary's (see envelope_kids in
-- migration 0004): one range of the index connections_envelope_kids, starting at the
-- cursor, so a batch reads only rows that still need work. Not locked:
-- lock_connections_to_reseal takes those it can.
SELECT uuid, {schema}.envelope_kids(value_json) AS kids
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid)
  AND {schema}.envelope_kids(value_json) < ARRAY[$4::text]
ORDER BY {schema}.envelope_kids(value_json), uuid
LIMIT $3;

-- name: connections_to_reseal_above
-- Like connections_to_reseal_below for the key id arrays that sort after the primary's
-- alone (other key ids after it, or the primary's beside others).
-- $1 text[] and $2 uuid: keyset cursor (exclusive; the primary's array and the greatest
-- uuid to start, past every row under the primary alone), $3 int batch size
SELECT uuid, {schema}.envelope_kids(value_json) AS kids
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid)
ORDER BY {schema}.envelope_kids(value_json), uuid
LIMIT $3;

-- name: connections_plain_to_reseal
-- $1 uuid: keyset cursor (exclusive; the nil uuid to start), $2 int batch size,
-- $3 text[] secret field names whose plaintext must be sealed ('{}' when encryption is
-- off). Rows holding one of them in plaintext, found through the GIN index
-- connections_plain_fields (materialized first: an ordered scan of the primary key that
-- filters every row would otherwise look cheaper to a generic plan).
WITH plain AS MATERIALIZED (
    SELECT uuid FROM {schema}.connections
    WHERE {schema}.plain_fields(value_json) && $3::text[]
)
SELECT uuid FROM plain WHERE uuid > $1 ORDER BY uuid LIMIT $2;

-- name: lock_connections_to_reseal
-- $1 uuid[]: candidates. Rows another transaction holds (a token request in flight) are
-- skipped, not waited for: waiting would hold the rows locked so far for as long.
-- Row locks are held until the surrounding transaction ends.
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE uuid = ANY ($1::uuid[])
ORDER BY uuid
FOR NO KEY UPDATE SKIP LOCKED;

-- name: lock_connection_to_reseal
-- $1 uuid: one row skipped earlier, now waited for (the transaction holds no other row)
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE uuid = $1
FOR NO KEY UPDATE;

-- name: count_reseal_below_end
-- $1 text[] and $2 uuid: keyset cursor (exclusive, as connections_to_reseal_below's),
-- $3 int rows to step over, $4 text primary key id. The (kids, uuid) of the row $3 rows
-- past the cursor in connections_to_reseal_below's range; none when fewer are left. A
-- count of that range takes steps of these, so no one statement reads the whole range.
SELECT {schema}.envelope_kids(value_json) AS kids, uuid
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid)
  AND {schema}.envelope_kids(value_json) < ARRAY[$4::text]
ORDER BY {schema}.envelope_kids(value_json), uuid
OFFSET $3 LIMIT 1;

-- name: count_reseal_below_rest
-- $1 text[] and $2 uuid: keyset cursor (exclusive), $3 text primary key id. The rows of
-- connections_to_reseal_below's range after the cursor (fewer than a step).
SELECT count(*)
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid)
  AND {schema}.envelope_kids(value_json) < ARRAY[$3::text];

-- name: count_reseal_above_end
-- As count_reseal_below_end, in connections_to_reseal_above's range.
-- $1 text[] and $2 uuid: keyset cursor (exclusive), $3 int rows to step over
SELECT {schema}.envelope_kids(value_json) AS kids, uuid
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid)
ORDER BY {schema}.envelope_kids(value_json), uuid
OFFSET $3 LIMIT 1;

-- name: count_reseal_above_rest
-- $1 text[] and $2 uuid: keyset cursor (exclusive)
SELECT count(*)
FROM {schema}.connections
WHERE ({schema}.envelope_kids(value_json), uuid) > ($1::text[], $2::uuid);

-- name: count_plain_to_reseal
-- $1 text: primary key id
-- $2 text[]: secret field names whose plaintext must be sealed ('{}' when encryption is off)
-- Rows connections_plain_to_reseal visits that the two ranges above do not hold (a row
-- in both is counted once): found through the GIN index connections_plain_fields.
SELECT count(*)
FROM {schema}.connections
WHERE {schema}.plain_fields(value_json) && $2::text[]
  AND NOT (({schema}.envelope_kids(value_json) >= '{""}'::text[]
            AND {schema}.envelope_kids(value_json) < ARRAY[$1::text])
           OR {schema}.envelope_kids(value_json) > ARRAY[$1::text]);

-- name: analyze_connections
-- The planner's statistics of the table, after a rotation rewrote many rows: until then
-- they describe the rows as under the old key, and the plans of the rotation's own
-- queries read every row instead of the (now empty) index ranges.
ANALYZE {schema}.connections;

-- name: reseal_connections
-- $1 uuid[], $2 text[] value_json, pairwise. The version moves on so that a writer
-- comparing versions re-reads instead of writing back envelopes under the old key;
-- updated_at is kept because the stored values did not change.
UPDATE {schema}.connections AS c
SET value_json = v.value_json::jsonb, version = c.version + 1
FROM unnest($1::uuid[], $2::text[]) AS v (uuid, value_json)
WHERE c.uuid = v.uuid;

-- name: pending_to_reseal
-- $1 text: keyset cursor, only state hashes after it ('' to start)
-- $2 int: batch size
-- $3 text: primary key id
-- $4 bool: whether a plaintext verifier must be sealed (false when encryption is off)
-- Same predicate as count_pending_to_reseal. Row locks are held until the transaction ends.
SELECT state_hash, code_verifier::text AS code_verifier
FROM {schema}.pending_authorizations
WHERE state_hash > $1
  AND code_verifier IS NOT NULL AND code_verifier <> 'null'::jsonb
  AND CASE WHEN jsonb_typeof(code_verifier) = 'object' AND code_verifier ? '$enc'
           THEN code_verifier ->> 'kid' IS DISTINCT FROM $3::text
           ELSE $4::bool END
ORDER BY state_hash
LIMIT $2
FOR UPDATE;

-- name: count_pending_to_reseal
-- $1 text: primary key id
-- $2 bool: whether a plaintext verifier must be sealed (false when encryption is off)
SELECT count(*)
FROM {schema}.pending_authorizations
WHERE code_verifier IS NOT NULL AND code_verifier <> 'null'::jsonb
  AND CASE WHEN jsonb_typeof(code_verifier) = 'object' AND code_verifier ? '$enc'
           THEN code_verifier ->> 'kid' IS DISTINCT FROM $1::text
           ELSE $2::bool END;

-- name: reseal_pending
-- $1 text[] state_hash, $2 text[] code_verifier, pairwise
UPDATE {schema}.pending_authorizations AS p
SET code_verifier = v.code_verifier::jsonb
FROM unnest($1::text[], $2::text[]) AS v (state_hash, code_verifier)
WHERE p.state_hash = v.state_hash;

-- name: begin_write
-- Opens an ordinary write transaction whose lock waits give up after {lock_timeout} and
-- which the server ends when left idle for {idle_timeout} (a stalled client must not hold
-- its row locks); both filled in by the repository with a number of milliseconds, never
-- with input, in one round trip; transaction-local, so safe behind PgBouncer
BEGIN; SET LOCAL lock_timeout = '{lock_timeout}'; SET LOCAL idle_in_transaction_session_timeout = '{idle_timeout}'

-- name: bound_transaction
-- The same bounds for a transaction already open (key rotation batches), without JIT
-- compilation or parallel workers: the rotation's statements read index ranges of what
-- is left, whose size the planner guesses from statistics taken before the rows moved
-- (at a million rows, a guess of 80,000 for an empty range). On such a guess the server
-- would start workers and compile the statement, which costs milliseconds more than the
-- read, so a pass with nothing left would grow with the table.
SET LOCAL lock_timeout = '{lock_timeout}'; SET LOCAL idle_in_transaction_session_timeout = '{idle_timeout}'; SET LOCAL jit = off; SET LOCAL max_parallel_workers_per_gather = 0

-- name: set_idle_timeout
-- $1 text idle_in_transaction_session_timeout (e.g. '5000ms'), for a transaction whose lock
-- waits keep the session's setting (migrations); ends with the surrounding transaction
SELECT set_config('idle_in_transaction_session_timeout', $1, true);

-- name: set_refresh_timeouts
-- $1 text lock_timeout, $2 text idle_in_transaction_session_timeout (e.g. '30000ms');
-- both end with the surrounding transaction, so they are safe behind PgBouncer
SELECT set_config('lock_timeout', $1, true),
       set_config('idle_in_transaction_session_timeout', $2, true);

-- name: insert_pending_authorization
-- $1 text state_hash, $2 uuid connection, $3 text owner ('' = system), $4 text redirect_uri,
-- $5 text[] scopes, $6 text code_verifier (JSON: sealed envelope, or null), $7 text actor,
-- $8 float8 seconds until it expires
INSERT INTO {schema}.pending_authorizations
    (state_hash, connection_uuid, owner, redirect_uri, scopes, code_verifier, actor, expires_at)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, now() + make_interval(secs => $8))
ON CONFLICT (state_hash) DO NOTHING
RETURNING state_hash;

-- name: take_pending_authorization
-- $1 text state_hash, $2 bool any owner, $3 text owner ('' = system) unless $2;
-- deleted whether live or expired, so a state is good for one use at most
DELETE FROM {schema}.pending_authorizations
WHERE state_hash = $1 AND ($2 OR owner = $3)
RETURNING state_hash, connection_uuid, owner, redirect_uri, scopes,
          code_verifier::text AS code_verifier, actor, expires_at > now() AS live,
          expires_at;

-- name: take_latest_pending_authorization
-- $1 uuid connection, $2 text redirect_uri; the newest live one, consumed
DELETE FROM {schema}.pending_authorizations
WHERE state_hash = (
    SELECT state_hash FROM {schema}.pending_authorizations
    WHERE connection_uuid = $1 AND redirect_uri = $2 AND expires_at > now()
    ORDER BY created_at DESC
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING state_hash, connection_uuid, owner, redirect_uri, scopes,
          code_verifier::text AS code_verifier, actor, expires_at > now() AS live,
          expires_at;

-- name: delete_expired_pending_authorizations
-- no parameters
DELETE FROM {schema}.pending_authorizations WHERE expires_at <= now();

-- name: sweep_candidates
-- $1 uuid: the last one of the previous page (keyset pagination), $2 int page size.
-- Connections a health sweep may check or refresh: configured ones; the sweep decides the rest.
SELECT uuid, owner, key, value_json::text AS value_json, version
FROM {schema}.connections
WHERE uuid > $1 AND value_json ->> 'status' IN ('connected', 'error')
ORDER BY uuid
LIMIT $2;

-- name: take_lease
-- $1 text purpose, $2 uuid holder, $3 float8 seconds. Takes the lease when it is free or
-- ran out, renews it when $2 holds it; no row when another holder's lease still runs.
-- The database's clock is the one that counts (clock_timestamp(): a statement's own
-- time, also inside a pooler's transaction).
INSERT INTO {schema}.leases AS l (purpose, holder, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (purpose) DO UPDATE
SET holder = EXCLUDED.holder,
    expires_at = EXCLUDED.expires_at,
    term = l.term + CASE WHEN l.holder = EXCLUDED.holder THEN 0 ELSE 1 END
WHERE l.holder = EXCLUDED.holder OR l.expires_at <= clock_timestamp()
RETURNING term;

-- name: drop_lease
-- $1 text purpose, $2 uuid holder: a leader that stops lets the next one in at once.
DELETE FROM {schema}.leases WHERE purpose = $1 AND holder = $2;

-- name: append_events
-- $1 text[] kind, $2 text[] uuid, $3 text[] owner ('' = system), $4 text[] provider,
-- $5 text[] body (the NOTIFY payload, a JSON object without the position), pairwise, in
-- order. The events_number trigger numbers and notifies them when the transaction commits.
INSERT INTO {schema}.events (kind, uuid, owner, provider, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]);

-- name: events_after_any_owner
-- $1 int8 position (exclusive), $2 text provider or NULL, $3 text uuid or NULL,
-- $4 text[] kinds or NULL, $5 int page size. Every owner's events, in position order.
SELECT position, body
FROM {schema}.events
WHERE position > $1
  AND ($2::text IS NULL OR provider = $2)
  AND ($3::text IS NULL OR uuid = $3)
  AND ($4::text[] IS NULL OR kind = ANY ($4::text[]))
ORDER BY position
LIMIT $5;

-- name: events_after_owner
-- $1 int8 position (exclusive), $2 text owner ('' = system), $3 text provider or NULL,
-- $4 text uuid or NULL, $5 text[] kinds or NULL, $6 int page size. One owner's events,
-- in position order (the events_owner_position index).
SELECT position, body
FROM {schema}.events
WHERE owner = $2 AND position > $1
  AND ($3::text IS NULL OR provider = $3)
  AND ($4::text IS NULL OR uuid = $4)
  AND ($5::text[] IS NULL OR kind = ANY ($5::text[]))
ORDER BY owner, position
LIMIT $6;

-- name: events_after_uuid
-- $1 text uuid, $2 int8 position (exclusive), $3 bool any owner, $4 text owner ('' =
-- system) unless $3, $5 text provider or NULL, $6 text[] kinds or NULL, $7 int page size.
-- One connection's events, in position order (the events_uuid_position index).
SELECT position, body
FROM {schema}.events
WHERE uuid = $1 AND position > $2
  AND ($3 OR owner = $4)
  AND ($5::text IS NULL OR provider = $5)
  AND ($6::text[] IS NULL OR kind = ANY ($6::text[]))
ORDER BY uuid, position
LIMIT $7;

-- name: events_pruned_through
-- no parameters; positions up to this one may have been deleted by retention (none when
-- the state row is missing: nothing was pruned since the log was emptied)
SELECT coalesce((SELECT pruned_through FROM {schema}.event_log_state), 0);

-- name: events_last_position
-- no parameters; the highest position logged so far (0 when none)
SELECT coalesce(max(position), 0) FROM {schema}.events;

-- name: events_oldest
-- $1 int page size; the oldest events' positions and log times, for the age sweep
SELECT position, logged_at FROM {schema}.events
WHERE position IS NOT NULL ORDER BY position LIMIT $1;

-- name: events_count_cut
-- $1 int8 how many of the newest to keep; the highest position older than those
SELECT position FROM {schema}.events
WHERE position IS NOT NULL ORDER BY position DESC OFFSET $1 LIMIT 1;

-- name: events_prune
-- $1 int8 position: events up to it are deleted, and the state remembers how far
WITH gone AS (
    DELETE FROM {schema}.events WHERE position <= $1 RETURNING 1
), moved AS (
    -- An upsert: the state row may have been emptied away (TRUNCATE) with the log.
    INSERT INTO {schema}.event_log_state AS s (pruned_through) VALUES ($1)
    ON CONFLICT (id) DO UPDATE SET pruned_through = greatest(s.pruned_through, $1)
    RETURNING pruned_through
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT pruned_through FROM moved) AS pruned;

-- name: data_keys_of
-- $1 text wrapper; newest first: the newest is the primary of its source.
SELECT kid, wrapped FROM {schema}.data_keys WHERE wrapper = $1 ORDER BY created_at DESC, kid;

-- name: all_data_keys
SELECT kid, wrapper FROM {schema}.data_keys ORDER BY created_at, kid;

-- name: put_data_key
-- $1 text kid, $2 text wrapper, $3 bytea wrapped; re-wrapping keeps the key's age.
INSERT INTO {schema}.data_keys (kid, wrapper, wrapped) VALUES ($1, $2, $3)
ON CONFLICT (kid) DO UPDATE SET wrapper = excluded.wrapper, wrapped = excluded.wrapped;

-- name: data_keys_lock
-- $1 int8: advisory lock id; the first data key of a wrapper is made once per fleet.
SELECT pg_advisory_xact_lock($1);

-- name: webhook_insert_endpoint
-- $1 uuid, $2 text owner (NULL: system-wide), $3 text url, $4 text[] kinds (NULL: all),
-- $5 text sealed secret (JSON), $6 text description. The first endpoint starts the
-- dispatch cursor at the end of the log: endpoints hear what happens from now on.
WITH start AS (
    INSERT INTO {schema}.webhook_cursor (position)
    SELECT coalesce(max(position), 0) FROM {schema}.events
    ON CONFLICT (id) DO NOTHING
)
INSERT INTO {schema}.webhook_endpoints (id, owner, url, kinds, secret, description)
VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)
RETURNING id, owner, url, kinds, description, created_at;

-- name: webhook_endpoints
-- $1 bool any owner, $2 text owner (NULL: the system-wide ones) unless $1
SELECT id, owner, url, kinds, description, created_at
FROM {schema}.webhook_endpoints
WHERE $1 OR owner IS NOT DISTINCT FROM $2
ORDER BY created_at, id;

-- name: webhook_endpoint
-- $1 uuid; with the sealed secret
SELECT id, owner, url, kinds, description, created_at, secret::text AS secret
FROM {schema}.webhook_endpoints WHERE id = $1;

-- name: webhook_delete_endpoint
-- $1 uuid, $2 bool any owner, $3 text owner unless $2
DELETE FROM {schema}.webhook_endpoints
WHERE id = $1 AND ($2 OR owner IS NOT DISTINCT FROM $3)
RETURNING id;

-- name: webhook_lock_cursor
-- no parameters; one dispatcher at a time, the others skip (held until the transaction ends)
SELECT position FROM {schema}.webhook_cursor FOR UPDATE SKIP LOCKED;

-- name: webhook_events_after
-- $1 int8 position (exclusive), $2 int page size; every owner's events, in position order
SELECT position, body FROM {schema}.events
WHERE position > $1 ORDER BY position LIMIT $2;

-- name: webhook_all_endpoints
-- no parameters; what the dispatcher matches events against
SELECT id, owner, kinds FROM {schema}.webhook_endpoints;

-- name: webhook_insert_deliveries
-- $1 text[] id, $2 uuid[] endpoint, $3 int8[] position, $4 text[] lane, $5 text[] kind,
-- $6 text[] payload, pairwise
INSERT INTO {schema}.webhook_deliveries (id, endpoint_id, position, lane, kind, payload)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[])
ON CONFLICT DO NOTHING;

-- name: webhook_move_cursor
-- $1 int8 position
UPDATE {schema}.webhook_cursor SET position = $1;

-- name: webhook_claim
-- $1 uuid lease token, $2 float8 lease seconds, $3 int how many. Takes due deliveries that
-- head their lane (no earlier pending one on the same endpoint and connection) and that
-- nobody holds; rows another process is claiming right now are skipped, not waited for.
UPDATE {schema}.webhook_deliveries AS d
SET lease_token = $1, lease_until = now() + make_interval(secs => $2)
FROM {schema}.webhook_endpoints AS e
WHERE e.id = d.endpoint_id AND d.id IN (
    SELECT h.id FROM {schema}.webhook_deliveries AS h
    WHERE h.state = 'pending' AND h.next_attempt_at <= now()
      AND (h.lease_until IS NULL OR h.lease_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM {schema}.webhook_deliveries AS p
          WHERE p.endpoint_id = h.endpoint_id AND p.lane = h.lane
            AND p.state = 'pending' AND p.position < h.position)
    ORDER BY h.next_attempt_at, h.position
    LIMIT $3
    FOR UPDATE OF h SKIP LOCKED
)
RETURNING d.id, d.endpoint_id, d.position, d.lane, d.kind, d.payload, d.attempts,
          e.url, e.secret::text AS secret;

-- name: webhook_finish
-- $1 text id, $2 uuid lease token, $3 text state, $4 int status or NULL, $5 text error or
-- NULL, $6 float8 seconds until the next attempt (pending only). Fenced by the lease: a
-- holder whose lease was taken over changes nothing.
UPDATE {schema}.webhook_deliveries
SET state = $3, attempts = attempts + 1, last_status = $4, last_error = $5,
    next_attempt_at = now() + make_interval(secs => $6),
    finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END,
    lease_until = NULL, lease_token = NULL
WHERE id = $1 AND lease_token = $2
RETURNING id;

-- name: webhook_deliveries_of
-- $1 uuid endpoint, $2 text state or NULL, $3 int how many; newest first
SELECT id, endpoint_id, position, lane, kind, state, attempts, next_attempt_at,
       last_status, last_error, created_at, finished_at
FROM {schema}.webhook_deliveries
WHERE endpoint_id = $1 AND ($2::text IS NULL OR state = $2)
ORDER BY created_at DESC, position DESC
LIMIT $3;

-- name: webhook_replay
-- $1 text delivery id, $2 bool any owner, $3 text owner unless $2; sent again from the first
-- attempt (same id, so a receiver can tell it from a new event)
UPDATE {schema}.webhook_deliveries AS d
SET state = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
    lease_until = NULL, lease_token = NULL
FROM {schema}.webhook_endpoints AS e
WHERE d.id = $1 AND e.id = d.endpoint_id AND ($2 OR e.owner IS NOT DISTINCT FROM $3)
RETURNING d.id;

-- name: webhook_cursor_position
-- no parameters; NULL when no endpoint was ever added
SELECT (SELECT position FROM {schema}.webhook_cursor),
       EXISTS (SELECT 1 FROM {schema}.webhook_endpoints);

-- name: webhook_next_due
-- no parameters; seconds until the earliest pending delivery is due (NULL: none)
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM {schema}.webhook_deliveries WHERE state = 'pending';

-- name: audit_lock
-- $1 int8: advisory lock id; one appender at a time per schema keeps the chain linear.
SELECT pg_advisory_xact_lock($1);

-- name: audit_tail
SELECT seq, hash FROM {schema}.audit_log ORDER BY seq DESC LIMIT 1;

-- name: audit_insert
-- parallel arrays, one element per record
INSERT INTO {schema}.audit_log
    (seq, at, action, actor, owner, uuid, provider, outcome, detail, prev_hash, hash)
SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                     $6::uuid[], $7::text[], $8::text[], $9::text[]::jsonb[], $10::bytea[],
                     $11::bytea[]);

-- name: audit_page
-- $1 bigint before (exclusive), $2 uuid or null, $3 text owner (null: the system), $4 text
-- actor or null, $5 timestamptz since or null, $6 text action (or 'prefix.%') or null,
-- $7 int limit, $8 bool: filter by owner
SELECT seq, at, action, actor, owner, uuid, provider, outcome, detail::text AS detail
FROM {schema}.audit_log
WHERE seq < $1
  AND ($2::uuid IS NULL OR uuid = $2)
  AND (NOT $8::bool OR owner IS NOT DISTINCT FROM $3::text)
  AND ($4::text IS NULL OR actor = $4)
  AND ($5::timestamptz IS NULL OR at >= $5)
  AND ($6::text IS NULL OR action LIKE $6)
ORDER BY seq DESC
LIMIT $7;

-- name: audit_chain
-- $1 bigint after (exclusive), $2 int limit; storage order for verification
SELECT seq, at, action, actor, owner, uuid, provider, outcome, detail::text AS detail,
       prev_hash, hash
FROM {schema}.audit_log
WHERE seq > $1
ORDER BY seq
LIMIT $2;

-- name: audit_sweep
-- $1 bigint: delete records below this seq (the sweep's own record stays)
SELECT set_config('integrations.audit_sweep', 'on', true);

-- name: audit_first_kept
-- $1 timestamptz cutoff
SELECT seq, prev_hash FROM {schema}.audit_log WHERE at >= $1 ORDER BY seq LIMIT 1;

-- name: audit_count_before
-- $1 bigint seq
SELECT count(*) FROM {schema}.audit_log WHERE seq < $1;

-- name: audit_delete_before
-- $1 bigint seq; only after audit_sweep in the same transaction
DELETE FROM {schema}.audit_log WHERE seq < $1;

-- name: audit_anchor
SELECT detail::text FROM {schema}.audit_log WHERE action = 'audit.swept' ORDER BY seq DESC LIMIT 1;
