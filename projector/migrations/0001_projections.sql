-- The projector's bookkeeping. The read models themselves live in generation tables
-- (`<table>_g<N>`) created by the projector from the shapes in `src/model/`, so a rebuild can
-- fill generation N+1 beside the live generation N; the views named after each table (e.g.
-- `transactions`) point at the live generation and are switched in the same transaction that
-- flips `live_generation`. Queries read the views only.

-- One row per projection: which generation serves, which one a rebuild is filling.
CREATE TABLE projections (
    name                text        PRIMARY KEY,
    live_generation     integer     NOT NULL,
    building_generation integer,
    next_generation     integer     NOT NULL,
    switched_at         timestamptz NOT NULL DEFAULT now()
);

-- Where each generation of each projection stands in the log, moved in the same database
-- transaction as the rows a batch changed: a crash neither skips nor re-applies an event.
CREATE TABLE checkpoints (
    projection     text        NOT NULL,
    generation     integer     NOT NULL,
    tx_id          bigint      NOT NULL DEFAULT 0,
    position       bigint      NOT NULL DEFAULT 0,
    events_applied bigint      NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, generation)
);
