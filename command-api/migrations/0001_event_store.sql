-- The event store: postgres-es's table (its INSERT names only the first seven columns), plus the
-- columns every follower needs. Defaults fill them, so postgres-es writes them without knowing.
--   event_id     the event's identity: RabbitMQ message_id, audit trail
--   recorded_at  when the event was written
--   tx_id        the inserting transaction: the log is read in (tx_id, position) order, and only
--                below the oldest running transaction, so no reader ever skips a late commit
--   position     insert order within a transaction
-- No constraint here may raise a unique violation other than the primary key: postgres-es maps
-- every SQLSTATE 23505 to a write conflict.
CREATE TABLE events (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence > 0),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    tx_id          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    position       bigint      GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE INDEX events_commit_order ON events (tx_id, position);

-- Events are facts: the store is append-only. Corrections are new events, never edits.
CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event store is append-only: % on events is refused', TG_OP;
END;
$$;

CREATE TRIGGER events_append_only_rows
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

CREATE TRIGGER events_append_only_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- Our own snapshots (not postgres-es's snapshot modes, which apply events twice in 0.5):
-- the state of an aggregate after `sequence`, in the format `state_version` names. A snapshot
-- is only a shortcut: loading from it must equal a full replay (tested), and one whose
-- state_version is unknown is ignored.
CREATE TABLE aggregate_snapshots (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    state_version  integer     NOT NULL,
    state          jsonb       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
