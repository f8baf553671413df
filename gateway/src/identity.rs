//! Identities (SPEC §5 "Identity"): the rules for usernames, passwords and names, the users and
//! the sessions (refresh tokens) of logged-in users. Passwords never reach this module unhashed
//! except to be validated; names, passwords and refresh tokens are never logged, and a refresh
//! token is stored only as its SHA-256.
//!
//! [`Identities`] is the seam (SPEC §10): [`PgIdentities`] keeps them in the schema `gateway` of
//! PostgreSQL for the services, [`SqliteIdentities`] in the data directory's SQLite file for
//! `ledger serve`. Both keep the same rules, checked by
//! [`identity_conformance!`](crate::identity_conformance) against both. The login limiter is
//! not part of it: it stays in memory in both modes (`crate::limiter`).

#[cfg(feature = "testing")]
pub mod conformance;
mod sqlite;

pub use sqlite::SqliteIdentities;

use std::time::Duration;

use async_trait::async_trait;
use infra::auth::Role;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{DatabaseContext, Error, Result};

/// Random bytes in a refresh token: 256 bits, beyond guessing, so a fast hash (SHA-256) is
/// enough to store it.
const REFRESH_TOKEN_BYTES: usize = 32;

/// Sessions kept per user: a user logged in on more devices than this loses its oldest login.
/// It bounds what one account (or a script logging it in) can make the table hold.
pub const SESSIONS_PER_USER_MAX: i64 = 32;

/// Expired sessions deleted per login, of anyone's: enough to keep up with the logins that make
/// them, in a statement that stays short.
pub const EXPIRED_SESSIONS_SWEPT_PER_LOGIN: i64 = 100;

/// Usernames are 3–32 characters of `[a-z0-9_.-]`.
const USERNAME_CHARS_MIN: usize = 3;
const USERNAME_CHARS_MAX: usize = 32;

/// Passwords are 12–128 characters, with no composition rules (NIST SP 800-63B): length is
/// what makes a password strong; the upper bound keeps hashing bounded.
pub const PASSWORD_CHARS_MIN: usize = 12;
pub const PASSWORD_CHARS_MAX: usize = 128;

/// Longest display name.
const NAME_CHARS_MAX: usize = 200;

/// The unique constraint behind a taken username.
const USERNAME_CONSTRAINT: &str = "users_username_key";

/// Checks a username against `[a-z0-9_.-]{3,32}`.
pub fn validate_username(username: &str) -> Result<(), String> {
    let valid = (USERNAME_CHARS_MIN..=USERNAME_CHARS_MAX).contains(&username.len())
        && username.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "a username is {USERNAME_CHARS_MIN}-{USERNAME_CHARS_MAX} characters of a-z, 0-9, _, . and -"
        ))
    }
}

/// Checks a password's length in characters: 12–128.
pub fn validate_password(password: &SecretString) -> Result<(), String> {
    let length = password.expose_secret().chars().count();
    if (PASSWORD_CHARS_MIN..=PASSWORD_CHARS_MAX).contains(&length) {
        Ok(())
    } else {
        Err(format!(
            "a password is {PASSWORD_CHARS_MIN}-{PASSWORD_CHARS_MAX} characters long"
        ))
    }
}

/// Checks a display name: 1–200 characters, no control characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    let length = name.chars().count();
    if (1..=NAME_CHARS_MAX).contains(&length) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "a name is 1-{NAME_CHARS_MAX} characters without control characters"
        ))
    }
}

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub customer_id: Uuid,
    pub username: String,
    pub roles: Vec<Role>,
}

/// What a login needs.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub customer_id: Uuid,
    pub password_hash: String,
    pub roles: Vec<Role>,
}

/// A session opened by a login.
pub struct NewSession {
    /// The refresh token, shown to the client once. No `Debug`: it is a credential.
    pub refresh_token: SecretString,
    pub expires_in: Duration,
}

