//! Where the audit trail of a transaction comes from: its stream's events as stored, with their
//! ids, times and metadata (more than `EventLog::read_stream` returns, which serves aggregate
//! loads). [`PgEventTrail`] reads command-api's event table in PostgreSQL; [`SqliteEventTrail`]
//! the embedded mode's SQLite event log (`infra::eventlog::sqlite`'s `events` table).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use infra::error::DatabaseContext;
use serde_json::Value;
use sqlx::{PgPool, Row, SqlitePool};
use uuid::Uuid;

use crate::error::{Error, Result};

/// How long the `/health` check of the log waits.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// One stored event of a transaction's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct TrailEvent {
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub payload: Value,
    pub metadata: Value,
}

#[async_trait]
pub trait EventTrail: Send + Sync + 'static {
    /// Whether the event log answers (`/health`).
    async fn ping(&self) -> bool;

    /// Every event of transaction `id`'s stream, in stream order.
    async fn transaction_events(&self, id: Uuid) -> Result<Vec<TrailEvent>>;
}

const SELECT: &str = "SELECT sequence, event_type, event_version, event_id, recorded_at, \
                      payload, metadata FROM";

/// The trail in PostgreSQL: `table` is command-api's event table (schema-qualified).
pub struct PgEventTrail {
    pool: PgPool,
    table: Arc<str>,
}

impl PgEventTrail {
    pub fn new(pool: PgPool, table: &str) -> Self {
        PgEventTrail {
            pool,
            table: table.into(),
        }
    }
}

#[async_trait]
impl EventTrail for PgEventTrail {
    async fn ping(&self) -> bool {
        tokio::time::timeout(
            PING_TIMEOUT,
            sqlx::query(&format!("SELECT 1 FROM {} LIMIT 1", self.table)).execute(&self.pool),
        )
        .await
        .is_ok_and(|result| result.is_ok())
    }

    async fn transaction_events(&self, id: Uuid) -> Result<Vec<TrailEvent>> {
        let rows = sqlx::query(&format!(
            "{SELECT} {} WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
            self.table
        ))
        .bind(infra::replay::TRANSACTION_STREAM)
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .context("reading a transaction's events")?;
        let events = rows
            .iter()
            .map(|row| {
                Ok(TrailEvent {
                    sequence: row.try_get("sequence")?,
                    event_type: row.try_get("event_type")?,
                    event_version: row.try_get("event_version")?,
                    event_id: row.try_get("event_id")?,
                    recorded_at: row.try_get("recorded_at")?,
                    payload: row.try_get("payload")?,
                    metadata: row.try_get("metadata")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .context("decoding a transaction's events")?;
        Ok(events)
    }
}

/// The trail in the embedded mode's SQLite event log (a pool on its file; reads only).
pub struct SqliteEventTrail {
    pool: SqlitePool,
}

impl SqliteEventTrail {
    pub fn new(pool: SqlitePool) -> Self {
        SqliteEventTrail { pool }
    }
}

fn corrupt(problem: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "events",
        problem: problem.to_string(),
    }
}

#[async_trait]
impl EventTrail for SqliteEventTrail {
    async fn ping(&self) -> bool {
        infra::sqlite::ping(&self.pool, PING_TIMEOUT).await
    }

    async fn transaction_events(&self, id: Uuid) -> Result<Vec<TrailEvent>> {
        let rows = sqlx::query(&format!(
            "{SELECT} events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence"
        ))
        .bind(infra::replay::TRANSACTION_STREAM)
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await
        .context("reading a transaction's events")?;
        rows.iter()
            .map(|row| {
                // Text columns there: ids, times and JSON as the log writes them.
                let text = |column: &str| row.try_get::<String, _>(column).map_err(corrupt);
                Ok(TrailEvent {
                    sequence: row.try_get("sequence").map_err(corrupt)?,
                    event_type: text("event_type")?,
                    event_version: text("event_version")?,
                    event_id: Uuid::parse_str(&text("event_id")?).map_err(corrupt)?,
                    recorded_at: DateTime::parse_from_rfc3339(&text("recorded_at")?)
                        .map_err(corrupt)?
                        .with_timezone(&Utc),
                    payload: serde_json::from_str(&text("payload")?).map_err(corrupt)?,
                    metadata: serde_json::from_str(&text("metadata")?).map_err(corrupt)?,
                })
            })
            .collect()
    }
}
