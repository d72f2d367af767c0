-- A listing filtered by status alone reads only the rows it returns, in the order it
-- returns them: one owner's in key order, every owner's in (key, owner) byte order.
CREATE INDEX connections_owner_status_key
    ON {schema}.connections (owner, (value_json ->> 'status'), key text_pattern_ops);

CREATE INDEX connections_status_key_owner
    ON {schema}.connections ((value_json ->> 'status'), (key COLLATE "C"), (owner COLLATE "C"));

-- Folding count deltas deletes rows whose index entries a count keeps visiting (a heap
-- page each) until they are vacuumed. By default autovacuum waits for a fifth of the table
-- to be dead, which after a bulk load (many deltas of scopes no reader has folded yet)
-- can be never: vacuum after a fixed number of dead rows instead, whatever the size.
ALTER TABLE {schema}.connection_counts SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200
);
