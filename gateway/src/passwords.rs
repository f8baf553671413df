//! Password hashing: argon2id with the crate's default parameters, stored as PHC strings. The
//! work is CPU- and memory-heavy (19 MiB per hash), so it runs on the blocking pool, at most
//! [`HASHES_CONCURRENT_MAX`] at a time.
//!
//! A login for an unknown username still verifies a password, against a hash made at start, so
//! the answer takes as long as for a known username with a wrong password.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// Hashes running at once. Each takes a core and 19 MiB; more than a few per core only queues
/// inside the kernel instead of here, and lets a burst of logins take gigabytes.
const HASHES_CONCURRENT_MAX: usize = 8;

/// Bytes of random salt per hash (the PHC recommendation).
const SALT_BYTES: usize = 16;

/// Hashes and verifies passwords off the async threads.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// The hash an unknown username's login is verified against.
    decoy: Arc<str>,
}

impl Passwords {
    /// Prepares the decoy hash (one hash's worth of work at start).
    pub async fn new() -> Result<Passwords> {
        let permits = Arc::new(Semaphore::new(HASHES_CONCURRENT_MAX));
        let decoy_password = SecretString::from(uuid::Uuid::new_v4().to_string());
        let decoy = hash_blocking(&permits, decoy_password).await?;
        Ok(Passwords {
            permits,
            decoy: decoy.into(),
        })
    }

    /// A PHC string for `password`.
    pub async fn hash(&self, password: SecretString) -> Result<String> {
        hash_blocking(&self.permits, password).await
    }

    /// Whether `password` matches `stored`; with no stored hash, does the same work and says no.
    pub async fn verify(&self, password: SecretString, stored: Option<String>) -> Result<bool> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.decoy.to_string());
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Hashing("the hashing semaphore is closed".to_owned()))?;
        let matches = tokio::task::spawn_blocking(move || -> Result<bool> {
            let parsed = PasswordHash::new(&phc)
                .map_err(|error| Error::Hashing(format!("a stored hash is unreadable: {error}")))?;
            Ok(Argon2::default()
                .verify_password(password.expose_secret().as_bytes(), &parsed)
                .is_ok())
        })
        .await
        .map_err(|error| Error::Hashing(format!("the verifying task failed: {error}")))??;
        Ok(known && matches)
    }
}

async fn hash_blocking(permits: &Semaphore, password: SecretString) -> Result<String> {
    let _permit = permits
        .acquire()
        .await
        .map_err(|_| Error::Hashing("the hashing semaphore is closed".to_owned()))?;
    tokio::task::spawn_blocking(move || {
        let mut salt = [0_u8; SALT_BYTES];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt)
            .map_err(|error| Error::Hashing(format!("cannot encode a salt: {error}")))?;
        Argon2::default()
            .hash_password(password.expose_secret().as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|error| Error::Hashing(format!("cannot hash: {error}")))
    })
    .await
    .map_err(|error| Error::Hashing(format!("the hashing task failed: {error}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let passwords = Passwords::new().await.expect("the decoy hashes");
        let hash = passwords
            .hash(SecretString::from("correct horse battery"))
            .await
            .expect("hashes");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let right = SecretString::from("correct horse battery");
        let wrong = SecretString::from("correct horse battery!");
        assert!(
            passwords
                .verify(right.clone(), Some(hash.clone()))
                .await
                .expect("verifies")
        );
        assert!(!passwords.verify(wrong, Some(hash)).await.expect("verifies"));
        assert!(!passwords.verify(right, None).await.expect("a decoy check"));
    }
}
