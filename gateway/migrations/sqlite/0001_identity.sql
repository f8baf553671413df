-- The gateway's identities for `ledger serve` (SPEC §5 "Identity", §10), in the data
-- directory's SQLite file: the same rules as the PostgreSQL tables of migrations/*.sql.
-- Times are Unix milliseconds; ids are hyphenated UUID text; roles are space-separated names.
CREATE TABLE users (
    customer_id     TEXT    PRIMARY KEY,
    username        TEXT    NOT NULL UNIQUE
        CHECK (length(username) BETWEEN 3 AND 32 AND username NOT GLOB '*[^a-z0-9_.-]*'),
    -- argon2id, as a PHC string (algorithm, parameters and salt included).
    password_hash   TEXT    NOT NULL CHECK (password_hash LIKE '$argon2%'),
    -- Personal data: stored for the customer, never logged.
    name            TEXT,
    roles           TEXT    NOT NULL DEFAULT 'customer' CHECK (roles NOT GLOB '*[^a-z ]*'),
    -- The admin the gateway itself created from ADMIN_USERNAME (see the PostgreSQL migration).
    bootstrap_admin INTEGER NOT NULL DEFAULT 0 CHECK (bootstrap_admin IN (0, 1)),
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
) STRICT;

-- A login: the refresh token's SHA-256 (never the token), its user, and when it ends.
CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY,
    customer_id TEXT    NOT NULL REFERENCES users (customer_id) ON DELETE CASCADE,
    token_hash  BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX sessions_by_customer ON sessions (customer_id, created_at);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
