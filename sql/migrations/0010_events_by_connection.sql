-- One connection's logged events in position order: the console's events panel and a
-- subscription filtered by uuid read them through this index instead of walking the
-- whole log (events_after_uuid).
CREATE INDEX events_uuid_position ON {schema}.events (uuid, position);
