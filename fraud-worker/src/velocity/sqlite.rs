//! The velocity counters in SQLite (the embedded mode): one row per counted payment, in the
//! database file of `ledger serve`.
//!
//! Counting one payment does what the Redis script does: drops the account's entries that left
//! the window and subtracts them from the account's running total (`velocity_totals`), inserts
//! this payment unless it is there (`ON CONFLICT DO NOTHING`: idempotent per transaction) and adds
//! it, and takes the payment out again if the total is over the limit. The total is checked i64
//! arithmetic: an overflow is an error, never a wrapped number. (Summing the window instead cost
//! a scan of every entry of the account per payment: 9,000 rows per count for the benchmark's
//! 64 accounts at 1,000 payments/s.)
//!
//! **Group commit.** Every count goes through one writer task, which takes whatever counts are
//! waiting (up to [`BATCH_MAX`]) and runs them one after the other in one `BEGIN IMMEDIATE`
//! transaction, each inside a savepoint of its own: a count that fails (an overflow) is rolled
//! back alone and answered with its error, the others commit. One fsync then carries a whole
//! batch of the fraud consumer's concurrent messages instead of one each (the embedded bench's
//! bottleneck, decision 44). The counts of a batch run in sequence in one write transaction, so
//! two payments of one account still never both see the sum without the other, and a count is
//! answered only after its batch committed.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::sqlite::SqlitePool;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::{Payment, VelocityCounters};
use crate::error::{Error, Result, within};

/// The counters' tables, versioned.
pub const MIGRATIONS: &[infra::sqlite::Migration] = &[
    infra::sqlite::Migration {
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
    },
    infra::sqlite::Migration {
        version: 2,
        description: "velocity totals",
        // The window's total per account, kept beside the entries (as the Redis twin keeps
        // one), filled from the entries already counted.
        sql: "CREATE TABLE velocity_totals (
                  account_id  TEXT    PRIMARY KEY,
                  total_minor INTEGER NOT NULL
              ) STRICT;
              INSERT INTO velocity_totals (account_id, total_minor)
                  SELECT account_id, SUM(amount_minor) FROM velocity_entries GROUP BY account_id;",
    },
];

/// The component name of the counters' migrations.
const COMPONENT: &str = "fraud_velocity";

/// How long counting one payment may take (the queue, the write lock and the commit included)
/// before the message is retried later.
pub const SQLITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts per transaction at most. A count is four small statements on an indexed table (tens
/// of microseconds), so 256 keep a batch's write lock to a few milliseconds; the fraud
/// consumer hands out far fewer at once.
pub const BATCH_MAX: usize = 256;

/// Counts waiting for the writer at most; a caller past it waits (within [`SQLITE_TIMEOUT`]).
const QUEUE_CAPACITY: usize = 1_024;

/// One count waiting for the writer.
struct Count {
    payment: Payment,
    window_ms: i64,
    limit_minor: i64,
    reply: oneshot::Sender<Result<i64>>,
}

/// The per-account payment windows in SQLite.
#[derive(Clone)]
pub struct SqliteCounters {
    pool: SqlitePool,
    writer: mpsc::Sender<Count>,
}

impl SqliteCounters {
    /// The counters in the database of `pool`, migrating it, with their writer task (which
    /// ends when the last clone is dropped).
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        infra::sqlite::migrate(&pool, COMPONENT, MIGRATIONS).await?;
        let (writer, queue) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_counts(pool.clone(), queue));
        Ok(SqliteCounters { pool, writer })
    }

    async fn count(&self, payment: &Payment, window_ms: i64, limit_minor: i64) -> Result<i64> {
        let (reply, answer) = oneshot::channel();
        let count = Count {
            payment: *payment,
            window_ms,
            limit_minor,
            reply,
        };
        self.writer.send(count).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
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

/// The writer task: one transaction per batch of waiting counts, until every handle is gone.
async fn write_counts(pool: SqlitePool, mut queue: mpsc::Receiver<Count>) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while queue.recv_many(&mut batch, BATCH_MAX).await > 0 {
        // A caller that gave up (its timeout) retries later; counting it now is harmless
        // (idempotent), but there is no one to answer, so leave it to the retry.
        batch.retain(|count: &Count| !count.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("fraud_velocity_batch_size").record(batch.len() as f64);
        match write_batch(&pool, &batch).await {
            Ok(totals) => {
                for (count, total) in batch.drain(..).zip(totals) {
                    let _ = count.reply.send(total);
                }
            }
            Err(error) => {
                tracing::warn!(error = %infra::problem::cause_chain(&error), counts = batch.len(), "a batch of velocity counts failed; its messages are retried");
                for count in batch.drain(..) {
                    let _ = count.reply.send(Err(Error::Batch {
                        message: infra::problem::cause_chain(&error),
                    }));
                }
            }
        }
    }
}

/// Runs `batch` in one transaction: each count's own result, or an error for the whole batch
/// (nothing of it committed).
///
/// Boxed with its lifetime spelled out: sqlx's executors on a borrowed connection otherwise
/// defeat the `Send` check of the spawned writer (rust-lang/rust#100013).
fn write_batch<'a>(
    pool: &'a SqlitePool,
    batch: &'a [Count],
) -> BoxFuture<'a, Result<Vec<Result<i64>>>> {
    Box::pin(async move {
        let mut connection = pool
            .acquire()
            .await
            .map_err(database("acquiring a connection"))?;
        let mut transaction = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(database("starting to count payments"))?;
        let mut totals = Vec::with_capacity(batch.len());
        for count in batch {
            sqlx::query("SAVEPOINT velocity_count")
                .execute(&mut *transaction)
                .await
                .map_err(database("opening a count's savepoint"))?;
            let total = count_one(&mut transaction, count).await;
            if total.is_err() {
                sqlx::query("ROLLBACK TO velocity_count")
                    .execute(&mut *transaction)
                    .await
                    .map_err(database("rolling a failed count back"))?;
            }
            sqlx::query("RELEASE velocity_count")
                .execute(&mut *transaction)
                .await
                .map_err(database("closing a count's savepoint"))?;
            totals.push(total);
        }
        transaction
            .commit()
            .await
            .map_err(database("committing counts"))?;
        Ok(totals)
    })
}

