//! Where the audit trail of a transaction comes from: its stream's events as stored, with their
//! ids, times and metadata, read through the event-log seam (`EventLog::read_stream_recorded`),
//! so the trail follows the log wherever it lives: PostgreSQL, the embedded mode's SQLite, or
//! KurrentDB.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use infra::eventlog::{EventLog, StreamId};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};

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

/// The trail of the event log the services write, whichever store holds it.
pub struct LogEventTrail {
    log: Arc<dyn EventLog>,
}

impl LogEventTrail {
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        LogEventTrail { log }
    }
}

fn corrupt(problem: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "events",
        problem: problem.to_string(),
    }
}

#[async_trait]
impl EventTrail for LogEventTrail {
    async fn ping(&self) -> bool {
        self.log.ping().await
    }

    async fn transaction_events(&self, id: Uuid) -> Result<Vec<TrailEvent>> {
        let stream = StreamId::new(infra::replay::TRANSACTION_STREAM, id.to_string());
        self.log
            .read_stream_recorded(&stream, 0)
            .await?
            .into_iter()
            .map(|event| {
                Ok(TrailEvent {
                    sequence: i64::try_from(event.sequence).map_err(corrupt)?,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    event_id: event.event_id,
                    recorded_at: event.recorded_at,
                    payload: serde_json::from_str(&event.payload).map_err(corrupt)?,
                    metadata: serde_json::to_value(&event.metadata).map_err(corrupt)?,
                })
            })
            .collect()
    }
}
