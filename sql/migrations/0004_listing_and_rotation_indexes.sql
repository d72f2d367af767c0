-- Indexes that keep listings, per-provider counts and key rotation proportional to what they
-- return or have left to do, whatever the table holds.

-- Whether a row holds saved data: a field beyond what the library itself writes, with a
-- value other than null, "" or {}. The SQL side of _record.has_saved_data (a test keeps
-- the two in step); list_integrations pages read the partial index below.
CREATE FUNCTION {schema}.connection_saved(value_json jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT EXISTS (
        SELECT 1 FROM jsonb_each(value_json) AS f (field, value)
        WHERE f.field <> ALL (ARRAY[
            'provider', 'name', 'auth_type', 'status', 'created_at', 'owner',
            'token_type', 'expires_at', 'token_obtained_at', 'connected_at', 'granted_scopes',
            'reauth_required', 'account', 'token_extras', 'refresh_error', 'refresh_lease',
            'validation_status', 'last_validated_at', 'last_ok_at', 'disconnected_at'])
          AND f.value NOT IN ('null'::jsonb, '""'::jsonb, '{}'::jsonb))
$$;

CREATE INDEX connections_saved
    ON {schema}.connections (owner, key text_pattern_ops)
    WHERE {schema}.connection_saved(value_json);

-- Every owner's rows in key order (the administrator's console listing); byte order, as
-- text_pattern_ops, so that row comparisons can page through it.
CREATE INDEX connections_key_owner
    ON {schema}.connections ((key COLLATE "C"), (owner COLLATE "C"));

-- The key ids of a row's envelopes (top-level fields and values under "credentials"),
-- sorted and distinct; '' stands for an envelope without a readable key id. A row that
-- holds no envelope has '{}'. Rows still to rotate are those whose array is neither '{}'
-- nor exactly the primary key id: two index ranges around that one value.
CREATE FUNCTION {schema}.envelope_kids(value_json jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(DISTINCT kid ORDER BY kid), '{}')
    FROM (
        SELECT CASE WHEN jsonb_typeof(v -> 'kid') = 'string' THEN v ->> 'kid' ELSE '' END
        FROM (
            SELECT f.value FROM jsonb_each(value_json) AS f
            UNION ALL
            SELECT c.value
            FROM jsonb_each(CASE WHEN jsonb_typeof(value_json -> 'credentials') = 'object'
                                 THEN value_json -> 'credentials' ELSE '{}'::jsonb END) AS c
        ) AS e (v)
        WHERE jsonb_typeof(v) = 'object' AND v ? '$enc'
    ) AS k (kid)
$$;

CREATE INDEX connections_envelope_kids
    ON {schema}.connections ({schema}.envelope_kids(value_json), uuid);

-- Top-level fields that hold a value other than null or an envelope ("credentials" when a
-- value under it is neither), the library's own bookkeeping left out. While encryption is
-- on, rows whose array overlaps the secret field names hold plaintext to seal: the GIN
-- index finds them without reading the others.
CREATE FUNCTION {schema}.plain_fields(value_json jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(f.field ORDER BY f.field), '{}')
    FROM jsonb_each(value_json) AS f (field, value)
    WHERE f.field <> ALL (ARRAY[
            'provider', 'name', 'auth_type', 'status', 'created_at', 'owner',
            'token_type', 'expires_at', 'token_obtained_at', 'connected_at', 'granted_scopes',
            'reauth_required', 'account', 'token_extras', 'refresh_error', 'refresh_lease',
            'validation_status', 'last_validated_at', 'last_ok_at', 'disconnected_at'])
      AND f.value <> 'null'::jsonb
      AND NOT (jsonb_typeof(f.value) = 'object' AND f.value ? '$enc')
      AND (f.field <> 'credentials' OR jsonb_typeof(f.value) <> 'object' OR EXISTS (
            SELECT 1 FROM jsonb_each(f.value) AS c (field, value)
            WHERE c.value <> 'null'::jsonb
              AND NOT (jsonb_typeof(c.value) = 'object' AND c.value ? '$enc')))
$$;

CREATE INDEX connections_plain_fields
    ON {schema}.connections USING gin ({schema}.plain_fields(value_json));

-- Connections per owner and provider, kept as deltas appended by a statement trigger (no
-- row is ever updated, so concurrent writers never wait on each other); readers sum them
-- and fold a scope's deltas into one row per provider now and then. scope is 'o:' || owner
-- for an owner's rows ('o:' for the system's) and 'all' for every owner's.
CREATE TABLE {schema}.connection_counts (
    scope    text   NOT NULL,
    provider text   NOT NULL,
    n        bigint NOT NULL
);

CREATE INDEX connection_counts_scope ON {schema}.connection_counts (scope, provider);

-- Each branch reads only the transition tables its trigger defines (PL/pgSQL plans a
-- statement when it first runs it).
CREATE FUNCTION {schema}.count_connections() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {schema}.connection_counts (scope, provider, n)
        SELECT s.scope, split_part(r.key, ':', 2), count(*)
        FROM changed_rows_new AS r
        CROSS JOIN LATERAL (VALUES ('o:' || r.owner), ('all')) AS s (scope)
        WHERE r.key LIKE 'integration:%'
        GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {schema}.connection_counts (scope, provider, n)
        SELECT s.scope, split_part(r.key, ':', 2), -count(*)
        FROM changed_rows_old AS r
        CROSS JOIN LATERAL (VALUES ('o:' || r.owner), ('all')) AS s (scope)
        WHERE r.key LIKE 'integration:%'
        GROUP BY 1, 2;
    ELSE
        -- An update moves a count only when it changes a key's provider or an owner
        -- (by hand: the library never does); most updates add nothing.
        INSERT INTO {schema}.connection_counts (scope, provider, n)
        SELECT s.scope, d.provider, sum(d.n)
        FROM (
            SELECT owner, split_part(key, ':', 2) AS provider, 1 AS n
            FROM changed_rows_new WHERE key LIKE 'integration:%'
            UNION ALL
            SELECT owner, split_part(key, ':', 2), -1
            FROM changed_rows_old WHERE key LIKE 'integration:%'
        ) AS d
        CROSS JOIN LATERAL (VALUES ('o:' || d.owner), ('all')) AS s (scope)
        GROUP BY s.scope, d.provider
        HAVING sum(d.n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER connections_counted_insert AFTER INSERT ON {schema}.connections
    REFERENCING NEW TABLE AS changed_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.count_connections();

CREATE TRIGGER connections_counted_delete AFTER DELETE ON {schema}.connections
    REFERENCING OLD TABLE AS changed_rows_old
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.count_connections();

CREATE TRIGGER connections_counted_update AFTER UPDATE ON {schema}.connections
    REFERENCING OLD TABLE AS changed_rows_old NEW TABLE AS changed_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.count_connections();

-- TRUNCATE empties the counts too.
CREATE FUNCTION {schema}.connections_truncated_counts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {schema}.connection_counts;
    RETURN NULL;
END
$$;

CREATE TRIGGER connections_counted_truncate AFTER TRUNCATE ON {schema}.connections
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.connections_truncated_counts();

-- The rows already there.
INSERT INTO {schema}.connection_counts (scope, provider, n)
SELECT s.scope, split_part(r.key, ':', 2), count(*)
FROM {schema}.connections AS r
CROSS JOIN LATERAL (VALUES ('o:' || r.owner), ('all')) AS s (scope)
WHERE r.key LIKE 'integration:%'
GROUP BY 1, 2;
