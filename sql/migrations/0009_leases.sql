-- Leases: one row per fleet-wide role (the health sweep's leader), held by the process
-- that renews it before it runs out. Plain rows rather than session advisory locks: they
-- hold behind a transaction pooler, and a frozen holder loses its role when its lease
-- runs out, not when its session ends (which a frozen process never lets happen).
CREATE TABLE {schema}.leases (
    purpose    text        PRIMARY KEY,
    -- A random id per leading object, not per process: two in one process are two.
    holder     uuid        NOT NULL,
    -- The database's clock decides: a holder's own clock only ever stops it earlier.
    expires_at timestamptz NOT NULL,
    -- Bumped whenever another holder takes the lease over.
    term       bigint      NOT NULL DEFAULT 1
);
