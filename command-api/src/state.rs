//! The follower-state seam: where the write side's followers stand (their checkpoints) and which
//! transactions the saga still has to finish (its in-flight table, with when to look at each
//! again). Kept apart from the event log: with EventStoreDB the log moves, this stays in the
//! database, and nothing ever needs an append and a checkpoint to commit together.
//!
//! [`PgFollowerState`] keeps it in command-api's schema; [`SqliteFollowerState`] in the embedded
//! mode's SQLite file. Both pass [`conformance`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use infra::log::LogPosition;
use infra::sqlite::{Migration, ROWS_PER_STATEMENT};
use sqlx::sqlite::Sqlite;
use sqlx::{PgPool, QueryBuilder, SqlitePool};
use uuid::Uuid;

use crate::error::{DatabaseContext, Result};

/// How long a failed step waits before its first retry; doubled per attempt up to
/// [`RETRY_MAX_MS`].
const RETRY_FIRST_MS: i64 = 1_000;
/// The longest wait between retries of a failing step.
const RETRY_MAX_MS: i64 = 60_000;

/// Where a transaction stands after a saga batch.
#[derive(Debug, Clone, PartialEq)]
pub enum InFlight {
    /// Final and fully applied: forget it.
    Done,
    /// Waiting for its fraud decision until `until` (then the saga looks again).
    Waiting { until: DateTime<Utc> },
    /// A step failed: retry with back-off.
    Failed { error: String },
}

/// One transaction's progress in a saga batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaProgress {
    pub transaction_id: Uuid,
    pub correlation_id: String,
    pub state: InFlight,
}

#[async_trait]
pub trait FollowerState: Send + Sync + 'static {
    /// The follower's checkpoint, `START` before its first batch.
    async fn checkpoint(&self, follower: &str) -> Result<LogPosition>;

    /// Moves a follower's checkpoint forward; never backwards, so a deposed leader finishing a
    /// late batch cannot undo its successor's progress.
    async fn store_checkpoint(&self, follower: &str, position: LogPosition) -> Result<()>;

    /// Records a saga batch at once: which transactions are finished, which wait and until
    /// when, which failed (retried with back-off), and the saga's new checkpoint if the batch
    /// came from the log.
    async fn record_saga_batch(
        &self,
        checkpoint: Option<LogPosition>,
        progress: &[SagaProgress],
    ) -> Result<()>;

    /// Up to `max` in-flight transactions whose time has come, with their correlation ids.
    async fn due(&self, max: usize) -> Result<Vec<(Uuid, Option<String>)>>;

    /// Makes every in-flight transaction due now (a new saga leader resumes them all).
    async fn mark_all_due(&self) -> Result<()>;

    /// How many transactions are in flight.
    async fn in_flight(&self) -> Result<i64>;
}

/// The follower state in PostgreSQL: `follower_checkpoints` and `saga_inflight`.
#[derive(Clone)]
pub struct PgFollowerState {
    pool: PgPool,
}

impl PgFollowerState {
    pub fn new(pool: PgPool) -> Self {
        PgFollowerState { pool }
    }
}