/// What a refresh token stands for now.
#[derive(Debug, Clone)]
pub struct Refreshed {
    pub customer_id: Uuid,
    /// The user's roles now, not at login.
    pub roles: Vec<Role>,
    /// Seconds until the session ends.
    pub expires_in_seconds: i64,
}

/// Why the admin of `ADMIN_USERNAME` could not be ensured.
#[derive(Debug)]
pub enum AdminEnsured {
    Ensured {
        admin: User,
        created: bool,
    },
    /// The name belongs to a user the gateway did not create as its bootstrap admin.
    Conflict {
        customer_id: Uuid,
    },
}

/// The users and their sessions, wherever they are kept.
#[async_trait]
pub trait Identities: Send + Sync {
    /// Inserts a customer; [`Error::UsernameTaken`] if the username exists.
    async fn register(
        &self,
        username: &str,
        password_hash: &str,
        name: Option<&str>,
    ) -> Result<User>;

    /// Whether `username` is taken: checked before a registration's password is hashed, so a
    /// taken name costs a 409 and no argon2 work. (The insert still catches a race.)
    async fn username_taken(&self, username: &str) -> Result<bool>;

    /// The password hash and roles of `username`, if it exists.
    async fn credentials(&self, username: &str) -> Result<Option<Credentials>>;

    /// Replaces a user's roles (none disables it); `None` if there is no such user.
    async fn set_roles(&self, customer_id: Uuid, roles: &[Role]) -> Result<Option<User>>;

    /// Makes sure the bootstrap admin `username` exists with `password_hash` and the admin role
    /// (keeping any other roles it has). Returns the user and whether it was created, or the
    /// conflict when the name belongs to a user not created as the bootstrap admin: that user
    /// is left untouched. Atomic, so several instances starting together agree.
    async fn ensure_admin(&self, username: &str, password_hash: &str) -> Result<AdminEnsured>;

    /// Opens a session for `customer_id` lasting `lifetime`: a new refresh token, stored as its
    /// SHA-256. Keeps the user's sessions to [`SESSIONS_PER_USER_MAX`] (the oldest goes) and
    /// sweeps some expired ones of anyone's.
    async fn open_session(&self, customer_id: Uuid, lifetime: Duration) -> Result<NewSession>;

    /// The user and current roles behind a refresh token, if it names a live session.
    async fn refresh(&self, refresh_token: &SecretString) -> Result<Option<Refreshed>>;

    /// Ends the session of a refresh token, if any.
    async fn end_session(&self, refresh_token: &SecretString) -> Result<()>;

    /// Whether the store answers within `timeout` (for `/health`).
    async fn ping(&self, timeout: Duration) -> bool;

    /// How an operator marks `customer_id` as the bootstrap admin, for the message that refuses
    /// to start when `ADMIN_USERNAME` names it.
    fn how_to_mark_bootstrap_admin(&self, customer_id: Uuid) -> String;
}

/// The identities in the schema `gateway` of PostgreSQL.
#[derive(Clone)]
pub struct PgIdentities {
    pool: PgPool,
}

type UserRow = (Uuid, String, Vec<String>);

impl PgIdentities {
    pub fn new(pool: PgPool) -> Self {
        PgIdentities { pool }
    }
}

#[async_trait]
impl Identities for PgIdentities {
    async fn register(
        &self,
        username: &str,
        password_hash: &str,
        name: Option<&str>,
    ) -> Result<User> {
        let inserted: std::result::Result<UserRow, sqlx::Error> = sqlx::query_as(
            "INSERT INTO users (customer_id, username, password_hash, name, roles) \
             VALUES ($1, $2, $3, $4, ARRAY['customer']) \
             RETURNING customer_id, username, roles",
        )
        .bind(Uuid::new_v4())
        .bind(username)
        .bind(password_hash)
        .bind(name)
        .fetch_one(&self.pool)
        .await;
        match inserted {
            Ok(row) => Ok(user_of(row)),
            Err(sqlx::Error::Database(error))
                if error.constraint() == Some(USERNAME_CONSTRAINT) =>
            {
                Err(Error::UsernameTaken)
            }
            Err(error) => Err(error).context("registering a user"),
        }
    }

