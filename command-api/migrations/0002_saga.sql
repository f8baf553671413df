-- Each follower of the log (the saga, the relay) keeps its checkpoint here, moved in the same
-- database transaction as whatever else the follower records for a batch.
CREATE TABLE follower_checkpoints (
    name       text        PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The saga keeps the transactions it still has to finish; they change with its checkpoint, so a
-- crash replays a batch (every step is idempotent) and never loses a transaction.
-- Every non-final transaction, and when the saga must look at it again without a new event:
-- the fraud decision deadline, or a retry after a failed step.
CREATE TABLE saga_inflight (
    transaction_id uuid        PRIMARY KEY,
    correlation_id text,
    due_at         timestamptz NOT NULL,
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text
);

CREATE INDEX saga_inflight_due ON saga_inflight (due_at);
