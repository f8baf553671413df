-- The write side's followers on SQLite (the embedded mode): where each stands, and the
-- transactions the saga still has to finish. The twin of migrations/0002_saga.sql.
CREATE TABLE follower_checkpoints (
    name       TEXT    PRIMARY KEY,
    commit_at  INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

-- due_at is unix milliseconds: compared as numbers, not as text.
CREATE TABLE saga_inflight (
    transaction_id TEXT    PRIMARY KEY,
    correlation_id TEXT,
    due_at_ms      INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT
) STRICT;

CREATE INDEX saga_inflight_due ON saga_inflight (due_at_ms);