    /// Whether `username` is taken: checked before a registration's password is hashed, so a
    /// taken name costs a 409 and no argon2 work. (The insert still catches a race.)
    async fn username_taken(&self, username: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)")
            .bind(username)
            .fetch_one(&self.pool)
            .await
            .context("looking up a username")
    }

    async fn credentials(&self, username: &str) -> Result<Option<Credentials>> {
        let row: Option<(Uuid, String, Vec<String>)> = sqlx::query_as(
            "SELECT customer_id, password_hash, roles FROM users WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await
        .context("reading a user's credentials")?;
        Ok(row.map(|(customer_id, password_hash, roles)| Credentials {
            customer_id,
            password_hash,
            roles: roles_of(&roles),
        }))
    }

    /// Replaces a user's roles; `None` if there is no such user.
    async fn set_roles(&self, customer_id: Uuid, roles: &[Role]) -> Result<Option<User>> {
        let names: Vec<&str> = roles.iter().map(|role| role_name(*role)).collect();
        let row: Option<UserRow> = sqlx::query_as(
            "UPDATE users SET roles = $2, updated_at = now() WHERE customer_id = $1 \
             RETURNING customer_id, username, roles",
        )
        .bind(customer_id)
        .bind(&names)
        .fetch_optional(&self.pool)
        .await
        .context("setting a user's roles")?;
        Ok(row.map(user_of))
    }

    /// Makes sure the bootstrap admin `username` exists with `password_hash` and the admin role
    /// (keeping any other roles it has). Returns the user and whether it was created, or the
    /// conflict when the name belongs to a user the gateway did not create as its bootstrap
    /// admin: that user is left untouched. One statement, so several instances starting
    /// together agree.
    async fn ensure_admin(&self, username: &str, password_hash: &str) -> Result<AdminEnsured> {
        let ensured: Option<(Uuid, String, Vec<String>, bool)> = sqlx::query_as(
            "INSERT INTO users (customer_id, username, password_hash, roles, bootstrap_admin) \
             VALUES ($1, $2, $3, ARRAY['admin'], true) \
             ON CONFLICT (username) DO UPDATE SET \
               password_hash = EXCLUDED.password_hash, \
               roles = CASE WHEN 'admin' = ANY(users.roles) THEN users.roles \
                            ELSE array_append(users.roles, 'admin') END, \
               updated_at = now() \
             WHERE users.bootstrap_admin \
             RETURNING customer_id, username, roles, (xmax = 0) AS created",
        )
        .bind(Uuid::new_v4())
        .bind(username)
        .bind(password_hash)
        .fetch_optional(&self.pool)
        .await
        .context("ensuring the admin user")?;
        if let Some((customer_id, username, roles, created)) = ensured {
            return Ok(AdminEnsured::Ensured {
                admin: user_of((customer_id, username, roles)),
                created,
            });
        }
        let customer_id: Uuid =
            sqlx::query_scalar("SELECT customer_id FROM users WHERE username = $1")
                .bind(username)
                .fetch_one(&self.pool)
                .await
                .context("naming the user that holds the admin's name")?;
        Ok(AdminEnsured::Conflict { customer_id })
    }

    /// Opens a session for `customer_id` lasting `lifetime`: a new refresh token, stored as its
    /// SHA-256. Keeps the user's sessions bounded and sweeps some expired ones.
    async fn open_session(&self, customer_id: Uuid, lifetime: Duration) -> Result<NewSession> {
        let token = new_refresh_token();
        let seconds = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        let mut transaction = self.pool.begin().await.context("opening a session")?;
        sqlx::query(
            "DELETE FROM sessions WHERE id IN ( \
               SELECT id FROM sessions WHERE customer_id = $1 \
               ORDER BY created_at DESC OFFSET $2)",
        )
        .bind(customer_id)
        .bind(SESSIONS_PER_USER_MAX - 1)
        .execute(&mut *transaction)
        .await
        .context("bounding a user's sessions")?;
        sqlx::query(
            "DELETE FROM sessions WHERE id IN ( \
               SELECT id FROM sessions WHERE expires_at <= now() LIMIT $1)",
        )
        .bind(EXPIRED_SESSIONS_SWEPT_PER_LOGIN)
        .execute(&mut *transaction)
        .await
        .context("sweeping expired sessions")?;
        sqlx::query(
            "INSERT INTO sessions (id, customer_id, token_hash, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        )
        .bind(Uuid::now_v7())
        .bind(customer_id)
        .bind(token_hash(&token))
        .bind(seconds as f64)
        .execute(&mut *transaction)
        .await
        .context("storing a session")?;
        transaction.commit().await.context("opening a session")?;
        Ok(NewSession {
            refresh_token: SecretString::from(token),
            expires_in: lifetime,
        })
    }

    /// The user and current roles behind a refresh token, if it names a live session.
    async fn refresh(&self, refresh_token: &SecretString) -> Result<Option<Refreshed>> {
        let row: Option<(Uuid, Vec<String>, f64)> = sqlx::query_as(
            "SELECT u.customer_id, u.roles, \
                    extract(epoch FROM s.expires_at - now())::float8 \
             FROM sessions s JOIN users u ON u.customer_id = s.customer_id \
             WHERE s.token_hash = $1 AND s.expires_at > now()",
        )
        .bind(token_hash(refresh_token.expose_secret()))
        .fetch_optional(&self.pool)
        .await
        .context("reading a session")?;
        Ok(row.map(|(customer_id, roles, seconds)| Refreshed {
            customer_id,
            roles: roles_of(&roles),
            // Whole seconds, rounded down: the session ends no later than said.
            expires_in_seconds: seconds.floor() as i64,
        }))
    }

    /// Ends the session of a refresh token, if any.
    async fn end_session(&self, refresh_token: &SecretString) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash(refresh_token.expose_secret()))
            .execute(&self.pool)
            .await
            .context("ending a session")?;
        Ok(())
    }

    async fn ping(&self, timeout: Duration) -> bool {
        infra::db::ping(&self.pool, timeout).await
    }

    fn how_to_mark_bootstrap_admin(&self, customer_id: Uuid) -> String {
        format!(
            "UPDATE gateway.users SET bootstrap_admin = true WHERE customer_id = '{customer_id}'"
        )
    }
}