/// One payment's count, inside the batch's transaction: what the Redis script does, on the
/// account's entries and its running total. The total is kept, not summed, so a count costs the
/// same whether the account has three payments in its window or thirty thousand.
fn count_one<'a>(
    connection: &'a mut SqliteConnection,
    count: &'a Count,
) -> BoxFuture<'a, Result<i64>> {
    Box::pin(async move {
        let payment = &count.payment;
        let account = payment.account_id.to_string();
        let transaction_id = payment.transaction_id.to_string();
        let created_ms = payment.created_at.timestamp_millis();
        let cutoff_ms = created_ms.saturating_sub(count.window_ms);
        let expired: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM velocity_entries WHERE account_id = ? AND created_ms <= ? \
             RETURNING amount_minor",
        )
        .bind(&account)
        .bind(cutoff_ms)
        .fetch_all(&mut *connection)
        .await
        .map_err(database("expiring payments"))?;
        let inserted = sqlx::query(
            "INSERT INTO velocity_entries (account_id, transaction_id, amount_minor, created_ms) \
             VALUES (?, ?, ?, ?) ON CONFLICT (account_id, transaction_id) DO NOTHING",
        )
        .bind(&account)
        .bind(&transaction_id)
        .bind(payment.amount_minor)
        .bind(created_ms)
        .execute(&mut *connection)
        .await
        .map_err(database("counting a payment"))?
        .rows_affected()
            == 1;
        let kept: Option<i64> =
            sqlx::query_scalar("SELECT total_minor FROM velocity_totals WHERE account_id = ?")
                .bind(&account)
                .fetch_optional(&mut *connection)
                .await
                .map_err(database("reading the window's total"))?;
        let mut total = kept.unwrap_or(0);
        for amount in expired {
            total = total.checked_sub(amount).ok_or(Error::Overflow)?;
        }
        if inserted {
            total = total
                .checked_add(payment.amount_minor)
                .ok_or(Error::Overflow)?;
        }
        let mut stored = total;
        if total > count.limit_minor {
            // Over the limit: the payment leaves the window again (rejected money is not spent).
            let removed = sqlx::query(
                "DELETE FROM velocity_entries WHERE account_id = ? AND transaction_id = ?",
            )
            .bind(&account)
            .bind(&transaction_id)
            .execute(&mut *connection)
            .await
            .map_err(database("taking a rejected payment out"))?
            .rows_affected();
            if removed == 1 {
                stored = total
                    .checked_sub(payment.amount_minor)
                    .ok_or(Error::Overflow)?;
            }
        }
        sqlx::query(
            "INSERT INTO velocity_totals (account_id, total_minor) VALUES (?, ?) \
             ON CONFLICT (account_id) DO UPDATE SET total_minor = excluded.total_minor",
        )
        .bind(&account)
        .bind(stored)
        .execute(&mut *connection)
        .await
        .map_err(database("keeping the window's total"))?;
        Ok(total)
    })
}

fn stopped() -> Error {
    Error::Batch {
        message: "the velocity counters' writer has stopped".to_owned(),
    }
}

fn database(context: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |source| Error::Database { context, source }
}
