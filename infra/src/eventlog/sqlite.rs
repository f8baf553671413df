//! The event log on SQLite, for the embedded mode: the same columns as on PostgreSQL (sqlite-es's
//! `events` table plus what the log needs), in a file of the data directory.
//!
//! **Commit order.** One writer appends at a time (the committer task, in `BEGIN IMMEDIATE`
//! transactions), so the `position` row id is assigned in commit order and no row ever appears
//! later below another: a follower reads `position > checkpoint`, with no gap problem (NOTES). A
//! [`LogPosition`] is `(position, 0)`.
//!
//! **One write connection per file.** The committer takes its connection from a writer pool for
//! each batch. Give that pool one connection and share it with every other writer of the file
//! (`ledger serve` does): writers then wait their turn in the pool's queue, in order, instead of
//! in SQLite's busy handler, which sleeps 1, 2, 5, 10… 100 ms between tries. With a connection
//! each, the file's writers spent 4.4 s of every 5 s of the embedded benchmark asleep there
//! (docs/decisions.md §45).
//!
//! **Appends** are group-committed like PostgreSQL's: every waiting append in one transaction and
//! one fsync. Inside it each append checks its stream's version itself; nobody else writes the
//! file's event table meanwhile, so an append is written whole or found conflicting (or already
//! written, by its ids: a retry).
//!
//! **Loads** of one stream go through sqlite-es's repository.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::persist::PersistedEventRepository;
use sqlite_es::SqliteEventRepository;
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Connection, QueryBuilder, Row as _};
use tokio::sync::watch;
use uuid::Uuid;

use super::committer::{BatchWriter, CommitterSettings, GroupCommitter};
use super::{
    Append, AppendOutcome, Chained, EventLog, EventMetadata, Lag, LogFilter, LogPosition, NewEvent,
    RecordedEvent, Snapshot, StreamEvent, StreamId, Wakeups, streams,
};
use crate::error::{DatabaseContext, Error, Result};
use crate::log::LAG_COUNT_CAP;
use crate::sqlite::{Migration, ROWS_PER_STATEMENT};

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
    /// The file's write connection (shared with its other writers), for the snapshots; the
    /// committer writes the events through it too. `None` when opened read-only.
    writers: Option<SqlitePool>,
    committer: Option<GroupCommitter>,
    wakeups: watch::Sender<u64>,
    repository: SqliteEventRepository,
}

impl SqliteEventLog {
    /// Opens the log in the database of `pool` (its reads), migrating it, with a committer that
    /// writes through `writers` when given (module documentation: give it one connection, shared
    /// with the file's other writers).
    pub async fn open(
        pool: SqlitePool,
        writers: Option<SqlitePool>,
        settings: CommitterSettings,
    ) -> Result<SqliteEventLog> {
        if let Some(writers) = &writers {
            crate::sqlite::migrate(writers, COMPONENT, MIGRATIONS).await?;
        }
        let (wakeups, _) = watch::channel(0_u64);
        let committer = writers
            .clone()
            .map(|writers| {
                GroupCommitter::start_on_own_thread(
                    SqliteWriter { writers },
                    wakeups.clone(),
                    settings,
                )
            })
            .transpose()?;
        Ok(SqliteEventLog {
            repository: SqliteEventRepository::new(pool.clone())
                .with_tables("events", "sqlite_es_snapshots"),
            pool,
            writers,
            committer,
            wakeups,
        })
    }

