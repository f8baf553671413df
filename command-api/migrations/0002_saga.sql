-- The saga follows the log from a checkpoint and keeps the transactions it still has to finish.
-- Both change in one database transaction per batch, so a crash replays a batch (every step is
-- idempotent) and never loses a transaction.
CREATE TABLE saga_checkpoint (
    name       text        PRIMARY KEY,
    tx_id      bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

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
