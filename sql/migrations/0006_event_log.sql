-- The durable event log: one row per event, written in the transaction of the change it
-- describes, so an event is logged exactly when its change committed.
--
-- Positions follow commit order. A sequence drawn at insert time would not do: a
-- transaction may draw position 9, a later one 10, and 10 commit first; a reader that
-- saw 10 and moved its cursor past 9 would never see 9. So positions are drawn at commit
-- time, under a lock: a deferred trigger takes a transaction-level advisory lock, numbers
-- the transaction's events and NOTIFYs them, and the lock is released only once the
-- commit is visible. Whoever draws the next position therefore does so after every lower
-- one has committed, and a reader that sees position p sees every position below p that
-- will ever exist (a rolled-back transaction drew none; the sequence may still skip
-- numbers, so positions increase without being dense). The lock is held only inside
-- COMMIT, for about as long as PostgreSQL's own commit-time lock of a NOTIFYing
-- transaction, which serialises those commits already.
CREATE SEQUENCE {schema}.events_position;

CREATE TABLE {schema}.events (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL until the transaction commits (invisible to readers until then).
    position  bigint      UNIQUE,
    logged_at timestamptz NOT NULL DEFAULT now(),
    kind      text        NOT NULL,
    uuid      text,
    owner     text        NOT NULL DEFAULT '',
    provider  text,
    -- The event as its NOTIFY payload carries it (JSON text, without the position).
    body      text        NOT NULL
);

-- Replays scoped to one owner walk that owner's events in position order.
CREATE INDEX events_owner_position ON {schema}.events (owner, position);

CREATE FUNCTION {schema}.events_number() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    drawn bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('{schema}.events', 0));
    drawn := nextval('{schema}.events_position');
    UPDATE {schema}.events SET position = drawn WHERE id = NEW.id;
    PERFORM pg_notify(TG_ARGV[0], '{"position":' || drawn || ',' || substr(NEW.body, 2));
    RETURN NULL;
END
$$;

-- Fires at COMMIT, once per logged event, in insertion order.
CREATE CONSTRAINT TRIGGER events_number AFTER INSERT ON {schema}.events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION {schema}.events_number('{schema}_events');

-- How far retention has deleted: a cursor below it may have missed events.
CREATE TABLE {schema}.event_log_state (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO {schema}.event_log_state DEFAULT VALUES;
