-- The event log on SQLite: sqlite-es's `events` table (its SELECTs name the first seven
-- columns), plus what the log needs.
--   position     the row id, assigned in commit order: one writer appends at a time
--   event_id     the event's identity, chosen by the writer (derived from the command)
--   recorded_at  when the event was written (RFC 3339, UTC, microseconds)
CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence > 0),
    event_type     TEXT    NOT NULL,
    event_version  TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE INDEX events_by_type ON events (aggregate_type, event_type, position);

-- Events are facts: the store is append-only. Corrections are new events, never edits.
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'the event store is append-only: UPDATE on events is refused');
END;

CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'the event store is append-only: DELETE on events is refused');
END;

-- Snapshots of aggregate states: a shortcut for loads (see the PostgreSQL twin).
CREATE TABLE aggregate_snapshots (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    sequence       INTEGER NOT NULL,
    state_version  INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) STRICT;
