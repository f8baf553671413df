//! Places in the event log and how far behind them a follower stands: [`LogPosition`] (the
//! `X-Ledger-Position` header's value), [`Lag`] and the lag gauges every service publishes.
//! The log itself is the [`crate::eventlog::EventLog`] seam.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use tokio_util::sync::CancellationToken;

/// A place in the log's commit order, opaque to clients: two numbers ordered lexicographically,
/// which is the order followers read the log in. What they mean is the event log's business:
/// PostgreSQL's inserting transaction and insert position, SQLite's row id, EventStoreDB's
/// commit and prepare positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPosition {
    pub commit: i64,
    pub index: i64,
}

impl LogPosition {
    /// Before the first event.
    pub const START: LogPosition = LogPosition {
        commit: 0,
        index: 0,
    };
}

/// Written as `commit.index`, the form of the `X-Ledger-Position` header.
impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.commit, self.index)
    }
}

impl FromStr for LogPosition {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let invalid = || format!("{text:?} is not a ledger position");
        let (commit, index) = text.split_once('.').ok_or_else(invalid)?;
        let number = |part: &str| {
            part.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()))
        };
        Ok(LogPosition {
            commit: number(commit).ok_or_else(invalid)?,
            index: number(index).ok_or_else(invalid)?,
        })
    }
}

/// How many waiting events [`LogReader::lag`] counts at most: counting is an index range scan,
/// and past this many the exact figure no longer changes what an operator does.
pub const LAG_COUNT_CAP: i64 = 100_000;

/// How often the services refresh their lag gauges.
pub const LAG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Publishes lag gauges every [`LAG_INTERVAL`] until `cancel`: `{metric}_events` and
/// `{metric}_seconds`, labelled `{label}="<follower>"`, from what `measure` returns (followers'
/// checkpoints read from the database, passed to [`LogReader::lag`]).
///
/// Every instance runs it, whoever leads the followers: the gauges keep growing while a follower
/// cannot move (its broker down, its batches failing, no leader) instead of freezing at their last
/// value, and no batch pays for the measurement. A measurement stops at `cancel` (it only reads).
/// A failed one is counted in `lag_measurement_failures_total` and logged once until one
/// succeeds again; the gauges keep their last value meanwhile.
pub async fn report_lag<F, Fut, E>(
    metric: &'static str,
    label: &'static str,
    cancel: CancellationToken,
    mut measure: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Vec<(&'static str, Lag)>, E>>,
    E: fmt::Display,
{
    let (events_gauge, seconds_gauge) = (format!("{metric}_events"), format!("{metric}_seconds"));
    let mut failing = false;
    loop {
        let measured = tokio::select! {
            () = cancel.cancelled() => return,
            measured = measure() => measured,
        };
        match measured {
            Ok(lags) => {
                if failing {
                    tracing::info!(metric, "lag measured again");
                    failing = false;
                }
                for (follower, lag) in lags {
                    metrics::gauge!(events_gauge.clone(), label => follower).set(lag.events as f64);
                    metrics::gauge!(seconds_gauge.clone(), label => follower)
                        .set(lag.oldest_unread.as_secs_f64());
                }
            }
            Err(error) => {
                metrics::counter!("lag_measurement_failures_total", "metric" => metric)
                    .increment(1);
                if !failing {
                    tracing::warn!(
                        metric,
                        error.message = %error,
                        "lag not measured; its gauges keep their last value until it is"
                    );
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(LAG_INTERVAL) => {}
        }
    }
}

/// How far a follower's checkpoint stands behind the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// Committed events after the checkpoint (of the follower's filter), counted up to
    /// [`LAG_COUNT_CAP`].
    pub events: i64,
    /// Age of the oldest of them by the log's clock; zero when caught up. Unlike the count, it
    /// grows while nothing moves, whatever the traffic.
    pub oldest_unread: std::time::Duration,
}

impl Lag {
    /// Caught up.
    pub const NONE: Lag = Lag {
        events: 0,
        oldest_unread: std::time::Duration::ZERO,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_transaction_then_insert_position() {
        let early_tx_late_insert = LogPosition {
            commit: 10,
            index: 99,
        };
        let late_tx_early_insert = LogPosition {
            commit: 11,
            index: 5,
        };
        assert!(early_tx_late_insert < late_tx_early_insert);
        assert!(LogPosition::START < early_tx_late_insert);
    }

    #[test]
    fn positions_round_trip_through_their_header_form() {
        let position = LogPosition {
            commit: 7421,
            index: 12,
        };
        assert_eq!(position.to_string(), "7421.12");
        assert_eq!("7421.12".parse::<LogPosition>(), Ok(position));
        for bad in ["", "7421", "a.b", "-1.2", "1.-2", "1.2.3", "+1.2", " 1.2"] {
            assert!(
                bad.parse::<LogPosition>().is_err(),
                "{bad:?} must be refused"
            );
        }
    }
}
