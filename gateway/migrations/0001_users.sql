-- The gateway's identities (SPEC §5 "Identity"), in the schema `gateway`.
-- customer_id is the `sub` of every token and the `owner_id` of the customer's accounts.
CREATE TABLE users (
    customer_id   uuid        PRIMARY KEY,
    username      text        NOT NULL,
    -- argon2id, as a PHC string (algorithm, parameters and salt included).
    password_hash text        NOT NULL,
    -- Personal data: stored for the customer, never logged.
    name          text,
    roles         text[]      NOT NULL DEFAULT ARRAY['customer']::text[],
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_username_key UNIQUE (username),
    CONSTRAINT users_username_format CHECK (username ~ '^[a-z0-9_.-]{3,32}$'),
    CONSTRAINT users_password_hash_phc CHECK (password_hash LIKE '$argon2%'),
    CONSTRAINT users_roles_known CHECK (roles <@ ARRAY['customer', 'admin', 'auditor']::text[])
);
