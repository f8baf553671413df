//! The follower-state seam: where the write side's followers stand (their checkpoints) and which
//! transactions the saga still has to finish (its in-flight table, with when to look at each
//! again). Kept apart from the event log: with EventStoreDB the log moves, this stays in the
//! database, and nothing ever needs an append and a checkpoint to commit together.
//!
//! [`PgFollowerState`] keeps it in command-api's schema; the embedded mode's lives in its
//! SQLite file.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use infra::log::LogPosition;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{DatabaseContext, Result};

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
