//! Where each follower of the log (saga, relay) stands: one row per follower in
//! `follower_checkpoints`, moved inside the follower's own batch transaction.

use infra::log::{LogPosition, LogReader};
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::{DatabaseContext, Result};

/// The follower's checkpoint, `START` before its first batch.
pub async fn load(pool: &PgPool, follower: &str) -> Result<LogPosition> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT tx_id, position FROM follower_checkpoints WHERE name = $1")
            .bind(follower)
            .fetch_optional(pool)
            .await
            .context("reading a follower checkpoint")?;
    Ok(
        row.map_or(LogPosition::START, |(tx_id, position)| LogPosition {
            tx_id,
            position,
        }),
    )
}

/// Moves the follower's checkpoint forward inside `transaction`; never backwards, so a deposed
/// leader finishing a late batch cannot undo its successor's progress.
pub async fn store(
    transaction: &mut Transaction<'_, Postgres>,
    follower: &str,
    position: LogPosition,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO follower_checkpoints (name, tx_id, position) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, \
         position = EXCLUDED.position, updated_at = now() \
         WHERE (follower_checkpoints.tx_id, follower_checkpoints.position) \
             < (EXCLUDED.tx_id, EXCLUDED.position)",
    )
    .bind(follower)
    .bind(position.tx_id)
    .bind(position.position)
    .execute(&mut **transaction)
    .await
    .context("moving a follower checkpoint")?;
    Ok(())
}

/// Publishes how far behind the head of the log a follower is, in insert positions (an
/// approximation of the number of events, exact when no insert was rolled back).
pub async fn record_lag(
    reader: &LogReader,
    follower: &'static str,
    checkpoint: LogPosition,
) -> Result<()> {
    let head = reader.head().await?;
    let behind = (head.position - checkpoint.position).max(0);
    metrics::gauge!("log_follower_lag_events", "follower" => follower).set(behind as f64);
    Ok(())
}
