-- How the event log stores what it holds, made cheaper for the server (decision 71). Nothing
-- stored changes meaning.
--
-- 1. An event's payload and metadata are `json`, not `jsonb`. Nothing queries inside them:
--    every reader takes them as text and decodes them itself, and the one writer (the
--    committer) sends text. `jsonb` parsed each event into its binary form on the way in and
--    printed it back on every read (the saga, the relay, the projector, stream loads): about
--    twice the server's work per insert and per read, for no use. `json` checks that the text is
--    JSON and keeps it as written. The text each existing row holds now is what `jsonb` printed:
--    the same JSON value.
--
-- 2. The stream keys compare byte by byte (`COLLATE "C"`). Every append probes the primary key
--    (the stream's last version) and inserts into it; under a database's linguistic collation
--    (even `C.UTF-8` on PostgreSQL 15) each comparison in those descents copies both strings
--    and calls the C library's `strcoll`. The keys are our own ASCII names and ids, compared
--    for equality and grouped in the index; their order in it has no meaning.
--
-- This rewrites the table and rebuilds its indexes, under an exclusive lock: on a large log,
-- run it in a maintenance window (docs/operations.md, "Upgrading"). Row triggers do not fire on
-- a rewrite, so the append-only triggers stay as they are.
ALTER TABLE events
    ALTER COLUMN aggregate_type TYPE text COLLATE "C",
    ALTER COLUMN aggregate_id TYPE text COLLATE "C",
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata TYPE json USING metadata::json;

ALTER TABLE aggregate_snapshots
    ALTER COLUMN aggregate_type TYPE text COLLATE "C",
    ALTER COLUMN aggregate_id TYPE text COLLATE "C";
