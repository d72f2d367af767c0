-- The audit trail: append-only, one hash chain per schema. Each record's hash covers the
-- previous record's hash and its own canonical JSON, so an edited, removed or reordered
-- record breaks the chain where it happened. Appends are serialised by an advisory lock.
CREATE TABLE {schema}.audit_log (
    seq        bigint      PRIMARY KEY,
    at         timestamptz NOT NULL,
    action     text        NOT NULL,
    actor      text,
    owner      text,
    uuid       uuid,
    provider   text,
    outcome    text        NOT NULL,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    prev_hash  bytea       NOT NULL,
    hash       bytea       NOT NULL
);

CREATE INDEX audit_log_uuid ON {schema}.audit_log (uuid, seq DESC);
CREATE INDEX audit_log_at ON {schema}.audit_log (at);

-- Rows are never updated; they are deleted only by the retention sweep, which says so in
-- its transaction. The hash chain, not this trigger, is what shows tampering.
CREATE FUNCTION {schema}.audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('integrations.audit_sweep', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the audit log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON {schema}.audit_log
    FOR EACH ROW EXECUTE FUNCTION {schema}.audit_log_append_only();
