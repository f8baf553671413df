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
//! transaction: the batch's running totals are read in one statement, kept in memory while its
//! counts run (two statements each), and written back in one. A count that fails on its own (an
//! overflow) is answered with its error and the batch runs again without it, so the others
//! commit. One fsync then carries a whole batch of the fraud consumer's concurrent messages
//! instead of one each (the embedded bench's bottleneck, decision 44), and the batch holds the
//! file's one write connection for few round trips. The counts of a batch run in sequence in
//! one write transaction, so two payments of one account still never both see the sum without
//! the other, and a count is answered only after its batch committed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::sqlite::{Sqlite, SqlitePool};
use sqlx::{Connection, QueryBuilder, SqliteConnection};
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

/// Counts per transaction at most. A count is two small statements on an indexed table (tens
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
        // On a thread of its own, like the event log's committer: its statements are round
        // trips to the connection's thread, made while it holds the file's write lock.
        infra::tasks::spawn_on_own_thread("velocity-counter", write_counts(pool.clone(), queue))?;
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
/// (nothing of it committed). A count that fails on its own (its total would overflow) is
/// answered with its error and the batch runs again without it, so nothing of it is kept and
/// the others commit; that is rare enough that a savepoint per count (two more round trips to
/// the connection's thread each) would cost more than the rerun.
async fn write_batch(pool: &SqlitePool, batch: &[Count]) -> Result<Vec<Result<i64>>> {
    let mut failed: Vec<Option<Error>> = batch.iter().map(|_| None).collect();
    loop {
        let counting: Vec<&Count> = batch
            .iter()
            .zip(&failed)
            .filter(|(_, failure)| failure.is_none())
            .map(|(count, _)| count)
            .collect();
        let outcomes = if counting.is_empty() {
            // Every count failed on its own: no transaction to open.
            Vec::new()
        } else {
            write_counts_once(pool, &counting).await?
        };
        if outcomes.iter().all(Result::is_ok) {
            // Committed: the counted ones' totals, in order, among the failed ones' errors.
            let mut totals = outcomes.into_iter();
            return Ok(failed
                .into_iter()
                .map(|failure| match failure {
                    Some(error) => Err(error),
                    None => totals.next().unwrap_or_else(|| {
                        Err(Error::Batch {
                            message: "a batch of counts returned too few answers".to_owned(),
                        })
                    }),
                })
                .collect());
        }
        // Rolled back: set the failed ones aside (at least one, so this ends) and run again.
        let mut outcomes = outcomes.into_iter();
        for failure in failed.iter_mut().filter(|failure| failure.is_none()) {
            if let Some(Err(error)) = outcomes.next() {
                *failure = Some(error);
            }
        }
    }
}

/// One attempt at `batch`: committed when every count succeeded, rolled back when one failed on
/// its own (its error in its place). A database error fails the whole batch.
///
/// Boxed with its lifetime spelled out: sqlx's executors on a borrowed connection otherwise
/// defeat the `Send` check of the spawned writer (rust-lang/rust#100013).
fn write_counts_once<'a>(
    pool: &'a SqlitePool,
    batch: &'a [&'a Count],
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
        let mut kept = read_totals(&mut transaction, batch).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for count in batch {
            let account = count.payment.account_id.to_string();
            let total = kept.get(&account).copied().unwrap_or(0);
            let outcome = count_one(&mut transaction, count, &account, total).await?;
            if let Ok((_, stored)) = &outcome {
                kept.insert(account, *stored);
            }
            outcomes.push(outcome.map(|(total, _)| total));
        }
        if outcomes.iter().any(Result::is_err) {
            transaction
                .rollback()
                .await
                .map_err(database("rolling a batch with a failed count back"))?;
            return Ok(outcomes);
        }
        write_totals(&mut transaction, &kept).await?;
        transaction
            .commit()
            .await
            .map_err(database("committing counts"))?;
        Ok(outcomes)
    })
}

