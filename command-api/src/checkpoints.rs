//! Where each follower of the log (saga, relay) stands: one row per follower in
//! `follower_checkpoints`, moved inside the follower's own batch transaction.

use infra::log::{LogPosition, LogReader};
use infra::replay::TRANSACTION_STREAM;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::error::{DatabaseContext, Error, Result};

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

/// The followers whose lag is reported, with the aggregate type each one reads.
const FOLLOWERS: [(&str, Option<&str>); 2] = [
    (crate::saga::CHECKPOINT, Some(TRANSACTION_STREAM)),
    (crate::relay::CHECKPOINT, None),
];

/// Publishes `log_follower_lag_events` and `log_follower_lag_seconds` for the saga and the relay
/// until `cancel` (see [`infra::log::report_lag`]): every instance, whoever leads, so a relay
/// cut off from the broker or a saga whose batches fail shows as a growing lag.
pub async fn report_lag(pool: PgPool, reader: LogReader, cancel: CancellationToken) {
    infra::log::report_lag("log_follower_lag", "follower", cancel, || async {
        let mut lags = Vec::with_capacity(FOLLOWERS.len());
        for (follower, aggregate_type) in FOLLOWERS {
            let checkpoint = load(&pool, follower).await?;
            lags.push((follower, reader.lag(checkpoint, aggregate_type).await?));
        }
        Ok::<_, Error>(lags)
    })
    .await;
}
