-- Issue 11 (SPEC §5): the operator role, the bootstrap admin, and refresh sessions.

-- The payment rail's identity: deposits and withdrawals on any account, reads to see outcomes.
ALTER TABLE users DROP CONSTRAINT users_roles_known;
ALTER TABLE users ADD CONSTRAINT users_roles_known
    CHECK (roles <@ ARRAY['customer', 'operator', 'admin', 'auditor']::text[]);

-- The admin the gateway itself created from ADMIN_USERNAME. Only this user's password and admin
-- role are (re)set at start; a user of that name the gateway did not create stops the start.
ALTER TABLE users ADD COLUMN bootstrap_admin boolean NOT NULL DEFAULT false;

-- Today's bootstrap admin, as the gateway created it before this column existed: an admin
-- without the customer role and without a name. A registered user always starts as a customer,
-- and the old ensure step only appended 'admin' to it, so a customer that registered the
-- admin's name first stays unmarked, and the gateway now refuses to start naming it.
UPDATE users SET bootstrap_admin = true
WHERE 'admin' = ANY(roles) AND NOT ('customer' = ANY(roles)) AND name IS NULL;

-- A login: the refresh token's SHA-256 (never the token), its user, and when it ends. A refresh
-- reads the user's roles now, so a role change reaches every new access token.
CREATE TABLE sessions (
    id          uuid        PRIMARY KEY,
    customer_id uuid        NOT NULL REFERENCES users (customer_id) ON DELETE CASCADE,
    token_hash  bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT sessions_token_hash_key UNIQUE (token_hash),
    CONSTRAINT sessions_token_hash_sha256 CHECK (length(token_hash) = 32)
);
CREATE INDEX sessions_by_customer ON sessions (customer_id, created_at);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
