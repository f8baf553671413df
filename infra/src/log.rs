//! The event log in commit order: the gap-safe reader every follower (saga, relay, projector,
//! CLI) uses.
//!
//! A `bigserial` position is assigned at insert time, but transactions commit in another order,
//! so "everything after the last position I saw" skips rows that commit late. Every event row
//! therefore records the id of the transaction that inserted it (`tx_id`, `pg_current_xact_id()`)
//! and the reader only returns rows whose transaction is older than the oldest transaction still
//! running (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`): those have all committed or
//! aborted, so no row can appear later below the reader's checkpoint. Rows are ordered and
//! checkpointed by `(tx_id, position)`. The price: one long-running transaction anywhere in the
//! cluster holds every follower back, so our pools cap idle transactions (see `db`) and followers
//! expose their lag.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{DatabaseContext, Error, Result};

/// A place in the log's commit order: the inserting transaction, then the insert position.
/// Ordered lexicographically, which is the commit order the reader guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPosition {
    pub tx_id: i64,
    pub position: i64,
}

impl LogPosition {
    /// Before the first event.
    pub const START: LogPosition = LogPosition {
        tx_id: 0,
        position: 0,
    };
}

/// Written as `tx_id.position`, the form of the `X-Ledger-Position` header.
impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx_id, self.position)
    }
}

