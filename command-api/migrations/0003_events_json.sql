-- An event's payload and metadata are stored as `json`, not `jsonb` (decision 71). Nothing
-- queries inside them: every reader takes them as text and decodes them itself, and the one
-- writer (the committer) sends them as text. `jsonb` parsed each event into its binary form on
-- the way in and printed it back on every read (the saga, the relay, the projector, stream
-- loads): about twice the server's work per insert and per read for no use. `json` checks that
-- the text is JSON and keeps it as written.
--
-- The meaning of a stored event does not change: the text each row holds now is what `jsonb`
-- printed, the same JSON value. This rewrites the table (ALTER TABLE holds an exclusive lock
-- while it does; on a large log, run it in a maintenance window: docs/operations.md). Row
-- triggers do not fire on a rewrite, so the append-only triggers stay as they are.
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata TYPE json USING metadata::json;
