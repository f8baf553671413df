//! The velocity counters in SQLite (the embedded mode): one row per counted payment, in the
//! database file of `ledger serve`.
//!
//! One `BEGIN IMMEDIATE` transaction does what the Redis script does: drops the account's
//! entries that left the window, inserts this payment unless it is there (`ON CONFLICT DO
//! NOTHING`: idempotent per transaction), sums the window, and takes the payment out again if
//! the sum is over the limit. `IMMEDIATE` takes the write lock first, so two payments of one
//! account never both see the sum without the other. SQLite's `SUM` over integers fails on
//! overflow ("integer overflow") instead of wrapping, so the total is a checked i64.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::sqlite::SqlitePool;

use super::{Payment, VelocityCounters};
use crate::error::{Error, Result, within};

/// The counters' tables, versioned.
pub const MIGRATIONS: &[infra::sqlite::Migration] = &[infra::sqlite::Migration {
    version: 1,
    description: "velocity entries",
    sql: "CREATE TABLE velocity_entries (
              account_id     TEXT    NOT NULL,
              transaction_id TEXT    NOT NULL,
              amount_minor   INTEGER NOT NULL CHECK (amount_minor >= 0),
              created_ms     INTEGER NOT NULL,
              PRIMARY KEY (account_id, transaction_id)
          ) STRICT;
          CREATE INDEX velocity_entries_by_time ON velocity_entries (account_id, created_ms);",
}];

/// The component name of the counters' migrations.
const COMPONENT: &str = "fraud_velocity";

/// How long counting one payment may take (the write lock included) before the message is
/// retried later.
pub const SQLITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The per-account payment windows in SQLite.
#[derive(Clone)]
pub struct SqliteCounters {
    pool: SqlitePool,
}

impl SqliteCounters {
    /// The counters in the database of `pool`, migrating it.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        infra::sqlite::migrate(&pool, COMPONENT, MIGRATIONS).await?;
        Ok(SqliteCounters { pool })
    }

    async fn count(&self, payment: &Payment, window_ms: i64, limit_minor: i64) -> Result<i64> {
        let account = payment.account_id.to_string();
        let transaction_id = payment.transaction_id.to_string();
        let created_ms = payment.created_at.timestamp_millis();
        let cutoff_ms = created_ms.saturating_sub(window_ms);
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(database("acquiring a connection"))?;
        let mut transaction = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(database("starting to count a payment"))?;
        sqlx::query("DELETE FROM velocity_entries WHERE account_id = ? AND created_ms <= ?")
            .bind(&account)
            .bind(cutoff_ms)
            .execute(&mut *transaction)
            .await
            .map_err(database("expiring payments"))?;
        sqlx::query(
            "INSERT INTO velocity_entries (account_id, transaction_id, amount_minor, created_ms) \
             VALUES (?, ?, ?, ?) ON CONFLICT (account_id, transaction_id) DO NOTHING",
        )
        .bind(&account)
        .bind(&transaction_id)
        .bind(payment.amount_minor)
        .bind(created_ms)
        .execute(&mut *transaction)
        .await
        .map_err(database("counting a payment"))?;
        let total: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(amount_minor), 0) FROM velocity_entries WHERE account_id = ?",
        )
        .bind(&account)
        .fetch_one(&mut *transaction)
        .await
        .map_err(database("summing the window"))?;
        if total > limit_minor {
            sqlx::query("DELETE FROM velocity_entries WHERE account_id = ? AND transaction_id = ?")
                .bind(&account)
                .bind(&transaction_id)
                .execute(&mut *transaction)
                .await
                .map_err(database("taking a rejected payment out"))?;
        }
        transaction
            .commit()
            .await
            .map_err(database("committing a count"))?;
        Ok(total)
    }
}

#[async_trait]
impl VelocityCounters for SqliteCounters {
    #[tracing::instrument(skip_all, fields(account_id = %payment.account_id, transaction_id = %payment.transaction_id), err)]
    async fn record(&self, payment: &Payment, window_ms: i64, limit_minor: i64) -> Result<i64> {
        within(
            SQLITE_TIMEOUT,
            "counting a payment",
            self.count(payment, window_ms, limit_minor),
        )
        .await
    }

    async fn ping(&self) -> bool {
        infra::sqlite::ping(&self.pool, Duration::from_secs(2)).await
    }

    fn store(&self) -> &'static str {
        "sqlite"
    }
}

fn database(context: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |source| Error::Database { context, source }
}