/// What is stored of a refresh token.
fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn user_of((customer_id, username, roles): UserRow) -> User {
    User {
        customer_id,
        username,
        roles: roles_of(&roles),
    }
}

/// A new refresh token: 256 random bits, hex.
fn new_refresh_token() -> String {
    let mut secret = [0_u8; REFRESH_TOKEN_BYTES];
    rand::rng().fill_bytes(&mut secret);
    hex::encode(secret)
}

fn roles_of(names: &[String]) -> Vec<Role> {
    names.iter().filter_map(|name| Role::parse(name)).collect()
}

pub fn role_name(role: Role) -> &'static str {
    role.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_follow_the_pattern() {
        for good in ["abc", "a.b-c_d", "user123", &"a".repeat(32)] {
            assert!(validate_username(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "Alice",
            "has space",
            "émile",
            "a@b",
            &"a".repeat(33),
            "",
        ] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_are_bounded_by_characters_not_bytes() {
        let ok = |text: &str| validate_password(&SecretString::from(text.to_owned())).is_ok();
        assert!(ok("twelve chars"));
        assert!(!ok("eleven char"));
        assert!(ok(&"é".repeat(128)), "128 characters, 256 bytes");
        assert!(!ok(&"a".repeat(129)));
    }

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(validate_name("Ada Lovelace").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("line\nbreak").is_err());
        assert!(validate_name(&"n".repeat(201)).is_err());
    }
}