    /// Opens the log in the file at `path` (created if missing), writable, with a writer
    /// connection of its own.
    pub async fn open_file(path: &Path, read_connections: u32) -> Result<SqliteEventLog> {
        let writers = crate::sqlite::pool(crate::sqlite::writer_options(path, true), 1).await?;
        let pool =
            crate::sqlite::pool(crate::sqlite::options(path, false), read_connections).await?;
        Self::open(pool, Some(writers), CommitterSettings::default()).await
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

    async fn append_chained(&self, appends: Vec<Chained>) -> Result<Vec<AppendOutcome>> {
        let Some(committer) = &self.committer else {
            return Err(Error::Config(
                "this event log was opened read-only".to_owned(),
            ));
        };
        committer.submit_chained(appends).await
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

    async fn read_stream_recorded(
        &self,
        stream: &StreamId,
        after: u64,
    ) -> Result<Vec<RecordedEvent>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
             AND sequence > ?3 ORDER BY sequence"
        ))
        .bind(&stream.aggregate_type)
        .bind(&stream.aggregate_id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .context("reading a stream's events")?;
        rows.iter().map(decode).collect()
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

    /// One process writes the file (`ledger serve` holds it), and its committer wakes after every
    /// commit.
    fn wakes_on_every_commit(&self) -> bool {
        true
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
        // Through the write connection, in turn with the file's other writers: from a reader's
        // connection it raced them for the file's lock, and whoever lost slept in SQLite's busy
        // handler (a snapshot took over a second under the embedded benchmark's load).
        let Some(writers) = &self.writers else {
            return Err(Error::Config(
                "this event log was opened read-only".to_owned(),
            ));
        };
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
        .execute(writers)
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

/// The committer's side: a connection of the writer pool per batch.
struct SqliteWriter {
    writers: SqlitePool,
}

#[async_trait]
impl BatchWriter for SqliteWriter {
    async fn write(&mut self, appends: &[Chained]) -> Result<Vec<AppendOutcome>> {
        let mut connection = self
            .writers
            .acquire()
            .await
            .context("acquiring the event log's writer connection")?;
        let written = write_batch(&mut connection, appends).await;
        if written.is_err() {
            // The session may be mid-transaction: the pool opens a fresh one next time.
            connection.close_on_drop();
        }
        written
    }
}

/// Writes a batch in one transaction with a handful of statements, whatever its size: one read
/// of the streams' versions, one multi-row `INSERT` per [`ROWS_PER_STATEMENT`] events. Every
/// statement is a round trip to the connection's thread, which on a busy machine costs more
/// than the work it carries (an `INSERT` per event made a 50-event batch take ~8 ms).
async fn write_batch(
    connection: &mut SqliteConnection,
    chain: &[Chained],
) -> Result<Vec<AppendOutcome>> {
    let appends: Vec<&Append> = chain.iter().map(|chained| &chained.append).collect();
    let recorded_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut rows: Vec<Row<'_>> = Vec::new();
    for (index, append) in appends.iter().enumerate() {
        let expected = i64::try_from(append.expected_version)
            .map_err(|_| Error::Config("expected version out of range".to_owned()))?;
        for (offset, event) in append.events.iter().enumerate() {
            rows.push(Row {
                append: index,
                sequence: expected + 1 + offset as i64,
                event,
                metadata: serde_json::to_string(&event.metadata)
                    .map_err(|error| Error::Config(format!("metadata: {error}")))?,
            });
        }
    }
    let mut transaction = connection
        .begin_with("BEGIN IMMEDIATE")
        .await
        .context("starting an event log batch")?;
    let versions = stream_versions(&mut transaction, &appends).await?;
    // `None`: to be inserted now. In order, so a prerequisite is settled before its dependents.
    let mut outcomes: Vec<Option<AppendOutcome>> = vec![None; appends.len()];
    let mut written = vec![false; appends.len()];
    for (index, append) in appends.iter().enumerate() {
        let expected = i64::try_from(append.expected_version).unwrap_or(i64::MAX);
        if versions[index] != expected {
            outcomes[index] = Some(already_written(&mut transaction, append, expected).await?);
        } else if !super::prerequisites_written(&chain[index].after, &written) {
            outcomes[index] = Some(AppendOutcome::Conflict);
        }
        written[index] = outcomes[index].is_none_or(|outcome| outcome.written().is_some());
    }
    rows.retain(|row| outcomes[row.append].is_none());
    let mut positions: HashMap<(String, String, i64), i64> = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, event_id, recorded_at) ",
        );
        insert.push_values(chunk, |mut values, row| {
            let stream = &appends[row.append].stream;
            values
                .push_bind(&stream.aggregate_type)
                .push_bind(&stream.aggregate_id)
                .push_bind(row.sequence)
                .push_bind(&row.event.event_type)
                .push_bind(&row.event.event_version)
                .push_bind(&row.event.payload)
                .push_bind(&row.metadata)
                .push_bind(row.event.event_id.to_string())
                .push_bind(&recorded_at);
        });
        insert.push(" RETURNING aggregate_type, aggregate_id, sequence, position");
        let written: Vec<(String, String, i64, i64)> = insert
            .build_query_as()
            .fetch_all(&mut *transaction)
            .await
            .context("appending events")?;
        positions.extend(
            written
                .into_iter()
                .map(|(kind, id, sequence, position)| ((kind, id, sequence), position)),
        );
    }
    transaction
        .commit()
        .await
        .context("committing an event log batch")?;
    appends
        .iter()
        .zip(outcomes)
        .map(|(append, outcome)| {
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            let version = append.expected_version + append.events.len() as u64;
            let key = (
                append.stream.aggregate_type.clone(),
                append.stream.aggregate_id.clone(),
                i64::try_from(version).unwrap_or(i64::MAX),
            );
            let last = positions.get(&key).copied().ok_or_else(|| {
                Error::CommitFailed(format!(
                    "the batch committed, but returned no position for {} at {version}",
                    append.stream
                ))
            })?;
            Ok(AppendOutcome::Appended {
                version,
                position: position(last),
            })
        })
        .collect()
}

/// One event of a batch, with where it goes.
struct Row<'a> {
    /// Its append's index in the batch.
    append: usize,
    sequence: i64,
    event: &'a NewEvent,
    metadata: String,
}

/// Each append's stream version now (0 for a new stream), in the order of `appends`.
async fn stream_versions(
    connection: &mut SqliteConnection,
    appends: &[&Append],
) -> Result<Vec<i64>> {
    let mut versions: HashMap<(String, String), i64> = HashMap::with_capacity(appends.len());
    for chunk in appends.chunks(ROWS_PER_STATEMENT) {
        // A correlated lookup per listed stream: `(type, id) IN (VALUES …)` scans the whole
        // index instead.
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT streams.column1, streams.column2, \
                 (SELECT coalesce(max(sequence), 0) FROM events \
                  WHERE aggregate_type = streams.column1 AND aggregate_id = streams.column2) \
             FROM (",
        );
        query.push_values(chunk, |mut values, append| {
            values
                .push_bind(&append.stream.aggregate_type)
                .push_bind(&append.stream.aggregate_id);
        });
        query.push(") AS streams");
        let found: Vec<(String, String, i64)> = query
            .build_query_as()
            .fetch_all(&mut *connection)
            .await
            .context("reading the streams' versions")?;
        versions.extend(
            found
                .into_iter()
                .map(|(kind, id, version)| ((kind, id), version)),
        );
    }
    Ok(appends
        .iter()
        .map(|append| {
            versions
                .get(&(
                    append.stream.aggregate_type.clone(),
                    append.stream.aggregate_id.clone(),
                ))
                .copied()
                .unwrap_or(0)
        })
        .collect())
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
