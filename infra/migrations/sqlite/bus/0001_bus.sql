-- The embedded bus (infra::bus::local): where each log consumer stands, and what it gave up on.
--   bus_checkpoints  the position of the last event the consumer has settled (handled or
--                    recorded as poison); it moves only after the handler returned Ok
--   bus_poison       messages that can never be handled, with the reason; never delivered again
CREATE TABLE bus_checkpoints (
    consumer        TEXT    PRIMARY KEY,
    position_commit INTEGER NOT NULL,
    position_index  INTEGER NOT NULL,
    updated_at      TEXT    NOT NULL
) STRICT;

CREATE TABLE bus_poison (
    consumer        TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    position_commit INTEGER NOT NULL,
    position_index  INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    recorded_at     TEXT    NOT NULL,
    PRIMARY KEY (consumer, message_id)
) STRICT;
