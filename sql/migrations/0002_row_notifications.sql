-- Every committed change to a connection row notifies its uuid, whatever wrote it (a write
-- without an event, a key rotation batch, SQL run by hand), so that per-process row caches
-- drop what changed. Payload: {"rows": ["<uuid>", ...]}, or {"rows": "*"} for a statement
-- that touched too many rows to list within the NOTIFY size limit.
CREATE FUNCTION {schema}.connections_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids text[];
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(uuid::text) INTO ids FROM changed_rows_old;
    ELSE
        SELECT array_agg(uuid::text) INTO ids FROM changed_rows_new;
    END IF;
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    IF cardinality(ids) > 150 THEN
        PERFORM pg_notify(TG_ARGV[0], '{"rows":"*"}');
    ELSE
        PERFORM pg_notify(TG_ARGV[0], '{"rows":' || to_json(ids)::text || '}');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER connections_inserted AFTER INSERT ON {schema}.connections
    REFERENCING NEW TABLE AS changed_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.connections_changed('{schema}_events_rows');

CREATE TRIGGER connections_updated AFTER UPDATE ON {schema}.connections
    REFERENCING NEW TABLE AS changed_rows_new
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.connections_changed('{schema}_events_rows');

CREATE TRIGGER connections_deleted AFTER DELETE ON {schema}.connections
    REFERENCING OLD TABLE AS changed_rows_old
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.connections_changed('{schema}_events_rows');