#[async_trait]
impl FollowerState for PgFollowerState {
    async fn checkpoint(&self, follower: &str) -> Result<LogPosition> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT tx_id, position FROM follower_checkpoints WHERE name = $1")
                .bind(follower)
                .fetch_optional(&self.pool)
                .await
                .context("reading a follower checkpoint")?;
        Ok(
            row.map_or(LogPosition::START, |(commit, index)| LogPosition {
                commit,
                index,
            }),
        )
    }

    async fn store_checkpoint(&self, follower: &str, position: LogPosition) -> Result<()> {
        store_checkpoint(&self.pool, follower, position).await
    }

    async fn record_saga_batch(
        &self,
        checkpoint: Option<LogPosition>,
        progress: &[SagaProgress],
    ) -> Result<()> {
        let mut done = Vec::new();
        let (mut waiting_ids, mut waiting_correlations, mut waiting_until) =
            (Vec::new(), Vec::new(), Vec::new());
        let (mut failed_ids, mut failed_correlations, mut failed_errors) =
            (Vec::new(), Vec::new(), Vec::new());
        for item in progress {
            match &item.state {
                InFlight::Done => done.push(item.transaction_id),
                InFlight::Waiting { until } => {
                    waiting_ids.push(item.transaction_id);
                    waiting_correlations.push(item.correlation_id.clone());
                    waiting_until.push(*until);
                }
                InFlight::Failed { error } => {
                    failed_ids.push(item.transaction_id);
                    failed_correlations.push(item.correlation_id.clone());
                    failed_errors.push(error.clone());
                }
            }
        }
        let mut transaction = self.pool.begin().await.context("starting a saga batch")?;
        if !done.is_empty() {
            sqlx::query("DELETE FROM saga_inflight WHERE transaction_id = ANY($1)")
                .bind(&done)
                .execute(&mut *transaction)
                .await
                .context("removing finished transactions")?;
        }
        if !waiting_ids.is_empty() {
            sqlx::query(
                "INSERT INTO saga_inflight (transaction_id, correlation_id, due_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) \
                 ON CONFLICT (transaction_id) DO UPDATE \
                 SET due_at = EXCLUDED.due_at, attempts = 0, last_error = NULL",
            )
            .bind(&waiting_ids)
            .bind(&waiting_correlations)
            .bind(&waiting_until)
            .execute(&mut *transaction)
            .await
            .context("recording waiting transactions")?;
        }
        if !failed_ids.is_empty() {
            // Failed steps are retried with exponential back-off, capped at a minute.
            sqlx::query(
                "INSERT INTO saga_inflight (transaction_id, correlation_id, due_at, attempts, last_error) \
                 SELECT id, correlation, now() + interval '1 second', 1, error \
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[]) AS failed(id, correlation, error) \
                 ON CONFLICT (transaction_id) DO UPDATE \
                 SET attempts = saga_inflight.attempts + 1, last_error = EXCLUDED.last_error, \
                     due_at = now() + least(interval '1 second' * power(2, saga_inflight.attempts), interval '60 seconds')",
            )
            .bind(&failed_ids)
            .bind(&failed_correlations)
            .bind(&failed_errors)
            .execute(&mut *transaction)
            .await
            .context("recording failed transactions")?;
        }
        if let Some(position) = checkpoint {
            store_checkpoint(&mut *transaction, crate::saga::CHECKPOINT, position).await?;
        }
        transaction
            .commit()
            .await
            .context("committing a saga batch")?;
        Ok(())
    }

    async fn due(&self, max: usize) -> Result<Vec<(Uuid, Option<String>)>> {
        sqlx::query_as(
            "SELECT transaction_id, correlation_id FROM saga_inflight \
             WHERE due_at <= now() ORDER BY due_at LIMIT $1",
        )
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .context("reading due transactions")
    }

    async fn mark_all_due(&self) -> Result<()> {
        sqlx::query("UPDATE saga_inflight SET due_at = now() WHERE due_at > now()")
            .execute(&self.pool)
            .await
            .context("marking in-flight transactions due")?;
        Ok(())
    }

    async fn in_flight(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM saga_inflight")
            .fetch_one(&self.pool)
            .await
            .context("counting in-flight transactions")
    }
}

async fn store_checkpoint<'e, E>(executor: E, follower: &str, position: LogPosition) -> Result<()>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query(
        "INSERT INTO follower_checkpoints (name, tx_id, position) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
         position = EXCLUDED.position, updated_at = now() \
         WHERE (follower_checkpoints.tx_id, follower_checkpoints.position) \
             < (EXCLUDED.tx_id, EXCLUDED.position)",
    )
    .bind(follower)
    .bind(position.commit)
    .bind(position.index)
    .execute(executor)
    .await
    .context("moving a follower checkpoint")?;
    Ok(())
}

