//! Failed-login limits (SPEC §5): per username and per client address, in fixed windows, in
//! memory of one instance (docs/decisions.md §12 says why that is enough for now).
//!
//! An attempt is counted when it starts and forgiven when it succeeds, so concurrent attempts
//! cannot slip past the limit while their password checks run. The check happens before any
//! password work: a refused attempt costs no argon2 time and says nothing about the account.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most keys (usernames, addresses) tracked per map. Beyond it, expired windows are dropped; if
/// the map is still full, new keys go untracked (and a warning is logged) rather than the
/// gateway's memory growing without bound under a spray of random usernames. The per-address
/// limit still applies to those attempts unless the address map is full too.
const TRACKED_KEYS_MAX: usize = 100_000;

/// Where the limiter reads the time: the system's monotonic clock, or one a test moves.
#[derive(Clone, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(Arc<ManualClock>),
}

impl Clock {
    pub fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(clock) => clock.now(),
        }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Clock::System => f.write_str("Clock::System"),
            Clock::Manual(_) => f.write_str("Clock::Manual"),
        }
    }
}

/// A clock that stands still until [`ManualClock::advance`] moves it.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            start: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
        })
    }

    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed.lock().unwrap_or_else(PoisonError::into_inner);
        *elapsed += by;
    }

    fn now(&self) -> Instant {
        self.start + *self.elapsed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The limits and their window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    pub per_username: u32,
    pub per_address: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    attempts: u32,
}

/// Counters for one kind of key.
#[derive(Debug)]
struct Counters<K> {
    name: &'static str,
    limit: u32,
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Eq + Hash + Clone> Counters<K> {
    fn new(name: &'static str, limit: u32) -> Self {
        Counters {
            name,
            limit,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// The wait before `key` may try again, if it is at its limit now.
    fn blocked(&self, key: &K, now: Instant, window: Duration) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let current = windows.get(key)?;
        let ends = current.started + window;
        (ends > now && current.attempts >= self.limit).then(|| ends - now)
    }

    fn count(&self, key: &K, now: Instant, window: Duration) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if !windows.contains_key(key) && windows.len() >= TRACKED_KEYS_MAX {
            windows.retain(|_, current| current.started + window > now);
            if windows.len() >= TRACKED_KEYS_MAX {
                tracing::warn!(
                    counter = self.name,
                    "login limiter is full; an attempt goes uncounted"
                );
                return;
            }
        }
        let current = windows.entry(key.clone()).or_insert(Window {
            started: now,
            attempts: 0,
        });
        if current.started + window <= now {
            *current = Window {
                started: now,
                attempts: 0,
            };
        }
        current.attempts = current.attempts.saturating_add(1);
    }

    fn forgive(&self, key: &K, reset: bool) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if reset {
            windows.remove(key);
        } else if let Some(current) = windows.get_mut(key) {
            current.attempts = current.attempts.saturating_sub(1);
        }
    }
}

/// The failed-login limiter of one gateway instance.
#[derive(Debug)]
pub struct LoginLimiter {
    limits: LoginLimits,
    clock: Clock,
    usernames: Counters<String>,
    addresses: Counters<IpAddr>,
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits, clock: Clock) -> Self {
        LoginLimiter {
            limits,
            clock,
            usernames: Counters::new("username", limits.per_username),
            addresses: Counters::new("address", limits.per_address),
        }
    }

    /// Counts an attempt for `username` from `address`, or says how long to wait (whole
    /// seconds, at least one) if either is at its limit.
    pub fn begin(&self, username: &str, address: Option<IpAddr>) -> Result<(), u64> {
        let now = self.clock.now();
        let window = self.limits.window;
        let username = username.to_owned();
        let wait = [
            self.usernames.blocked(&username, now, window),
            address.and_then(|address| self.addresses.blocked(&address, now, window)),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = wait {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(seconds.max(1));
        }
        self.usernames.count(&username, now, window);
        if let Some(address) = address {
            self.addresses.count(&address, now, window);
        }
        Ok(())
    }

    /// A successful login: the username's failures are forgotten, and this attempt no longer
    /// counts against the address.
    pub fn succeeded(&self, username: &str, address: Option<IpAddr>) {
        self.usernames.forgive(&username.to_owned(), true);
        if let Some(address) = address {
            self.addresses.forgive(&address, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_username: u32, per_address: u32) -> (LoginLimiter, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let limits = LoginLimits {
            per_username,
            per_address,
            window: Duration::from_secs(60),
        };
        (
            LoginLimiter::new(limits, Clock::Manual(clock.clone())),
            clock,
        )
    }

    #[test]
    fn a_username_is_blocked_after_its_limit_until_the_window_ends() {
        let (limiter, clock) = limiter(3, 100);
        let address = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            assert!(limiter.begin("alice", address).is_ok());
        }
        clock.advance(Duration::from_millis(20_500));
        assert_eq!(limiter.begin("alice", address), Err(40));
        assert!(
            limiter.begin("bob", address).is_ok(),
            "other users are not blocked"
        );
        clock.advance(Duration::from_secs(40));
        assert!(limiter.begin("alice", address).is_ok(), "a new window");
    }

    #[test]
    fn an_address_is_blocked_across_usernames_and_success_is_forgiven() {
        let (limiter, _clock) = limiter(10, 2);
        let address = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(limiter.begin("a1", address).is_ok());
        limiter.succeeded("a1", address);
        assert!(limiter.begin("a2", address).is_ok());
        assert!(limiter.begin("a3", address).is_ok());
        assert_eq!(limiter.begin("a4", address), Err(60));
        assert!(
            limiter
                .begin("a4", Some(IpAddr::from([10, 0, 0, 3])))
                .is_ok(),
            "other addresses are not blocked"
        );
    }
}
