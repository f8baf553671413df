//! Identities (SPEC §5 "Identity"): the rules for usernames, passwords and names, and the
//! `users` table of the schema `gateway`. Passwords never reach this module unhashed except to
//! be validated; names and passwords are never logged.

use infra::auth::Role;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{DatabaseContext, Error, Result};

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

/// The `users` table.
#[derive(Clone)]
pub struct Users {
    pool: PgPool,
}

type UserRow = (Uuid, String, Vec<String>);

impl Users {
    pub fn new(pool: PgPool) -> Self {
        Users { pool }
    }

    /// Inserts a customer; [`Error::UsernameTaken`] if the username exists.
    pub async fn register(
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

    pub async fn credentials(&self, username: &str) -> Result<Option<Credentials>> {
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
    pub async fn set_roles(&self, customer_id: Uuid, roles: &[Role]) -> Result<Option<User>> {
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

    /// Makes sure `username` exists with `password_hash` and the admin role (keeping any other
    /// roles it has). Returns the user and whether it was created. One statement, so several
    /// instances starting together agree.
    pub async fn ensure_admin(&self, username: &str, password_hash: &str) -> Result<(User, bool)> {
        let (customer_id, username, roles, created): (Uuid, String, Vec<String>, bool) =
            sqlx::query_as(
                "INSERT INTO users (customer_id, username, password_hash, roles) \
                 VALUES ($1, $2, $3, ARRAY['admin']) \
                 ON CONFLICT (username) DO UPDATE SET \
                   password_hash = EXCLUDED.password_hash, \
                   roles = CASE WHEN 'admin' = ANY(users.roles) THEN users.roles \
                                ELSE array_append(users.roles, 'admin') END, \
                   updated_at = now() \
                 RETURNING customer_id, username, roles, (xmax = 0) AS created",
            )
            .bind(Uuid::new_v4())
            .bind(username)
            .bind(password_hash)
            .fetch_one(&self.pool)
            .await
            .context("ensuring the admin user")?;
        Ok((user_of((customer_id, username, roles)), created))
    }
}

fn user_of((customer_id, username, roles): UserRow) -> User {
    User {
        customer_id,
        username,
        roles: roles_of(&roles),
    }
}

fn roles_of(names: &[String]) -> Vec<Role> {
    names.iter().filter_map(|name| Role::parse(name)).collect()
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Customer => "customer",
        Role::Admin => "admin",
        Role::Auditor => "auditor",
    }
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