/// The SQLite tables of the follower state, versioned.
pub const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "follower checkpoints and the saga's in-flight table",
    sql: include_str!("../migrations/sqlite/0001_follower_state.sql"),
}];

/// The follower state in SQLite (the embedded mode).
#[derive(Clone)]
pub struct SqliteFollowerState {
    pool: SqlitePool,
}

impl SqliteFollowerState {
    /// Opens it in the database of `pool`, migrating it.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        infra::sqlite::migrate(&pool, "command_api", SQLITE_MIGRATIONS).await?;
        Ok(SqliteFollowerState { pool })
    }
}

#[async_trait]
impl FollowerState for SqliteFollowerState {
    async fn checkpoint(&self, follower: &str) -> Result<LogPosition> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT commit_at, idx FROM follower_checkpoints WHERE name = ?")
                .bind(follower)
                .fetch_optional(&self.pool)
                .await
                .context("reading a follower checkpoint")?;
        Ok(
            row.map_or(LogPosition::START, |(commit, index)| LogPosition {
                commit,
                index,
            }),
        )
    }

    async fn store_checkpoint(&self, follower: &str, position: LogPosition) -> Result<()> {
        store_sqlite_checkpoint(&self.pool, follower, position).await
    }

    async fn record_saga_batch(
        &self,
        checkpoint: Option<LogPosition>,
        progress: &[SagaProgress],
    ) -> Result<()> {
        // A few statements per batch, not one per transaction: each is a round trip to the
        // connection's thread while this holds the file's one write connection.
        let now = Utc::now().timestamp_millis();
        let mut done: Vec<String> = Vec::new();
        let mut waiting: Vec<(String, &str, i64)> = Vec::new();
        let mut failed: Vec<(String, &str, &str)> = Vec::new();
        for item in progress {
            let id = item.transaction_id.to_string();
            match &item.state {
                InFlight::Done => done.push(id),
                InFlight::Waiting { until } => {
                    waiting.push((id, &item.correlation_id, until.timestamp_millis()));
                }
                InFlight::Failed { error } => failed.push((id, &item.correlation_id, error)),
            }
        }
        let mut transaction = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("starting a saga batch")?;
        for chunk in done.chunks(ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::<Sqlite>::new("DELETE FROM saga_inflight WHERE transaction_id IN ");
            query.push_tuples(chunk, |mut tuple, id| {
                tuple.push_bind(id);
            });
            query
                .build()
                .execute(&mut *transaction)
                .await
                .context("removing finished transactions")?;
        }
        for chunk in waiting.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO saga_inflight (transaction_id, correlation_id, due_at_ms) ",
            );
            query.push_values(chunk, |mut values, (id, correlation, until)| {
                values
                    .push_bind(id)
                    .push_bind(*correlation)
                    .push_bind(*until);
            });
            query.push(
                " ON CONFLICT (transaction_id) DO UPDATE \
                 SET due_at_ms = excluded.due_at_ms, attempts = 0, last_error = NULL",
            );
            query
                .build()
                .execute(&mut *transaction)
                .await
                .context("recording waiting transactions")?;
        }
        for chunk in failed.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO saga_inflight \
                     (transaction_id, correlation_id, due_at_ms, attempts, last_error) ",
            );
            query.push_values(chunk, |mut values, (id, correlation, error)| {
                values
                    .push_bind(id)
                    .push_bind(*correlation)
                    .push_bind(now + RETRY_FIRST_MS)
                    .push_bind(1_i64)
                    .push_bind(*error);
            });
            // Failed steps are retried with exponential back-off, capped at a minute.
            query.push(
                " ON CONFLICT (transaction_id) DO UPDATE \
                 SET attempts = saga_inflight.attempts + 1, \
                     last_error = excluded.last_error, \
                     due_at_ms = ",
            );
            query
                .push_bind(now)
                .push(" + min(")
                .push_bind(RETRY_FIRST_MS)
                .push(" << min(saga_inflight.attempts, 16), ")
                .push_bind(RETRY_MAX_MS)
                .push(")");
            query
                .build()
                .execute(&mut *transaction)
                .await
                .context("recording failed transactions")?;
        }
        if let Some(position) = checkpoint {
            store_sqlite_checkpoint(&mut *transaction, crate::saga::CHECKPOINT, position).await?;
        }
        transaction
            .commit()
            .await
            .context("committing a saga batch")?;
        Ok(())
    }

    async fn due(&self, max: usize) -> Result<Vec<(Uuid, Option<String>)>> {
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT transaction_id, correlation_id FROM saga_inflight \
             WHERE due_at_ms <= ? ORDER BY due_at_ms LIMIT ?",
        )
        .bind(Utc::now().timestamp_millis())
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .context("reading due transactions")?;
        rows.into_iter()
            .map(|(id, correlation)| {
                Uuid::parse_str(&id)
                    .map(|id| (id, correlation))
                    .map_err(|error| crate::Error::Store {
                        context: "reading due transactions",
                        message: format!("{id:?} is not a transaction id: {error}"),
                    })
            })
            .collect()
    }

    async fn mark_all_due(&self) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        sqlx::query("UPDATE saga_inflight SET due_at_ms = ?1 WHERE due_at_ms > ?1")
            .bind(now)
            .execute(&self.pool)
            .await
            .context("marking in-flight transactions due")?;
        Ok(())
    }

    async fn in_flight(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM saga_inflight")
            .fetch_one(&self.pool)
            .await
            .context("counting in-flight transactions")
    }
}

