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
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};
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
}

/// The columns every read returns, in the order `decode` expects.
const COLUMNS: &str = "tx_id::text::bigint AS tx_id, position, event_id, recorded_at, \
     aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata";

impl LogReader {
    /// A reader of `events_table` (schema-qualified, e.g. `command_api.events`).
    pub fn new(pool: PgPool, events_table: &str) -> Self {
        let visible = "tx_id < pg_snapshot_xmin(pg_current_snapshot())";
        let after = "(tx_id, position) > ($1::text::xid8, $2)";
        LogReader {
            pool,
            select_after: format!(
                "SELECT {COLUMNS} FROM {events_table} WHERE {after} AND {visible} \
                 ORDER BY tx_id, position LIMIT $3"
            ),
            select_after_of_type: format!(
                "SELECT {COLUMNS} FROM {events_table} WHERE {after} AND {visible} \
                 AND aggregate_type = $4 ORDER BY tx_id, position LIMIT $3"
            ),
            select_snapshot_after: format!(
                "SELECT {COLUMNS} FROM {events_table} WHERE {after} ORDER BY tx_id, position LIMIT $3"
            ),
            select_head: format!(
                "SELECT tx_id::text::bigint AS tx_id, position FROM {events_table} \
                 WHERE {visible} ORDER BY tx_id DESC, position DESC LIMIT 1"
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

    /// The position of the last committed, visible event (`START` for an empty log): followers
    /// compare their checkpoint with it to report lag.
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
