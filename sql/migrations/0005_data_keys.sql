-- Data keys wrapped by a key-encryption key held outside the database (a KMS key, an HSM
-- key): the wrapped bytes and the identity of their wrapper, never the key itself.
CREATE TABLE {schema}.data_keys (
    kid        text        PRIMARY KEY,
    wrapper    text        NOT NULL,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX data_keys_wrapper ON {schema}.data_keys (wrapper, created_at DESC);
