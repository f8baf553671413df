//! The identities of `ledger serve` (SPEC §10): the users and sessions in the data directory's
//! SQLite file, beside the event log, under the component `gateway`'s own migrations. Every
//! write that reads first runs in a `BEGIN IMMEDIATE` transaction: it holds the file's write
//! lock from its first statement, so the read and the write cannot be split by another writer.

use std::time::Duration;

use async_trait::async_trait;
use infra::auth::Role;
use infra::sqlite::Migration;
use secrecy::{ExposeSecret, SecretString};
use sqlx::SqlitePool;
use sqlx::error::ErrorKind;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::{
    AdminEnsured, Credentials, EXPIRED_SESSIONS_SWEPT_PER_LOGIN, Identities, NewSession, Refreshed,
    SESSIONS_PER_USER_MAX, User, new_refresh_token, token_hash,
};
use crate::error::{DatabaseContext, Error, Result};

/// The component name under which the migrations are recorded (`infra::sqlite::migrate`).
pub const COMPONENT: &str = "gateway";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "users and sessions",
    sql: include_str!("../../migrations/sqlite/0001_identity.sql"),
}];

/// The identities in a SQLite file.
#[derive(Clone)]
pub struct SqliteIdentities {
    pool: SqlitePool,
}

type UserRow = (Hyphenated, String, String);

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Roles as stored: their names, space-separated.
fn stored_roles(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|role| role.name())
        .collect::<Vec<_>>()
        .join(" ")
}

fn roles_of(stored: &str) -> Vec<Role> {
    stored.split_whitespace().filter_map(Role::parse).collect()
}

fn user_of((customer_id, username, roles): UserRow) -> User {
    User {
        customer_id: customer_id.into_uuid(),
        username,
        roles: roles_of(&roles),
    }
}

impl SqliteIdentities {
    /// The identities in `pool`'s file (an `infra::sqlite` pool: WAL, `synchronous=FULL`),
    /// migrated.
    pub async fn open(pool: SqlitePool) -> Result<SqliteIdentities> {
        infra::sqlite::migrate(&pool, COMPONENT, MIGRATIONS).await?;
        Ok(SqliteIdentities { pool })
    }
}

#[async_trait]
impl Identities for SqliteIdentities {
    async fn register(
        &self,
        username: &str,
        password_hash: &str,
        name: Option<&str>,
    ) -> Result<User> {
        let now = now_millis();
        let inserted: std::result::Result<UserRow, sqlx::Error> = sqlx::query_as(
            "INSERT INTO users (customer_id, username, password_hash, name, roles, created_at, \
                                updated_at) \
             VALUES (?, ?, ?, ?, 'customer', ?, ?) \
             RETURNING customer_id, username, roles",
        )
        .bind(Uuid::new_v4().hyphenated())
        .bind(username)
        .bind(password_hash)
        .bind(name)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await;
        match inserted {
            Ok(row) => Ok(user_of(row)),
            // The customer id is a fresh v4: the username is the one unique value that can clash.
            Err(sqlx::Error::Database(error)) if error.kind() == ErrorKind::UniqueViolation => {
                Err(Error::UsernameTaken)
            }
            Err(error) => Err(error).context("registering a user"),
        }
    }

