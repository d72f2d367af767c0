-- Webhooks: endpoints, and one delivery per logged event and matching endpoint.
CREATE TABLE {schema}.webhook_endpoints (
    id          uuid        PRIMARY KEY,
    -- NULL: system-wide (every owner's events); else that owner's events only.
    owner       text,
    url         text        NOT NULL,
    -- NULL: every kind.
    kinds       text[],
    -- The signing secret, sealed like any secret (bound to the endpoint's id).
    secret      jsonb       NOT NULL,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.webhook_deliveries (
    -- The webhook-id header: the same on every attempt of one delivery.
    id              text        PRIMARY KEY,
    endpoint_id     uuid        NOT NULL REFERENCES {schema}.webhook_endpoints (id) ON DELETE CASCADE,
    position        bigint      NOT NULL,
    -- Deliveries of one lane (an endpoint and a connection) go out in position order.
    lane            text        NOT NULL,
    kind            text        NOT NULL,
    payload         text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Held by the process sending it until then; the token fences a late completion.
    lease_until     timestamptz,
    lease_token     uuid,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT webhook_deliveries_once UNIQUE (endpoint_id, position)
);

CREATE INDEX webhook_deliveries_lane
    ON {schema}.webhook_deliveries (endpoint_id, lane, position) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_due
    ON {schema}.webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_recent
    ON {schema}.webhook_deliveries (endpoint_id, created_at DESC);

-- How far the event log has been turned into deliveries.
CREATE TABLE {schema}.webhook_cursor (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    position bigint  NOT NULL DEFAULT 0
);
