//! The event log on SQLite, for the embedded mode: the same columns as on PostgreSQL (sqlite-es's
//! `events` table plus what the log needs), in a file of the data directory.
//!
//! **Commit order.** One writer appends at a time (the committer task, on a connection of its
//! own, in `BEGIN IMMEDIATE` transactions), so the `position` row id is assigned in commit order
//! and no row ever appears later below another: a follower reads `position > checkpoint`, with no
//! gap problem (NOTES). A [`LogPosition`] is `(position, 0)`.
//!
//! **Appends** are group-committed like PostgreSQL's: every waiting append in one transaction and
//! one fsync. Inside it each append checks its stream's version itself; nobody else writes the
//! file's event table meanwhile, so an append is written whole or found conflicting (or already
//! written, by its ids: a retry).
//!
//! **Loads** of one stream go through sqlite-es's repository.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::persist::PersistedEventRepository;
use sqlite_es::SqliteEventRepository;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Connection, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::committer::{BatchWriter, CommitterSettings, GroupCommitter};
use super::{
    Append, AppendOutcome, EventLog, EventMetadata, Lag, LogFilter, LogPosition, RecordedEvent,
    Snapshot, StreamEvent, StreamId, Wakeups, streams,
};
use crate::error::{DatabaseContext, Error, Result};
use crate::log::LAG_COUNT_CAP;
use crate::sqlite::Migration;

/// The event log's tables, versioned.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "event log",
    sql: include_str!("../../migrations/sqlite/eventlog/0001_event_log.sql"),
}];

/// The component name of the event log's migrations.
const COMPONENT: &str = "event_log";

/// Reads select these, in the order [`decode`] expects.
const COLUMNS: &str = "position, event_id, recorded_at, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, payload, metadata";

pub struct SqliteEventLog {
    pool: SqlitePool,
    committer: Option<GroupCommitter>,
    wakeups: watch::Sender<u64>,
    repository: SqliteEventRepository,
}

impl SqliteEventLog {
    /// Opens the log in the database of `pool` (its reads), migrating it, with a committer on a
    /// connection of its own when `writer` is given.
    pub async fn open(
        pool: SqlitePool,
        writer: Option<SqliteConnectOptions>,
        settings: CommitterSettings,
    ) -> Result<SqliteEventLog> {
        if writer.is_some() {
            crate::sqlite::migrate(&pool, COMPONENT, MIGRATIONS).await?;
        }
        let (wakeups, _) = watch::channel(0_u64);
        let committer = writer.map(|options| {
            GroupCommitter::start(
                SqliteWriter {
                    options,
                    connection: None,
                },
                wakeups.clone(),
                settings,
            )
        });
        Ok(SqliteEventLog {
            repository: SqliteEventRepository::new(pool.clone())
                .with_tables("events", "sqlite_es_snapshots"),
            pool,
            committer,
            wakeups,
        })
    }

