//! The lag of the write side's followers (the saga and the relay), measured from their
//! checkpoints by every instance, whoever leads them.

use std::sync::Arc;

use infra::codec::TRANSACTION_STREAM;
use infra::eventlog::{EventLog, LogFilter};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::state::FollowerState;

/// The followers whose lag is reported, with what each one reads.
const FOLLOWERS: [(&str, LogFilter); 2] = [
    (
        crate::saga::CHECKPOINT,
        LogFilter::aggregate(TRANSACTION_STREAM),
    ),
    (crate::relay::CHECKPOINT, crate::relay::PUBLISHED),
];

/// Publishes `log_follower_lag_events` and `log_follower_lag_seconds` for the saga and the relay
/// until `cancel` (see [`infra::log::report_lag`]): every instance, whoever leads, so a relay
/// cut off from the broker or a saga whose batches fail shows as a growing lag.
pub async fn report_lag(
    log: Arc<dyn EventLog>,
    state: Arc<dyn FollowerState>,
    cancel: CancellationToken,
) {
    infra::log::report_lag("log_follower_lag", "follower", cancel, || async {
        let mut lags = Vec::with_capacity(FOLLOWERS.len());
        for (follower, filter) in FOLLOWERS {
            let checkpoint = state.checkpoint(follower).await?;
            lags.push((follower, log.lag(checkpoint, filter).await?));
        }
        Ok::<_, Error>(lags)
    })
    .await;
}