impl FromStr for LogPosition {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not a ledger position (expected <tx_id>.<position>)");
        let (tx_id, position) = text.split_once('.').ok_or_else(invalid)?;
        let number = |part: &str| {
            part.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()))
        };
        Ok(LogPosition {
            tx_id: number(tx_id).ok_or_else(invalid)?,
            position: number(position).ok_or_else(invalid)?,
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
    /// Committed events after the checkpoint (of the follower's aggregate type), counted up to
    /// [`LAG_COUNT_CAP`].
    pub events: i64,
    /// Age of the oldest of them by the database's clock; zero when caught up. Unlike the
    /// count, it grows while nothing moves, whatever the traffic.
    pub oldest_unread: std::time::Duration,
}

/// One committed event as followers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    pub position: LogPosition,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

impl LogEvent {
    /// A metadata entry (correlation id, causation id, actor, command id), if present.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

/// Reads committed events in commit order, never skipping one.
#[derive(Clone)]
pub struct LogReader {
    pool: PgPool,
    select_after: String,
    select_after_of_type: String,
    select_head: String,
    select_snapshot_after: String,
    select_oldest_unread: String,
    count_unread: String,
}

/// The columns every read returns, in the order `decode` expects. Reads select `FROM <table> e`
/// and order by `e.tx_id`: an unqualified `ORDER BY tx_id` would name the output column (the
/// `bigint` cast below), which no index provides, and PostgreSQL would then sort every row after
/// the checkpoint for each batch, quadratic over a long catch-up or a rebuild.
const COLUMNS: &str = "e.tx_id::text::bigint AS tx_id, e.position, e.event_id, e.recorded_at, \
     e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, \
     e.metadata";

impl LogReader {
    /// A reader of `events_table` (schema-qualified, e.g. `command_api.events`).
    pub fn new(pool: PgPool, events_table: &str) -> Self {
        let visible = "e.tx_id < pg_snapshot_xmin(pg_current_snapshot())";
        let after = "(e.tx_id, e.position) > ($1::text::xid8, $2)";
        let order = "ORDER BY e.tx_id, e.position";
        LogReader {
            pool,
            select_after: format!(
                "SELECT {COLUMNS} FROM {events_table} e WHERE {after} AND {visible} \
                 {order} LIMIT $3"
            ),
            select_after_of_type: format!(
                "SELECT {COLUMNS} FROM {events_table} e WHERE {after} AND {visible} \
                 AND e.aggregate_type = $4 {order} LIMIT $3"
            ),
            select_snapshot_after: format!(
                "SELECT {COLUMNS} FROM {events_table} e WHERE {after} {order} LIMIT $3"
            ),
            select_head: format!(
                "SELECT e.tx_id::text::bigint AS tx_id, e.position FROM {events_table} e \
                 WHERE {visible} ORDER BY e.tx_id DESC, e.position DESC LIMIT 1"
            ),
            // Lag counts every committed event, beyond the visibility bound too: events held
            // back by a long transaction elsewhere are waiting as much as any.
            select_oldest_unread: format!(
                "SELECT extract(epoch FROM clock_timestamp() - e.recorded_at)::float8 \
                 FROM {events_table} e WHERE {after} \
                 AND ($3::text IS NULL OR e.aggregate_type = $3) {order} LIMIT 1"
            ),
            count_unread: format!(
                "SELECT count(*) FROM (SELECT 1 FROM {events_table} e WHERE {after} \
                 AND ($3::text IS NULL OR e.aggregate_type = $3) LIMIT $4) AS waiting"
            ),
        }
    }

    /// Up to `limit` committed events after `after`, in commit order, optionally only those of
    /// one aggregate type. An empty answer means "nothing more is visible yet", not "the end".
    pub async fn read_after(
        &self,
        after: LogPosition,
        limit: i64,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<LogEvent>> {
        let query = match aggregate_type {
            None => sqlx::query(&self.select_after)
                .bind(after.tx_id.to_string())
                .bind(after.position)
                .bind(limit),
            Some(kind) => sqlx::query(&self.select_after_of_type)
                .bind(after.tx_id.to_string())
                .bind(after.position)
                .bind(limit)
                .bind(kind),
        };
        let rows = query
            .fetch_all(&self.pool)
            .await
            .context("reading the event log")?;
        rows.iter().map(decode).collect()
    }

    /// Up to `limit` events after `after` as the snapshot of `connection`'s transaction sees
    /// them, without the follower's visibility bound: for point-in-time reads (audits, replays)
    /// that page through one REPEATABLE READ transaction, where every row seen is committed and
    /// no row can appear later inside that snapshot.
    pub async fn read_snapshot_after(
        &self,
        connection: &mut sqlx::PgConnection,
        after: LogPosition,
        limit: i64,
    ) -> Result<Vec<LogEvent>> {
        let rows = sqlx::query(&self.select_snapshot_after)
            .bind(after.tx_id.to_string())
            .bind(after.position)
            .bind(limit)
            .fetch_all(connection)
            .await
            .context("reading the event log")?;
        rows.iter().map(decode).collect()
    }

    /// How far `checkpoint` is behind the log: every committed event after it counts, including
    /// those a long transaction elsewhere still holds back from followers (decision 3's known
    /// cost, which this makes visible). Followers report it on a timer, not after their
    /// batches, so the figure keeps growing while a follower cannot move (its broker down, its
    /// batches failing) instead of freezing at its last value.
    ///
    /// A follower of one aggregate type passes it: events of other types after its checkpoint
    /// are not waiting for it (the saga's checkpoint does not move past account events).
    pub async fn lag(&self, checkpoint: LogPosition, aggregate_type: Option<&str>) -> Result<Lag> {
        let age: Option<f64> = sqlx::query_scalar(&self.select_oldest_unread)
            .bind(checkpoint.tx_id.to_string())
            .bind(checkpoint.position)
            .bind(aggregate_type)
            .fetch_optional(&self.pool)
            .await
            .context("reading the oldest unread event")?;
        let Some(age) = age else {
            return Ok(Lag {
                events: 0,
                oldest_unread: std::time::Duration::ZERO,
            });
        };
        let events: i64 = sqlx::query_scalar(&self.count_unread)
            .bind(checkpoint.tx_id.to_string())
            .bind(checkpoint.position)
            .bind(aggregate_type)
            .bind(LAG_COUNT_CAP)
            .fetch_one(&self.pool)
            .await
            .context("counting unread events")?;
        Ok(Lag {
            // At least the one found above, which may have committed in between.
            events: events.max(1),
            oldest_unread: std::time::Duration::try_from_secs_f64(age).unwrap_or_default(),
        })
    }

    /// The position of the last committed, visible event (`START` for an empty log): where a
    /// rebuild's catch-up aims.
    pub async fn head(&self) -> Result<LogPosition> {
        let row = sqlx::query(&self.select_head)
            .fetch_optional(&self.pool)
            .await
            .context("reading the head of the event log")?;
        Ok(match row {
            Some(row) => LogPosition {
                tx_id: row.try_get("tx_id").context("decoding the log head")?,
                position: row.try_get("position").context("decoding the log head")?,
            },
            None => LogPosition::START,
        })
    }
}

fn decode(row: &PgRow) -> Result<LogEvent> {
    let position: i64 = row.try_get("position").context("decoding a log row")?;
    let malformed = |problem: sqlx::Error| Error::MalformedLogRow {
        position,
        problem: problem.to_string(),
    };
    Ok(LogEvent {
        position: LogPosition {
            tx_id: row.try_get("tx_id").map_err(malformed)?,
            position,
        },
        event_id: row.try_get("event_id").map_err(malformed)?,
        recorded_at: row.try_get("recorded_at").map_err(malformed)?,
        aggregate_type: row.try_get("aggregate_type").map_err(malformed)?,
        aggregate_id: row.try_get("aggregate_id").map_err(malformed)?,
        sequence: row.try_get("sequence").map_err(malformed)?,
        event_type: row.try_get("event_type").map_err(malformed)?,
        event_version: row.try_get("event_version").map_err(malformed)?,
        payload: row.try_get("payload").map_err(malformed)?,
        metadata: row.try_get("metadata").map_err(malformed)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_transaction_then_insert_position() {
        let early_tx_late_insert = LogPosition {
            tx_id: 10,
            position: 99,
        };
        let late_tx_early_insert = LogPosition {
            tx_id: 11,
            position: 5,
        };
        assert!(early_tx_late_insert < late_tx_early_insert);
        assert!(LogPosition::START < early_tx_late_insert);
    }

    #[test]
    fn positions_round_trip_through_their_header_form() {
        let position = LogPosition {
            tx_id: 7421,
            position: 12,
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
