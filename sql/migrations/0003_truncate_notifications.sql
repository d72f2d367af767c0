-- TRUNCATE fires no row or statement trigger of 0002: announce it too, as "every row",
-- so that per-process row caches drop what they hold.
CREATE FUNCTION {schema}.connections_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '{"rows":"*"}');
    RETURN NULL;
END
$$;

CREATE TRIGGER connections_truncated AFTER TRUNCATE ON {schema}.connections
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.connections_truncated('{schema}_events_rows');