    /// Opens the log in the file at `path` (created if missing), writable.
    pub async fn open_file(path: &Path, read_connections: u32) -> Result<SqliteEventLog> {
        let options = crate::sqlite::options(path, true);
        let pool = crate::sqlite::pool(options.clone(), read_connections).await?;
        Self::open(pool, Some(options), CommitterSettings::default()).await
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl EventLog for SqliteEventLog {
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<AppendOutcome>> {
        let Some(committer) = &self.committer else {
            return Err(Error::Config(
                "this event log was opened read-only".to_owned(),
            ));
        };
        committer.submit(appends).await
    }

    async fn read_stream(&self, stream: &StreamId, after: u64) -> Result<Vec<StreamEvent>> {
        let after = usize::try_from(after).unwrap_or(usize::MAX);
        let events = match stream.aggregate_type.as_str() {
            streams::AccountStream::TYPE_NAME => {
                self.repository
                    .get_last_events::<streams::AccountStream>(&stream.aggregate_id, after)
                    .await
            }
            streams::TransactionStream::TYPE_NAME => {
                self.repository
                    .get_last_events::<streams::TransactionStream>(&stream.aggregate_id, after)
                    .await
            }
            other => {
                return Err(Error::Config(format!(
                    "the event log holds no streams of type {other:?}"
                )));
            }
        }
        .map_err(|error| Error::CommitFailed(format!("reading stream {stream}: {error}")))?;
        Ok(events
            .into_iter()
            .map(|event| StreamEvent {
                sequence: event.sequence as u64,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload.to_string(),
            })
            .collect())
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: LogFilter,
    ) -> Result<Vec<RecordedEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE position > ?1 \
             AND (?2 IS NULL OR aggregate_type = ?2) AND (?3 IS NULL OR event_type = ?3) \
             ORDER BY position LIMIT ?4"
        ))
        .bind(after.commit)
        .bind(filter.aggregate_type)
        .bind(filter.event_type)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .context("reading the event log")?;
        rows.iter().map(decode).collect()
    }

    async fn head(&self) -> Result<LogPosition> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
            .fetch_one(&self.pool)
            .await
            .context("reading the head of the event log")?;
        Ok(head.map_or(LogPosition::START, position))
    }

    async fn lag(&self, checkpoint: LogPosition, filter: LogFilter) -> Result<Lag> {
        let oldest: Option<String> = sqlx::query_scalar(
            "SELECT recorded_at FROM events WHERE position > ?1 \
             AND (?2 IS NULL OR aggregate_type = ?2) AND (?3 IS NULL OR event_type = ?3) \
             ORDER BY position LIMIT 1",
        )
        .bind(checkpoint.commit)
        .bind(filter.aggregate_type)
        .bind(filter.event_type)
        .fetch_optional(&self.pool)
        .await
        .context("reading the oldest unread event")?;
        let Some(oldest) = oldest else {
            return Ok(Lag::NONE);
        };
        let events: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE position > ?1 \
             AND (?2 IS NULL OR aggregate_type = ?2) AND (?3 IS NULL OR event_type = ?3) \
             LIMIT ?4)",
        )
        .bind(checkpoint.commit)
        .bind(filter.aggregate_type)
        .bind(filter.event_type)
        .bind(LAG_COUNT_CAP)
        .fetch_one(&self.pool)
        .await
        .context("counting unread events")?;
        let age = DateTime::parse_from_rfc3339(&oldest)
            .map(|at| {
                (Utc::now() - at.with_timezone(&Utc))
                    .to_std()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        Ok(Lag {
            events: events.max(1),
            oldest_unread: age,
        })
    }

    fn subscribe(&self) -> Wakeups {
        self.wakeups.subscribe()
    }

    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let row: Option<(i64, i32, String)> = sqlx::query_as(
            "SELECT sequence, state_version, state FROM aggregate_snapshots \
             WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .fetch_optional(&self.pool)
        .await
        .context("reading a snapshot")?;
        Ok(row.map(|(version, state_version, state)| Snapshot {
            version: u64::try_from(version).unwrap_or(0),
            state_version,
            state,
        }))
    }

    async fn write_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<()> {
        // Only ever move a snapshot forward: a slower writer must not replace a newer one.
        sqlx::query(
            "INSERT INTO aggregate_snapshots (aggregate_type, aggregate_id, sequence, \
                 state_version, state) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET sequence = excluded.sequence, state_version = excluded.state_version, \
                 state = excluded.state \
             WHERE aggregate_snapshots.sequence < excluded.sequence \
                OR aggregate_snapshots.state_version <> excluded.state_version",
        )
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
        .bind(snapshot.state_version)
        .bind(&snapshot.state)
        .execute(&self.pool)
        .await
        .context("writing a snapshot")?;
        Ok(())
    }

    async fn ping(&self) -> bool {
        crate::sqlite::ping(&self.pool, Duration::from_secs(2)).await
    }
}

fn position(row_id: i64) -> LogPosition {
    LogPosition {
        commit: row_id,
        index: 0,
    }
}

fn decode(row: &SqliteRow) -> Result<RecordedEvent> {
    let row_id: i64 = row.try_get("position").context("decoding a log row")?;
    let malformed = |problem: String| Error::MalformedLogRow {
        position: row_id,
        problem,
    };
    let column = |error: sqlx::Error| malformed(error.to_string());
    let event_id: String = row.try_get("event_id").map_err(column)?;
    let recorded_at: String = row.try_get("recorded_at").map_err(column)?;
    let metadata: String = row.try_get("metadata").map_err(column)?;
    let sequence: i64 = row.try_get("sequence").map_err(column)?;
    Ok(RecordedEvent {
        position: position(row_id),
        event_id: Uuid::parse_str(&event_id).map_err(|error| malformed(error.to_string()))?,
        recorded_at: DateTime::parse_from_rfc3339(&recorded_at)
            .map_err(|error| malformed(error.to_string()))?
            .with_timezone(&Utc),
        stream: StreamId {
            aggregate_type: row.try_get("aggregate_type").map_err(column)?,
            aggregate_id: row.try_get("aggregate_id").map_err(column)?,
        },
        sequence: u64::try_from(sequence).map_err(|_| malformed("negative sequence".into()))?,
        event_type: row.try_get("event_type").map_err(column)?,
        event_version: row.try_get("event_version").map_err(column)?,
        payload: row.try_get("payload").map_err(column)?,
        metadata: serde_json::from_str::<EventMetadata>(&metadata)
            .map_err(|error| malformed(format!("metadata: {error}")))?,
    })
}