    async fn username_taken(&self, username: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE username = ?)")
            .bind(username)
            .fetch_one(&self.pool)
            .await
            .context("looking up a username")
    }

    async fn credentials(&self, username: &str) -> Result<Option<Credentials>> {
        let row: Option<(Hyphenated, String, String)> = sqlx::query_as(
            "SELECT customer_id, password_hash, roles FROM users WHERE username = ?",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await
        .context("reading a user's credentials")?;
        Ok(row.map(|(customer_id, password_hash, roles)| Credentials {
            customer_id: customer_id.into_uuid(),
            password_hash,
            roles: roles_of(&roles),
        }))
    }

    async fn set_roles(&self, customer_id: Uuid, roles: &[Role]) -> Result<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "UPDATE users SET roles = ?, updated_at = ? WHERE customer_id = ? \
             RETURNING customer_id, username, roles",
        )
        .bind(stored_roles(roles))
        .bind(now_millis())
        .bind(customer_id.hyphenated())
        .fetch_optional(&self.pool)
        .await
        .context("setting a user's roles")?;
        Ok(row.map(user_of))
    }

    async fn ensure_admin(&self, username: &str, password_hash: &str) -> Result<AdminEnsured> {
        let mut transaction = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("ensuring the admin user")?;
        let existing: Option<(Hyphenated, String, bool)> = sqlx::query_as(
            "SELECT customer_id, roles, bootstrap_admin FROM users WHERE username = ?",
        )
        .bind(username)
        .fetch_optional(&mut *transaction)
        .await
        .context("ensuring the admin user")?;
        let now = now_millis();
        let ensured = match existing {
            Some((customer_id, _, false)) => {
                return Ok(AdminEnsured::Conflict {
                    customer_id: customer_id.into_uuid(),
                });
            }
            Some((customer_id, roles, true)) => {
                let mut roles = roles_of(&roles);
                if !roles.contains(&Role::Admin) {
                    roles.push(Role::Admin);
                }
                sqlx::query(
                    "UPDATE users SET password_hash = ?, roles = ?, updated_at = ? \
                     WHERE customer_id = ?",
                )
                .bind(password_hash)
                .bind(stored_roles(&roles))
                .bind(now)
                .bind(customer_id)
                .execute(&mut *transaction)
                .await
                .context("updating the admin user")?;
                AdminEnsured::Ensured {
                    admin: User {
                        customer_id: customer_id.into_uuid(),
                        username: username.to_owned(),
                        roles,
                    },
                    created: false,
                }
            }
            None => {
                let customer_id = Uuid::new_v4();
                sqlx::query(
                    "INSERT INTO users (customer_id, username, password_hash, roles, \
                                        bootstrap_admin, created_at, updated_at) \
                     VALUES (?, ?, ?, 'admin', 1, ?, ?)",
                )
                .bind(customer_id.hyphenated())
                .bind(username)
                .bind(password_hash)
                .bind(now)
                .bind(now)
                .execute(&mut *transaction)
                .await
                .context("creating the admin user")?;
                AdminEnsured::Ensured {
                    admin: User {
                        customer_id,
                        username: username.to_owned(),
                        roles: vec![Role::Admin],
                    },
                    created: true,
                }
            }
        };
        transaction
            .commit()
            .await
            .context("ensuring the admin user")?;
        Ok(ensured)
    }

    async fn open_session(&self, customer_id: Uuid, lifetime: Duration) -> Result<NewSession> {
        let token = new_refresh_token();
        let now = now_millis();
        let lifetime_millis = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
        let expires_at = now.saturating_add(lifetime_millis);
        let mut transaction = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("opening a session")?;
        sqlx::query(
            "DELETE FROM sessions WHERE id IN ( \
               SELECT id FROM sessions WHERE customer_id = ? \
               ORDER BY created_at DESC, id DESC LIMIT -1 OFFSET ?)",
        )
        .bind(customer_id.hyphenated())
        .bind(SESSIONS_PER_USER_MAX - 1)
        .execute(&mut *transaction)
        .await
        .context("bounding a user's sessions")?;
        sqlx::query(
            "DELETE FROM sessions WHERE id IN ( \
               SELECT id FROM sessions WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(now)
        .bind(EXPIRED_SESSIONS_SWEPT_PER_LOGIN)
        .execute(&mut *transaction)
        .await
        .context("sweeping expired sessions")?;
        sqlx::query(
            "INSERT INTO sessions (id, customer_id, token_hash, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(Uuid::now_v7().hyphenated())
        .bind(customer_id.hyphenated())
        .bind(token_hash(&token))
        .bind(now)
        .bind(expires_at)
        .execute(&mut *transaction)
        .await
        .context("storing a session")?;
        transaction.commit().await.context("opening a session")?;
        Ok(NewSession {
            refresh_token: SecretString::from(token),
            expires_in: lifetime,
        })
    }

    async fn refresh(&self, refresh_token: &SecretString) -> Result<Option<Refreshed>> {
        let now = now_millis();
        let row: Option<(Hyphenated, String, i64)> = sqlx::query_as(
            "SELECT u.customer_id, u.roles, s.expires_at \
             FROM sessions s JOIN users u ON u.customer_id = s.customer_id \
             WHERE s.token_hash = ? AND s.expires_at > ?",
        )
        .bind(token_hash(refresh_token.expose_secret()))
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .context("reading a session")?;
        Ok(row.map(|(customer_id, roles, expires_at)| Refreshed {
            customer_id: customer_id.into_uuid(),
            roles: roles_of(&roles),
            // Whole seconds, rounded down: the session ends no later than said.
            expires_in_seconds: expires_at.saturating_sub(now).div_euclid(1_000),
        }))
    }

    async fn end_session(&self, refresh_token: &SecretString) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = ?")
            .bind(token_hash(refresh_token.expose_secret()))
            .execute(&self.pool)
            .await
            .context("ending a session")?;
        Ok(())
    }

    async fn ping(&self, timeout: Duration) -> bool {
        infra::sqlite::ping(&self.pool, timeout).await
    }

    fn how_to_mark_bootstrap_admin(&self, customer_id: Uuid) -> String {
        format!(
            "with `ledger serve` stopped, in the data directory's SQLite file: \
             UPDATE users SET bootstrap_admin = 1 WHERE customer_id = '{customer_id}'"
        )
    }
}