/// The running totals of the batch's accounts, in one statement.
fn read_totals<'a>(
    connection: &'a mut SqliteConnection,
    batch: &'a [&'a Count],
) -> BoxFuture<'a, Result<HashMap<String, i64>>> {
    Box::pin(async move {
        let accounts: HashSet<String> = batch
            .iter()
            .map(|count| count.payment.account_id.to_string())
            .collect();
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT account_id, total_minor FROM velocity_totals WHERE account_id IN ",
        );
        query.push_tuples(&accounts, |mut tuple, account| {
            tuple.push_bind(account);
        });
        let rows: Vec<(String, i64)> = query
            .build_query_as()
            .fetch_all(&mut *connection)
            .await
            .map_err(database("reading the windows' totals"))?;
        Ok(rows.into_iter().collect())
    })
}

/// Keeps the batch's totals, in one statement.
fn write_totals<'a>(
    connection: &'a mut SqliteConnection,
    totals: &'a HashMap<String, i64>,
) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        if totals.is_empty() {
            return Ok(());
        }
        let mut query =
            QueryBuilder::<Sqlite>::new("INSERT INTO velocity_totals (account_id, total_minor) ");
        query.push_values(totals, |mut values, (account, total)| {
            values.push_bind(account).push_bind(*total);
        });
        query.push(" ON CONFLICT (account_id) DO UPDATE SET total_minor = excluded.total_minor");
        query
            .build()
            .execute(&mut *connection)
            .await
            .map_err(database("keeping the windows' totals"))?;
        Ok(())
    })
}

/// One payment's count, inside the batch's transaction, on the account's running `total`: what
/// the Redis script does. The total is kept, not summed, so a count costs the same whether the
/// account has three payments in its window or thirty thousand. `Ok(Ok((total, stored)))`: the
/// window's total with this payment and the total kept (without it when it is over the limit);
/// `Ok(Err(_))`: this count failed on its own (the caller rolls back); `Err`: the database did.
fn count_one<'a>(
    connection: &'a mut SqliteConnection,
    count: &'a Count,
    account: &'a str,
    total: i64,
) -> BoxFuture<'a, Result<Result<(i64, i64)>>> {
    Box::pin(async move {
        let payment = &count.payment;
        let transaction_id = payment.transaction_id.to_string();
        let created_ms = payment.created_at.timestamp_millis();
        let cutoff_ms = created_ms.saturating_sub(count.window_ms);
        let expired: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM velocity_entries WHERE account_id = ? AND created_ms <= ? \
             RETURNING amount_minor",
        )
        .bind(account)
        .bind(cutoff_ms)
        .fetch_all(&mut *connection)
        .await
        .map_err(database("expiring payments"))?;
        let inserted = sqlx::query(
            "INSERT INTO velocity_entries (account_id, transaction_id, amount_minor, created_ms) \
             VALUES (?, ?, ?, ?) ON CONFLICT (account_id, transaction_id) DO NOTHING",
        )
        .bind(account)
        .bind(&transaction_id)
        .bind(payment.amount_minor)
        .bind(created_ms)
        .execute(&mut *connection)
        .await
        .map_err(database("counting a payment"))?
        .rows_affected()
            == 1;
        let mut total = total;
        for amount in expired {
            let Some(less) = total.checked_sub(amount) else {
                return Ok(Err(Error::Overflow));
            };
            total = less;
        }
        if inserted {
            let Some(more) = total.checked_add(payment.amount_minor) else {
                return Ok(Err(Error::Overflow));
            };
            total = more;
        }
        let mut stored = total;
        if total > count.limit_minor {
            // Over the limit: the payment leaves the window again (rejected money is not spent).
            let removed = sqlx::query(
                "DELETE FROM velocity_entries WHERE account_id = ? AND transaction_id = ?",
            )
            .bind(account)
            .bind(&transaction_id)
            .execute(&mut *connection)
            .await
            .map_err(database("taking a rejected payment out"))?
            .rows_affected();
            if removed == 1 {
                let Some(less) = total.checked_sub(payment.amount_minor) else {
                    return Ok(Err(Error::Overflow));
                };
                stored = less;
            }
        }
        Ok(Ok((total, stored)))
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