/// The committer's side: one dedicated connection, reconnected after a failure.
struct SqliteWriter {
    options: SqliteConnectOptions,
    connection: Option<SqliteConnection>,
}

#[async_trait]
impl BatchWriter for SqliteWriter {
    async fn write(&mut self, appends: &[Append]) -> Result<Vec<AppendOutcome>> {
        if self.connection.is_none() {
            self.connection = Some(crate::sqlite::connection(&self.options).await?);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(Error::CommitFailed("no writer connection".to_owned()));
        };
        match write_batch(connection, appends).await {
            Ok(outcomes) => Ok(outcomes),
            Err(error) => {
                // The session may be mid-transaction: start afresh next time.
                self.connection = None;
                Err(error)
            }
        }
    }
}

async fn write_batch(
    connection: &mut SqliteConnection,
    appends: &[Append],
) -> Result<Vec<AppendOutcome>> {
    let recorded_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut transaction = connection
        .begin_with("BEGIN IMMEDIATE")
        .await
        .context("starting an event log batch")?;
    let mut outcomes = Vec::with_capacity(appends.len());
    for append in appends {
        let current: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(sequence), 0) FROM events \
             WHERE aggregate_type = ? AND aggregate_id = ?",
        )
        .bind(&append.stream.aggregate_type)
        .bind(&append.stream.aggregate_id)
        .fetch_one(&mut *transaction)
        .await
        .context("reading a stream's version")?;
        let expected = i64::try_from(append.expected_version)
            .map_err(|_| Error::Config("expected version out of range".to_owned()))?;
        if current != expected {
            outcomes.push(already_written(&mut transaction, append, expected).await?);
            continue;
        }
        let mut last = 0;
        for (offset, event) in append.events.iter().enumerate() {
            let metadata = serde_json::to_string(&event.metadata)
                .map_err(|error| Error::Config(format!("metadata: {error}")))?;
            last = sqlx::query_scalar(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                     event_version, payload, metadata, event_id, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING position",
            )
            .bind(&append.stream.aggregate_type)
            .bind(&append.stream.aggregate_id)
            .bind(expected + 1 + offset as i64)
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(&event.payload)
            .bind(metadata)
            .bind(event.event_id.to_string())
            .bind(&recorded_at)
            .fetch_one(&mut *transaction)
            .await
            .context("appending an event")?;
        }
        outcomes.push(AppendOutcome::Appended {
            version: append.expected_version + append.events.len() as u64,
            position: position(last),
        });
    }
    transaction
        .commit()
        .await
        .context("committing an event log batch")?;
    Ok(outcomes)
}

/// The outcome of an append whose expected version is not the stream's: a retry if the
/// stream holds exactly its events (by id) at those versions, a conflict otherwise.
async fn already_written(
    connection: &mut SqliteConnection,
    append: &Append,
    expected: i64,
) -> Result<AppendOutcome> {
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "SELECT position, event_id FROM events \
         WHERE aggregate_type = ? AND aggregate_id = ? AND sequence > ? AND sequence <= ? \
         ORDER BY sequence",
    )
    .bind(&append.stream.aggregate_type)
    .bind(&append.stream.aggregate_id)
    .bind(expected)
    .bind(expected + append.events.len() as i64)
    .fetch_all(&mut *connection)
    .await
    .context("reading the ids of stored events")?;
    let same = stored.len() == append.events.len()
        && stored
            .iter()
            .zip(&append.events)
            .all(|((_, id), event)| *id == event.event_id.to_string());
    Ok(match stored.last() {
        Some((row_id, _)) if same => AppendOutcome::Duplicate {
            version: append.expected_version + append.events.len() as u64,
            position: position(*row_id),
        },
        _ => AppendOutcome::Conflict,
    })
}