async fn store_sqlite_checkpoint<'e, E>(
    executor: E,
    follower: &str,
    position: LogPosition,
) -> Result<()>
where
    E: sqlx::SqliteExecutor<'e>,
{
    sqlx::query(
        "INSERT INTO follower_checkpoints (name, commit_at, idx) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET commit_at = excluded.commit_at, idx = excluded.idx, \
             updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE (follower_checkpoints.commit_at, follower_checkpoints.idx) \
             < (excluded.commit_at, excluded.idx)",
    )
    .bind(follower)
    .bind(position.commit)
    .bind(position.index)
    .execute(executor)
    .await
    .context("moving a follower checkpoint")?;
    Ok(())
}

/// The conformance suite of the follower state: every implementation passes it.
#[cfg(feature = "testing")]
pub mod conformance {
    use std::sync::Arc;

    use chrono::{TimeDelta, Utc};
    use infra::log::LogPosition;
    use uuid::Uuid;

    use super::{FollowerState, InFlight, SagaProgress};

    /// Instantiates every check as a `#[tokio::test]` on a state from `$fresh`, an
    /// `async fn() -> (Arc<dyn FollowerState>, G)`.
    #[macro_export]
    macro_rules! follower_state_conformance {
        ($fresh:path) => {
            $crate::follower_state_conformance!(@checks $fresh;
                checkpoints_only_move_forward,
                a_batch_records_progress_and_the_checkpoint_together,
                failed_steps_back_off_and_waiting_ones_come_due
            );
        };
        (@checks $fresh:path; $($check:ident),*) => {
            $(
                #[tokio::test]
                async fn $check() {
                    let (state, _keep) = $fresh().await;
                    $crate::state::conformance::$check(state).await;
                }
            )*
        };
    }

    fn at(commit: i64, index: i64) -> LogPosition {
        LogPosition { commit, index }
    }

    /// A checkpoint starts at the start, moves forward, and never back (a deposed leader's late
    /// batch cannot undo its successor's progress); followers are independent.
    pub async fn checkpoints_only_move_forward(state: Arc<dyn FollowerState>) {
        assert_eq!(
            state.checkpoint("relay").await.expect("reads"),
            LogPosition::START
        );
        state
            .store_checkpoint("relay", at(5, 2))
            .await
            .expect("stores");
        state
            .store_checkpoint("relay", at(5, 1))
            .await
            .expect("answered");
        state
            .store_checkpoint("relay", at(4, 9))
            .await
            .expect("answered");
        assert_eq!(state.checkpoint("relay").await.expect("reads"), at(5, 2));
        state
            .store_checkpoint("relay", at(6, 0))
            .await
            .expect("stores");
        assert_eq!(state.checkpoint("relay").await.expect("reads"), at(6, 0));
        assert_eq!(
            state.checkpoint("saga").await.expect("reads"),
            LogPosition::START
        );
    }

