//! Login and registration limits (SPEC §5), in fixed windows, in memory of one instance
//! (docs/decisions.md §12 says why that is enough for now): failed logins per username from one
//! client address and per address, all logins per address, registrations per address.
//!
//! An attempt is counted when it starts and (as a failure) forgiven when it succeeds, so
//! concurrent attempts cannot slip past the limit while their password checks run. The check
//! happens before any password work: a refused attempt costs no argon2 time and says nothing
//! about the account. Only validated usernames (at most 32 bytes) are ever stored.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most keys tracked per map: 100,000, about 10 MB for the four maps (a key is at most a
/// 32-byte username and an address). Beyond it, expired windows are dropped; if the map is
/// still full, new keys go untracked (and a warning is logged) rather than the gateway's memory
/// growing without bound. New (username, address) keys come only from addresses within their
/// own limits, so filling the map takes thousands of addresses, and the hashing queue still
/// bounds the guesses they make.
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

/// The limits and their windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Failed logins per username from one address (`LOGIN_FAILURES_PER_USERNAME`).
    pub failures_per_username: u32,
    /// Failed logins per address, whatever the username (`LOGIN_FAILURES_PER_ADDRESS`).
    pub failures_per_address: u32,
    /// Logins per address, successful or not (`LOGIN_ATTEMPTS_PER_ADDRESS`).
    pub attempts_per_address: u32,
    /// The window of the three login counts.
    pub window: Duration,
    /// Registrations per address (`REGISTRATIONS_PER_ADDRESS`).
    pub registrations_per_address: u32,
    pub registration_window: Duration,
}

/// Why an attempt is refused, and for how long (whole seconds, at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failed logins, for this username from this address or from this address.
    LoginFailures { retry_after_seconds: u64 },
    /// Too many logins from this address, successful ones included.
    LoginAttempts { retry_after_seconds: u64 },
    /// Too many registrations from this address.
    Registrations { retry_after_seconds: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    attempts: u32,
}

