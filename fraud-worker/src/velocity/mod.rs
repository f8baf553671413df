//! The velocity rule's memory: per customer account, the payments of the last window.
//!
//! One seam, [`VelocityCounters`], with the same semantics in both modes:
//! - **idempotent per transaction**: recording a payment again (a redelivery, a re-evaluation)
//!   finds it already counted and does not count it twice;
//! - **a rejected payment is taken back out atomically**: when the total with this payment is
//!   over the limit, the payment is removed again in the same step, so refused money never uses
//!   up the allowance, not even for a moment in which a concurrent payment of the same account
//!   could see it;
//! - **window expiry**: payments at or before `created_at - window` (of the payment being
//!   recorded) leave the window;
//! - **integer sums**: totals are i64 minor units, and an overflow is an error, never a wrap or
//!   a float.
//!
//! Implementations: [`redis::RedisCounters`] (the distributed mode) and
//! [`sqlite::SqliteCounters`] (the embedded one). [`conformance`] is the suite both pass.

#[cfg(feature = "testing")]
pub mod conformance;
pub mod redis;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{AccountId, TransactionId};

use crate::error::Result;

pub use self::redis::RedisCounters;
pub use self::sqlite::SqliteCounters;

/// One payment as the counters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payment {
    pub account_id: AccountId,
    pub transaction_id: TransactionId,
    pub amount_minor: i64,
    pub created_at: DateTime<Utc>,
}

/// The per-account payment windows (module documentation).
#[async_trait]
pub trait VelocityCounters: Send + Sync + 'static {
    /// Counts `payment` in its account's window (once, however often it is recorded) and
    /// returns the window's total in minor units, this payment included. When that total is
    /// above `limit_minor` the payment is rejected, so it is not left in the window.
    async fn record(&self, payment: &Payment, window_ms: i64, limit_minor: i64) -> Result<i64>;

    /// Whether the store answers now (`/health`).
    async fn ping(&self) -> bool;

    /// What `/health` calls the store (`redis`, `sqlite`).
    fn store(&self) -> &'static str;
}
