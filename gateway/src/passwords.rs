//! Password hashing: argon2id with the crate's default parameters, stored as PHC strings. The
//! work is CPU- and memory-heavy (19 MiB and tens of milliseconds of a core per hash), so it is
//! bounded work (SPEC §5): it runs on the blocking pool, one hash per core at a time, behind a
//! queue of at most [`QUEUE_MAX`] waiting hashes, each waiting at most [`QUEUE_WAIT`]. A hash
//! that cannot start in time (or find a place in the queue) is refused with
//! [`Error::HashingBusy`], which answers 503 with `Retry-After`: a flood of logins or
//! registrations gets fast refusals instead of piling up and starving everyone.
//!
//! A login for an unknown username still verifies a password, against a hash made at start, so
//! the answer takes as long as for a known username with a wrong password.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Hashes running at once, at most: one per core (more only time-slices the same cores and
/// multiplies the memory), and never more than 8, whatever the machine.
const HASHES_CONCURRENT_MAX: usize = 8;

/// Hashes waiting for a core, at most: 32, under a second of work on two cores. Past it a
/// request is refused at once rather than queued.
pub const QUEUE_MAX: usize = 32;

/// How long a hash may wait for a core: past 1 s the client is better served by a 503 and a
/// retry than by a login that takes seconds.
pub const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Bytes of random salt per hash (the PHC recommendation).
const SALT_BYTES: usize = 16;

/// Hashes and verifies passwords off the async threads, within the bounds above.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// Hashes waiting for a permit now.
    waiting: Arc<AtomicUsize>,
    queue_max: usize,
    /// Hashes and verifications started, the decoy's included (what a refusal saved shows here).
    started: Arc<AtomicU64>,
    /// The hash an unknown username's login is verified against.
    decoy: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("available", &self.permits.available_permits())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("queue_max", &self.queue_max)
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// Prepares the decoy hash (one hash's worth of work at start), with the default bounds.
    pub async fn new() -> Result<Passwords> {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Passwords::with_bounds(cores.min(HASHES_CONCURRENT_MAX), QUEUE_MAX).await
    }

    /// [`Passwords::new`] with other bounds (tests fill a small queue).
    pub async fn with_bounds(concurrent: usize, queue_max: usize) -> Result<Passwords> {
        let mut passwords = Passwords {
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            queue_max,
            started: Arc::new(AtomicU64::new(0)),
            decoy: Arc::from(""),
        };
        let decoy_password = SecretString::from(uuid::Uuid::new_v4().to_string());
        passwords.decoy = passwords.hash(decoy_password).await?.into();
        Ok(passwords)
    }

    /// Hashes and verifications started so far by this instance.
    pub fn hashes_started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Takes a core as a hash would, and holds it until the permit is dropped: what tests and
    /// benchmarks use to fill the hashing capacity on purpose.
    pub async fn reserve(&self) -> Result<OwnedSemaphorePermit> {
        self.permit().await
    }

    /// A place to hash now: a free core, or a place in the queue and a core within
    /// [`QUEUE_WAIT`]; [`Error::HashingBusy`] otherwise.
    async fn permit(&self) -> Result<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let place = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = LeaveQueue(&self.waiting);
        if place >= self.queue_max {
            metrics::counter!("gateway_password_hashing_refused_total", "why" => "queue_full")
                .increment(1);
            return Err(Error::HashingBusy);
        }
        match tokio::time::timeout(QUEUE_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Error::Hashing("the hashing semaphore is closed".to_owned())),
            Err(_waited_too_long) => {
                metrics::counter!("gateway_password_hashing_refused_total", "why" => "deadline")
                    .increment(1);
                Err(Error::HashingBusy)
            }
        }
    }

    /// A PHC string for `password`.
    pub async fn hash(&self, password: SecretString) -> Result<String> {
        let permit = self.permit().await?;
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
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

    /// Whether `password` matches `stored`; with no stored hash, does the same work and says no.
    pub async fn verify(&self, password: SecretString, stored: Option<String>) -> Result<bool> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.decoy.to_string());
        let permit = self.permit().await?;
        self.started.fetch_add(1, Ordering::SeqCst);
        let matches = tokio::task::spawn_blocking(move || -> Result<bool> {
            // Held by the blocking task itself, so an abandoned request still counts until its
            // hash is done: the bound is on work, not on requests.
            let _permit = permit;
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

/// Leaves the queue however the wait ends.
struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_instead_of_piling_up() {
        // Proves finding 2's bound: with one core busy and no room to queue, the next hash is
        // refused with HashingBusy (503) rather than waiting.
        let passwords = Passwords::with_bounds(1, 0)
            .await
            .expect("the decoy hashes");
        let busy = passwords
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the core");
        let refused = passwords
            .hash(SecretString::from("correct horse battery"))
            .await;
        assert!(matches!(refused, Err(Error::HashingBusy)), "{refused:?}");
        drop(busy);
        assert!(
            passwords
                .hash(SecretString::from("correct horse battery"))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_hash_gives_up_at_its_deadline() {
        // Proves the queue's deadline: a hash that cannot start within QUEUE_WAIT is refused.
        let passwords = Passwords::with_bounds(1, 4)
            .await
            .expect("the decoy hashes");
        let _busy = passwords
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the core");
        let refused = passwords
            .verify(SecretString::from("correct horse battery"), None)
            .await;
        assert!(matches!(refused, Err(Error::HashingBusy)), "{refused:?}");
        assert_eq!(
            passwords.waiting.load(Ordering::SeqCst),
            0,
            "it left the queue"
        );
    }
}