/// Counters for one kind of key, in fixed windows.
#[derive(Debug)]
struct Counters<K> {
    name: &'static str,
    limit: u32,
    window: Duration,
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Eq + Hash + Clone> Counters<K> {
    fn new(name: &'static str, limit: u32, window: Duration) -> Self {
        Counters {
            name,
            limit,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// The wait before `key` may try again, if it is at its limit now.
    fn blocked(&self, key: &K, now: Instant) -> Option<Duration> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let current = windows.get(key)?;
        let ends = current.started + self.window;
        (ends > now && current.attempts >= self.limit).then(|| ends - now)
    }

    fn count(&self, key: &K, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if !windows.contains_key(key) && windows.len() >= TRACKED_KEYS_MAX {
            let window = self.window;
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
        if current.started + self.window <= now {
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

    fn len(&self) -> usize {
        self.windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The login and registration limiter of one gateway instance.
///
/// A username's failures are counted per client address: ten wrong passwords from one address
/// lock that address (only) out of that username, so a stranger cannot lock the owner out of
/// their account, the admin's included. What bounds a distributed guesser instead is the
/// per-address limits and the bounded hashing queue (`crate::passwords`): at most a few dozen
/// guesses a second in all, against argon2id hashes of passwords of 12 characters or more.
#[derive(Debug)]
pub struct LoginLimiter {
    clock: Clock,
    /// Keyed by a validated username (at most 32 bytes) and the address.
    username_failures: Counters<(String, IpAddr)>,
    address_failures: Counters<IpAddr>,
    address_attempts: Counters<IpAddr>,
    registrations: Counters<IpAddr>,
}

impl LoginLimiter {
    pub fn new(limits: LoginLimits, clock: Clock) -> Self {
        LoginLimiter {
            clock,
            username_failures: Counters::new(
                "username",
                limits.failures_per_username,
                limits.window,
            ),
            address_failures: Counters::new(
                "address failures",
                limits.failures_per_address,
                limits.window,
            ),
            address_attempts: Counters::new(
                "address attempts",
                limits.attempts_per_address,
                limits.window,
            ),
            registrations: Counters::new(
                "registrations",
                limits.registrations_per_address,
                limits.registration_window,
            ),
        }
    }

    /// Counts a login from `address` for `username` (`None` when it is not a valid username,
    /// which is never stored), or refuses it if a limit is reached. Checked before any password
    /// work, so a refusal costs no hashing.
    pub fn begin_login(&self, username: Option<&str>, address: IpAddr) -> Result<(), Refusal> {
        let now = self.clock.now();
        let key = username.map(|username| (username.to_owned(), address));
        let failures = [
            key.as_ref()
                .and_then(|key| self.username_failures.blocked(key, now)),
            self.address_failures.blocked(&address, now),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(wait) = failures {
            return Err(Refusal::LoginFailures {
                retry_after_seconds: whole_seconds(wait),
            });
        }
        if let Some(wait) = self.address_attempts.blocked(&address, now) {
            return Err(Refusal::LoginAttempts {
                retry_after_seconds: whole_seconds(wait),
            });
        }
        if let Some(key) = &key {
            self.username_failures.count(key, now);
        }
        self.address_failures.count(&address, now);
        self.address_attempts.count(&address, now);
        Ok(())
    }

    /// A successful login: the username's failures from this address are forgotten, and this
    /// attempt no longer counts as a failure of the address. It still counts as an attempt.
    pub fn login_succeeded(&self, username: &str, address: IpAddr) {
        self.username_failures
            .forgive(&(username.to_owned(), address), true);
        self.address_failures.forgive(&address, false);
    }

    /// A login that checked nothing (the hashing queue was full): it is no failure.
    pub fn login_abandoned(&self, username: &str, address: IpAddr) {
        self.username_failures
            .forgive(&(username.to_owned(), address), false);
        self.address_failures.forgive(&address, false);
    }

    /// Counts a registration from `address`, or refuses it past the limit.
    pub fn begin_registration(&self, address: IpAddr) -> Result<(), Refusal> {
        let now = self.clock.now();
        if let Some(wait) = self.registrations.blocked(&address, now) {
            return Err(Refusal::Registrations {
                retry_after_seconds: whole_seconds(wait),
            });
        }
        self.registrations.count(&address, now);
        Ok(())
    }

    /// Keys held, for tests: what an attacker can make the limiter store.
    pub fn tracked_keys(&self) -> usize {
        self.username_failures.len()
            + self.address_failures.len()
            + self.address_attempts.len()
            + self.registrations.len()
    }
}

fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_username: u32, per_address: u32) -> (LoginLimiter, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let limits = LoginLimits {
            failures_per_username: per_username,
            failures_per_address: per_address,
            attempts_per_address: 1_000,
            window: Duration::from_secs(60),
            registrations_per_address: 2,
            registration_window: Duration::from_secs(3_600),
        };
        (
            LoginLimiter::new(limits, Clock::Manual(clock.clone())),
            clock,
        )
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const STRANGER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    #[test]
    fn a_username_is_locked_for_the_offending_address_only() {
        // Proves finding 8: a stranger's failures lock the stranger out, not the owner.
        let (limiter, clock) = limiter(3, 100);
        for _ in 0..3 {
            assert!(limiter.begin_login(Some("alice"), STRANGER).is_ok());
        }
        clock.advance(Duration::from_millis(20_500));
        assert_eq!(
            limiter.begin_login(Some("alice"), STRANGER),
            Err(Refusal::LoginFailures {
                retry_after_seconds: 40
            })
        );
        assert!(
            limiter.begin_login(Some("alice"), HOME).is_ok(),
            "the owner's address is not locked out"
        );
        clock.advance(Duration::from_secs(40));
        assert!(
            limiter.begin_login(Some("alice"), STRANGER).is_ok(),
            "a new window"
        );
    }

    #[test]
    fn an_address_is_limited_across_usernames_and_success_does_not_reset_attempts() {
        let (limiter, _clock) = limiter(10, 2);
        assert!(limiter.begin_login(Some("a1"), HOME).is_ok());
        limiter.login_succeeded("a1", HOME);
        assert!(limiter.begin_login(Some("a2"), HOME).is_ok());
        assert!(
            limiter.begin_login(None, HOME).is_ok(),
            "a malformed name counts too"
        );
        assert!(matches!(
            limiter.begin_login(Some("a4"), HOME),
            Err(Refusal::LoginFailures { .. })
        ));
        assert!(limiter.begin_login(Some("a4"), STRANGER).is_ok());
    }

    #[test]
    fn successful_logins_count_as_attempts() {
        // Proves finding 2: a client that knows its password cannot loop logins for ever.
        let clock = ManualClock::new();
        let limits = LoginLimits {
            failures_per_username: 10,
            failures_per_address: 100,
            attempts_per_address: 3,
            window: Duration::from_secs(60),
            registrations_per_address: 2,
            registration_window: Duration::from_secs(3_600),
        };
        let limiter = LoginLimiter::new(limits, Clock::Manual(clock));
        for _ in 0..3 {
            assert!(limiter.begin_login(Some("bob"), HOME).is_ok());
            limiter.login_succeeded("bob", HOME);
        }
        assert!(matches!(
            limiter.begin_login(Some("bob"), HOME),
            Err(Refusal::LoginAttempts { .. })
        ));
    }

    #[test]
    fn registrations_are_limited_per_address_over_their_own_window() {
        let (limiter, clock) = limiter(10, 100);
        assert!(limiter.begin_registration(HOME).is_ok());
        assert!(limiter.begin_registration(HOME).is_ok());
        assert_eq!(
            limiter.begin_registration(HOME),
            Err(Refusal::Registrations {
                retry_after_seconds: 3_600
            })
        );
        assert!(limiter.begin_registration(STRANGER).is_ok());
        clock.advance(Duration::from_secs(3_600));
        assert!(limiter.begin_registration(HOME).is_ok());
    }

    #[test]
    fn malformed_usernames_are_never_stored() {
        // Proves finding 8's memory half: only validated usernames become keys.
        let (limiter, _clock) = limiter(10, 1_000);
        for _ in 0..50 {
            assert!(limiter.begin_login(None, HOME).is_ok());
        }
        assert_eq!(
            limiter.tracked_keys(),
            2,
            "the address's two counters, no username"
        );
    }
}
