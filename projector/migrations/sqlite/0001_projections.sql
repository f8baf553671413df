-- The projector's bookkeeping in the embedded mode's SQLite file: the same tables as in
-- PostgreSQL (../0001_projections.sql), timestamps as RFC 3339 text. The read models themselves
-- live in generation tables (`<table>_g<N>`) created by the projector from the shapes in
-- `src/model/`, behind views named after each table, switched in the same transaction that
-- flips `live_generation`.

CREATE TABLE projections (
    name                TEXT    PRIMARY KEY,
    live_generation     INTEGER NOT NULL,
    building_generation INTEGER,
    next_generation     INTEGER NOT NULL,
    switched_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE checkpoints (
    projection     TEXT    NOT NULL,
    generation     INTEGER NOT NULL,
    tx_id          INTEGER NOT NULL DEFAULT 0,
    position       INTEGER NOT NULL DEFAULT 0,
    events_applied INTEGER NOT NULL DEFAULT 0,
    updated_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (projection, generation)
);