    /// A saga batch records which transactions are done, which wait until when, and the
    /// checkpoint, together; a timer batch leaves the checkpoint alone.
    pub async fn a_batch_records_progress_and_the_checkpoint_together(
        state: Arc<dyn FollowerState>,
    ) {
        let (waiting, done, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let soon = Utc::now() - TimeDelta::seconds(1);
        let progress = vec![
            SagaProgress {
                transaction_id: waiting,
                correlation_id: "c-waiting".to_owned(),
                state: InFlight::Waiting { until: soon },
            },
            SagaProgress {
                transaction_id: done,
                correlation_id: "c-done".to_owned(),
                state: InFlight::Waiting { until: soon },
            },
            SagaProgress {
                transaction_id: later,
                correlation_id: "c-later".to_owned(),
                state: InFlight::Waiting {
                    until: Utc::now() + TimeDelta::hours(1),
                },
            },
        ];
        state
            .record_saga_batch(Some(at(7, 3)), &progress)
            .await
            .expect("records");
        assert_eq!(
            state
                .checkpoint(crate::saga::CHECKPOINT)
                .await
                .expect("reads"),
            at(7, 3)
        );
        assert_eq!(state.in_flight().await.expect("counts"), 3);
        let mut due = state.due(10).await.expect("reads");
        due.sort();
        let mut expected = vec![
            (waiting, Some("c-waiting".to_owned())),
            (done, Some("c-done".to_owned())),
        ];
        expected.sort();
        assert_eq!(due, expected, "only what is due, with its correlation id");
        state
            .record_saga_batch(
                None,
                &[SagaProgress {
                    transaction_id: done,
                    correlation_id: "c-done".to_owned(),
                    state: InFlight::Done,
                }],
            )
            .await
            .expect("records");
        assert_eq!(state.in_flight().await.expect("counts"), 2);
        assert_eq!(
            state
                .checkpoint(crate::saga::CHECKPOINT)
                .await
                .expect("reads"),
            at(7, 3),
            "a batch without a checkpoint leaves it"
        );
        state.mark_all_due().await.expect("marks");
        assert_eq!(
            state.due(10).await.expect("reads").len(),
            2,
            "everything is due now"
        );
        assert_eq!(
            state.due(1).await.expect("reads").len(),
            1,
            "bounded by max"
        );
    }

    /// A failed step is retried later, later still if it fails again; waiting resets that.
    pub async fn failed_steps_back_off_and_waiting_ones_come_due(state: Arc<dyn FollowerState>) {
        let id = Uuid::new_v4();
        let failed = |error: &str| SagaProgress {
            transaction_id: id,
            correlation_id: "c".to_owned(),
            state: InFlight::Failed {
                error: error.to_owned(),
            },
        };
        state
            .record_saga_batch(None, &[failed("first")])
            .await
            .expect("records");
        assert!(
            state.due(10).await.expect("reads").is_empty(),
            "not due at once"
        );
        state
            .record_saga_batch(None, &[failed("second")])
            .await
            .expect("records");
        assert_eq!(state.in_flight().await.expect("counts"), 1);
        assert!(
            state.due(10).await.expect("reads").is_empty(),
            "backed off further"
        );
        state
            .record_saga_batch(
                None,
                &[SagaProgress {
                    transaction_id: id,
                    correlation_id: "c".to_owned(),
                    state: InFlight::Waiting {
                        until: Utc::now() - TimeDelta::seconds(1),
                    },
                }],
            )
            .await
            .expect("records");
        assert_eq!(
            state.due(10).await.expect("reads").len(),
            1,
            "waiting and due"
        );
    }
}
