-- Connections: one row per named connection; secrets are sealed inside value_json.
-- owner '' is the system scope (NULL would defeat the unique constraint).
CREATE TABLE {schema}.connections (
    uuid        uuid        PRIMARY KEY,
    owner       text        NOT NULL DEFAULT '',
    key         text        NOT NULL,
    value_json  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version     bigint      NOT NULL DEFAULT 1,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT connections_owner_key UNIQUE (owner, key)
);

-- Provider-prefix scans: key LIKE 'integration:google:%'.
CREATE INDEX connections_owner_key_prefix
    ON {schema}.connections (owner, key text_pattern_ops);

-- Pending OAuth authorizations: single-use, expiring; only a hash of the state is kept.
CREATE TABLE {schema}.pending_authorizations (
    state_hash      text        PRIMARY KEY,
    connection_uuid uuid        NOT NULL REFERENCES {schema}.connections (uuid) ON DELETE CASCADE,
    owner           text        NOT NULL DEFAULT '',
    redirect_uri    text        NOT NULL,
    scopes          text[]      NOT NULL DEFAULT '{}',
    code_verifier   jsonb,
    actor           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);

CREATE INDEX pending_authorizations_expires_at
    ON {schema}.pending_authorizations (expires_at);
CREATE INDEX pending_authorizations_connection
    ON {schema}.pending_authorizations (connection_uuid);
