//! The event log on PostgreSQL: postgres-es's `events` table, extended with the columns the log
//! needs (`event_id`, `recorded_at`, `tx_id`, `position`), written by group commit.
//!
//! **Commit order.** A `position` is assigned at insert time, but transactions commit in another
//! order, so "everything after the last position I saw" would skip rows that commit late (NOTES,
//! "Reading the log in commit order"). Here every append goes through a committer, and every
//! committer's batch takes one advisory lock (`pg_advisory_xact_lock`, keyed by the table) before
//! it inserts, holding it until it commits: batches that insert events commit one at a time,
//! across every instance. A transaction id is assigned at a transaction's first write, which here
//! is its insert, after the lock; so the inserting transaction's id (`tx_id`,
//! `pg_current_xact_id()`) and then the insert `position` order the log exactly as it committed,
//! and a follower reading `(tx_id, position) > checkpoint` never misses a row that commits later
//! below its checkpoint. [`LogPosition`] is `(tx_id, position)`.
//!
//! Earlier versions read only below the oldest running transaction of the whole cluster
//! (`pg_snapshot_xmin`), which made every follower wait for the longest transaction anywhere, a
//! projection batch or another database's job. The lock makes that bound unnecessary; the price
//! is that only the committer may insert into the table (it is append-only, and a trigger refuses
//! updates and deletes), and that batches of several instances do not overlap: one batch is a
//! millisecond or two, so that costs little next to the fsync each already waits for.
//!
//! **Appends.** One committer task per process takes every waiting append and writes them with
//! one `INSERT … SELECT FROM UNNEST` in one transaction (see [`super::committer`]), in one round
//! trip: a temporary function of the committer's session takes the lock, inserts and notifies,
//! and the call commits on its own (decision 69). A batch in which an append another one names
//! as a prerequisite was left unwritten is rolled back by the function and written again the
//! long way (`BEGIN` and the lock, the insert, `COMMIT`), which looks at the outcomes before it
//! commits. A row is
//! inserted only if its stream holds exactly the expected version (a correlated `max(sequence)`,
//! one index probe per row: an `EXISTS` under an `OR` let the planner hash the whole table
//! instead, once per batch), and an append whose rows were all left out is a retry if the stored
//! events carry its ids, a conflict otherwise. Under the log lock, with no stream twice in a
//! batch, that check sees every earlier batch, so the insert never meets an existing row and
//! needs no `ON CONFLICT`, whose speculative insertion cost an extra index probe and an extra
//! WAL record per event (decision 52). Only a writer bypassing the lock could still make it
//! meet one: the unique violation rolls the batch back and writes it again, where the race shows
//! as a conflict. The batch's
//! transaction sends one `NOTIFY`, which wakes followers in other processes; followers in this
//! process are woken by the committer itself.
//!
//! **Loads.** One stream is loaded through postgres-es's repository, as SPEC §2 asks; snapshots
//! live beside the events in `aggregate_snapshots`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::PersistedEventRepository;
use postgres_es::PostgresEventRepository;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgRow};
use sqlx::query::QueryAs;
use sqlx::{Connection, PgConnection, Postgres, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::committer::{BatchWriter, CommitterSettings, GroupCommitter};
use super::streams;
use super::{
    Append, AppendOutcome, Chained, EventLog, EventMetadata, Lag, LogFilter, LogPosition,
    RecordedEvent, Snapshot, StreamEvent, StreamId, Wakeups,
};
use crate::db::replanning;
use crate::error::{DatabaseContext, Error, Result};
use crate::log::LAG_COUNT_CAP;

/// How many times a batch is written again after another instance raced one of its streams
/// between the version check and the insert. The second attempt sees the other's rows, so one
/// retry normally suffices; three survive a burst of such races.
const PARTIAL_BATCH_ATTEMPTS: usize = 3;

/// The committer session's temporary append function ([`Sql::create_append`]).
const APPEND_FUNCTION: &str = "event_log_append";

/// The SQLSTATE the append function raises when an append another one names as a prerequisite
/// was left unwritten.
const UNWRITTEN_PREREQUISITE: &str = "LG001";

/// PostgreSQL's `insufficient_privilege`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// How long the NOTIFY listener waits before reconnecting after losing its connection.
const LISTENER_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How the log is opened.
#[derive(Debug, Clone)]
pub struct PgEventLogOptions {
    /// The events table, schema-qualified (`command_api.events`).
    pub events_table: String,
    /// The snapshots table, schema-qualified; `None` for a log that only reads events.
    pub snapshots_table: Option<String>,
    /// Where the committer connects (a dedicated session); `None` for a read-only log.
    pub writer: Option<PgConnectOptions>,
    pub committer: CommitterSettings,
    /// Listen for the commits of other processes (followers in another service).
    pub listen: bool,
}

impl PgEventLogOptions {
    /// A log the write side appends to and follows.
    pub fn writer(schema: &str, writer: PgConnectOptions) -> Self {
        PgEventLogOptions {
            events_table: format!("{schema}.events"),
            snapshots_table: Some(format!("{schema}.aggregate_snapshots")),
            writer: Some(writer),
            committer: CommitterSettings::default(),
            listen: false,
        }
    }

    /// A log another service reads and follows (`events_table` schema-qualified).
    pub fn reader(events_table: &str) -> Self {
        PgEventLogOptions {
            events_table: events_table.to_owned(),
            snapshots_table: None,
            writer: None,
            committer: CommitterSettings::default(),
            listen: true,
        }
    }
}

pub struct PgEventLog {
    pool: PgPool,
    sql: Sql,
    committer: Option<GroupCommitter>,
    wakeups: watch::Sender<u64>,
    repository: PostgresEventRepository,
    listener: Option<JoinHandle<()>>,
    /// Whether this log listens for every process's commits (its own or the one it reads
    /// through, [`PgEventLog::reading_from`]).
    listening: bool,
}

impl Drop for PgEventLog {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl PgEventLog {
    /// Opens the log over `pool` (its reads), starting the committer and the listener the
    /// options ask for. The tables must exist (command-api's migrations create them).
    pub async fn open(pool: PgPool, options: PgEventLogOptions) -> Result<PgEventLog> {
        let sql = Sql::new(&options.events_table, options.snapshots_table.as_deref())?;
        let (wakeups, _) = watch::channel(0_u64);
        let committer = match &options.writer {
            Some(connect) => {
                let writer = PgWriter {
                    options: connect.clone(),
                    connection: None,
                    sql: sql.clone(),
                    one_trip: false,
                };
                Some(GroupCommitter::start(
                    writer,
                    wakeups.clone(),
                    options.committer,
                ))
            }
            None => None,
        };
        let listener = if options.listen {
            let mut listener = PgListener::connect_with(&pool)
                .await
                .context("connecting the commit listener")?;
            listener
                .listen(&sql.channel)
                .await
                .context("listening for commits")?;
            Some(tokio::spawn(listen(
                listener,
                pool.clone(),
                sql.channel.clone(),
                wakeups.clone(),
            )))
        } else {
            None
        };
        let repository = PostgresEventRepository::new(pool.clone())
            .with_tables(&sql.events_table, &sql.snapshots_table);
        Ok(PgEventLog {
            pool,
            sql,
            committer,
            wakeups,
            repository,
            listening: listener.is_some(),
            listener,
        })
    }

    /// The pool the log reads with.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same log (its committer and wake-ups) reading through another pool: requests and
    /// background work read through pools of their own, so neither waits for the other's
    /// connections.
    pub fn reading_from(&self, pool: PgPool) -> PgEventLog {
        PgEventLog {
            repository: PostgresEventRepository::new(pool.clone())
                .with_tables(&self.sql.events_table, &self.sql.snapshots_table),
            pool,
            sql: self.sql.clone(),
            committer: self.committer.clone(),
            wakeups: self.wakeups.clone(),
            listener: None,
            listening: self.listening,
        }
    }
}

/// Bumps `wakeups` on every notification; reconnects after losing the connection (and bumps
/// then too, since a notification may have been missed meanwhile).
async fn listen(
    mut listener: PgListener,
    pool: PgPool,
    channel: String,
    wakeups: watch::Sender<u64>,
) {
    loop {
        match listener.recv().await {
            Ok(_) => wakeups.send_modify(|count| *count = count.wrapping_add(1)),
            Err(error) => {
                tracing::warn!(error.message = %error, "commit listener lost; reconnecting");
                loop {
                    tokio::time::sleep(LISTENER_RECONNECT_DELAY).await;
                    let reconnected = async {
                        let mut fresh = PgListener::connect_with(&pool).await?;
                        fresh.listen(&channel).await?;
                        Ok::<_, sqlx::Error>(fresh)
                    };
                    if let Ok(fresh) = reconnected.await {
                        listener = fresh;
                        wakeups.send_modify(|count| *count = count.wrapping_add(1));
                        break;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl EventLog for PgEventLog {
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
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        // Through `replanning`: these reads return the stream keys, whose type migration 0003
        // changed (decision 74).
        let rows = replanning(&self.pool, "the event log", |mut connection| async move {
            let rows = sqlx::query(&self.sql.read_stream_recorded)
                .bind(&stream.aggregate_type)
                .bind(&stream.aggregate_id)
                .bind(after)
                .fetch_all(&mut *connection)
                .await
                .context("reading a stream's events");
            (connection, rows)
        })
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: LogFilter,
    ) -> Result<Vec<RecordedEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = replanning(&self.pool, "the event log", |mut connection| async move {
            let query = match (filter.aggregate_type, filter.event_type) {
                (None, None) => sqlx::query(&self.sql.read_all),
                (Some(kind), None) => sqlx::query(&self.sql.read_all_of_type).bind(kind),
                (Some(kind), Some(event)) => sqlx::query(&self.sql.read_all_of_event)
                    .bind(kind)
                    .bind(event),
                (None, Some(event)) => sqlx::query(&self.sql.read_all_of_event_any).bind(event),
            };
            let rows = query
                .bind(after.commit.to_string())
                .bind(after.index)
                .bind(limit)
                .fetch_all(&mut *connection)
                .await
                .context("reading the event log");
            (connection, rows)
        })
        .await?;
        rows.iter().map(decode).collect()
    }

    async fn head(&self) -> Result<LogPosition> {
        let row: Option<(i64, i64)> = sqlx::query_as(&self.sql.head)
            .fetch_optional(&self.pool)
            .await
            .context("reading the head of the event log")?;
        Ok(
            row.map_or(LogPosition::START, |(commit, index)| LogPosition {
                commit,
                index,
            }),
        )
    }

    async fn lag(&self, checkpoint: LogPosition, filter: LogFilter) -> Result<Lag> {
        // Every follower reports its lag every 2 s, so it must cost what is unread, not what the
        // log holds. The planner cannot be trusted with that here: it has no useful
        // estimate of a row comparison on `xid8` (statistics or not), and picked a sequential
        // scan of the whole log for the count (a parallel one with custom plans, a plain one
        // with the generic plan a pooled statement settles on), or a bitmap of every event of
        // the filtered type: 11–146 ms a report at 500k events under load, growing with the log.
        // With those scans off for this transaction, the commit-order index walk is its plan.
        let mut transaction = self.pool.begin().await.context("starting the lag report")?;
        sqlx::query(
            "SELECT set_config('enable_seqscan', 'off', true), \
                    set_config('enable_bitmapscan', 'off', true)",
        )
        .execute(&mut *transaction)
        .await
        .context("planning the lag report")?;
        let age: Option<f64> = sqlx::query_scalar(&self.sql.oldest_unread)
            .bind(checkpoint.commit.to_string())
            .bind(checkpoint.index)
            .bind(filter.aggregate_type)
            .bind(filter.event_type)
            .fetch_optional(&mut *transaction)
            .await
            .context("reading the oldest unread event")?;
        let Some(age) = age else {
            transaction
                .commit()
                .await
                .context("ending the lag report")?;
            return Ok(Lag::NONE);
        };
        let events: i64 = sqlx::query_scalar(&self.sql.count_unread)
            .bind(checkpoint.commit.to_string())
            .bind(checkpoint.index)
            .bind(filter.aggregate_type)
            .bind(filter.event_type)
            .bind(LAG_COUNT_CAP)
            .fetch_one(&mut *transaction)
            .await
            .context("counting unread events")?;
        transaction
            .commit()
            .await
            .context("ending the lag report")?;
        Ok(Lag {
            // At least the one found above, which may have committed in between.
            events: events.max(1),
            oldest_unread: Duration::try_from_secs_f64(age).unwrap_or_default(),
        })
    }

    fn subscribe(&self) -> Wakeups {
        self.wakeups.subscribe()
    }

    /// Only when it listens: a writer that does not hears its own commits alone.
    fn wakes_on_every_commit(&self) -> bool {
        self.listening
    }

    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let Some(select) = &self.sql.read_snapshot else {
            return Ok(None);
        };
        let row: Option<(i64, i32, String)> = sqlx::query_as(select)
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
        let Some(upsert) = &self.sql.write_snapshot else {
            return Ok(());
        };
        sqlx::query(upsert)
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

    /// Whether the events table answers (not only the database: a missing table or grant is
    /// a log that cannot be read).
    async fn ping(&self) -> bool {
        crate::db::answers(&self.pool, &self.sql.ping, Duration::from_secs(2)).await
    }
}

/// The statements, built once per table.
#[derive(Debug, Clone)]
struct Sql {
    events_table: String,
    /// Starts a batch's transaction and takes the advisory lock every batch of appends holds
    /// until it commits (`event-log/<table>`), in one round trip.
    begin_locked: String,
    /// For postgres-es's repository, which wants one even when snapshots are off.
    snapshots_table: String,
    channel: String,
    insert: String,
    /// Creates the committer session's own append function ([`Sql::append`]).
    create_append: String,
    /// A batch in one round trip: lock, insert and notify in a function, committed at once.
    append: String,
    read_stream_recorded: String,
    ping: String,
    stored_ids: String,
    read_all: String,
    read_all_of_type: String,
    read_all_of_event: String,
    read_all_of_event_any: String,
    head: String,
    oldest_unread: String,
    count_unread: String,
    read_snapshot: Option<String>,
    write_snapshot: Option<String>,
}

/// The columns every log read returns, in the order [`decode`] expects. Reads select
/// `FROM <table> e` and order by `e.tx_id`: an unqualified `ORDER BY tx_id` would name the
/// output column (the `bigint` cast below), which no index provides, and PostgreSQL would then
/// sort every row after the checkpoint for each batch.
const COLUMNS: &str = "e.tx_id::text::bigint AS tx_id, e.position, e.event_id, e.recorded_at, \
     e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, \
     e.payload::text AS payload, e.metadata::text AS metadata";

impl Sql {
    fn new(events_table: &str, snapshots_table: Option<&str>) -> Result<Sql> {
        for table in std::iter::once(events_table).chain(snapshots_table) {
            validate_table(table)?;
        }
        let table = events_table;
        // $1, $2: the checkpoint; $3: the limit; filters come before them.
        let after = |first: usize| {
            format!(
                "(e.tx_id, e.position) > (${first}::text::xid8, ${})",
                first + 1
            )
        };
        let order = "ORDER BY e.tx_id, e.position";
        // A filter is wrapped in CASE so that the planner walks the commit-order index from the
        // checkpoint and stops at the limit, whatever the statistics say. A bare
        // `e.aggregate_type = $1` on a table not yet analysed (autovacuum off, or a young table)
        // is estimated to match 0.5 % of rows, fewer than the limit, so the planner preferred a
        // bitmap of every event of that type (the primary key's leading column) ANDed with
        // everything after the checkpoint, then a sort: a read that grew with the log (40 ms at
        // 130k events, and it was the saga's every batch). A CASE is estimated at one half
        // without statistics and from them with, and no index serves it.
        let read = |filter: Option<&str>, first: usize| {
            let filter = filter
                .map(|condition| format!("(CASE WHEN {condition} THEN true ELSE false END) AND "))
                .unwrap_or_default();
            format!(
                "SELECT {COLUMNS} FROM {table} e WHERE {filter}{} {order} LIMIT ${}",
                after(first),
                first + 2
            )
        };
        let lag_filter = "(CASE WHEN ($3::text IS NULL OR e.aggregate_type = $3) \
             AND ($4::text IS NULL OR e.event_type = $4) THEN true ELSE false END)";
        let lock_key = crate::db::advisory_key(&format!("event-log/{table}"));
        Ok(Sql {
            events_table: table.to_owned(),
            // One simple query, two statements: the lock's key is a number of ours.
            begin_locked: format!("BEGIN; SELECT pg_advisory_xact_lock({lock_key})"),
            snapshots_table: snapshots_table.unwrap_or("aggregate_snapshots").to_owned(),
            channel: table.replace('.', "_"),
            // The batch's NOTIFY rides with its insert (decision 63): `notified` is evaluated
            // once, and only when a row was inserted; PostgreSQL sends it at the commit, or
            // never if the batch rolls back.
            insert: format!(
                "WITH inserted AS (
                     INSERT INTO {table} (aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, payload, metadata, event_id)
                     SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.event_type,
                         i.event_version, i.payload::json, i.metadata::json, i.event_id
                     FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::uuid[], $10::int[])
                         AS i(aggregate_type, aggregate_id, expected, sequence, event_type,
                              event_version, payload, metadata, event_id, ordinal)
                     WHERE coalesce((SELECT max(e.sequence) FROM {table} e
                             WHERE e.aggregate_type = i.aggregate_type
                               AND e.aggregate_id = i.aggregate_id), 0) = i.expected
                     ORDER BY i.ordinal
                     RETURNING aggregate_type, aggregate_id, sequence,
                         tx_id::text::bigint AS tx_id, position
                 ),
                 notified AS MATERIALIZED (
                     SELECT pg_notify($11, '') FROM (SELECT 1 FROM inserted LIMIT 1) any_row
                 )
                 SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.tx_id, i.position
                 FROM inserted i LEFT JOIN notified ON true"
            ),
            // One primary-key probe per key, `LATERAL … OFFSET 0` as the projector's loads
            // (decision 47): as a plain join, the generic plan the committer's connection
            // cached while the log was small was a hash join over a sequential scan of the
            // log, and this ran under the append lock whenever an append in a batch was not
            // written: 41 ms a batch at 300k events, every append waiting (decision 59). The
            // long way still runs it under the lock; the one trip right after its commit.
            stored_ids: format!(
                "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_id,
                     e.tx_id::text::bigint, e.position
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(aggregate_type, aggregate_id, sequence)
                 CROSS JOIN LATERAL (
                     SELECT * FROM {table} e WHERE e.aggregate_type = k.aggregate_type
                         AND e.aggregate_id = k.aggregate_id AND e.sequence = k.sequence
                     OFFSET 0
                 ) e"
            ),
            // The whole batch in one round trip (decision 69): a VOLATILE function takes each
            // statement's snapshot when that statement starts, so its checks and its insert see
            // every batch committed before the lock was granted, and its transaction id is
            // assigned at the insert, after the lock, as in `begin_locked` and `insert`. Called
            // outside a transaction, the call commits on its own (durably: the session asserts
            // `synchronous_commit`) before the answer arrives. `$11` marks the rows of appends
            // another append of the batch names as a prerequisite (a chain, decision 55): if
            // one of them is not stored with its ids after the insert (neither written nor a
            // retry of events already stored), the function raises `LG001`, which rolls the
            // call back, and the committer writes the batch the long way, where the outcomes
            // are looked at before the commit. A temporary function: each committer
            // session creates its own, so no migration is needed and instances never race to
            // replace it.
            create_append: format!(
                "CREATE FUNCTION pg_temp.{APPEND_FUNCTION}(text[], text[], bigint[], bigint[], \
                     text[], text[], text[], text[], uuid[], int[], boolean[])
                 RETURNS TABLE (stream_type text, stream_id text, stream_sequence bigint,
                     commit_id bigint, log_position bigint)
                 LANGUAGE plpgsql VOLATILE AS $body$
                 DECLARE
                     written bigint;
                 BEGIN
                     PERFORM pg_advisory_xact_lock({lock_key});
                     RETURN QUERY WITH inserted AS (
                         INSERT INTO {table} (aggregate_type, aggregate_id, sequence, \
                             event_type, event_version, payload, metadata, event_id)
                         SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.event_type,
                             i.event_version, i.payload::json, i.metadata::json, i.event_id
                         FROM UNNEST($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                             AS i(aggregate_type, aggregate_id, expected, sequence, event_type,
                                  event_version, payload, metadata, event_id, ordinal)
                         WHERE coalesce((SELECT max(e.sequence) FROM {table} e
                                 WHERE e.aggregate_type = i.aggregate_type
                                   AND e.aggregate_id = i.aggregate_id), 0) = i.expected
                         ORDER BY i.ordinal
                         RETURNING aggregate_type, aggregate_id, sequence,
                             tx_id::text::bigint, position
                     )
                     SELECT * FROM inserted;
                     GET DIAGNOSTICS written = ROW_COUNT;
                     -- Every prerequisite's events must now be stored with its ids: inserted
                     -- here, or by an earlier batch (a retry, which counts as written). A
                     -- scalar subquery, one primary-key probe per row: an EXISTS may be
                     -- planned as a hashed subplan, a scan of the whole log per call.
                     IF EXISTS (
                         SELECT 1 FROM UNNEST($1, $2, $4, $9, $11)
                             AS r(aggregate_type, aggregate_id, sequence, event_id, required)
                         WHERE CASE WHEN r.required THEN (
                                 SELECT e.event_id FROM {table} e
                                 WHERE e.aggregate_type = r.aggregate_type
                                   AND e.aggregate_id = r.aggregate_id
                                   AND e.sequence = r.sequence) IS DISTINCT FROM r.event_id
                             ELSE false END
                     ) THEN
                         RAISE EXCEPTION 'a prerequisite in the batch was left unwritten'
                             USING ERRCODE = '{UNWRITTEN_PREREQUISITE}';
                     END IF;
                     IF written > 0 THEN
                         PERFORM pg_notify('{channel}', '');
                     END IF;
                 END
                 $body$",
                lock_key = lock_key,
                channel = table.replace('.', "_"),
            ),
            append: format!(
                "SELECT stream_type, stream_id, stream_sequence, commit_id, log_position \
                 FROM pg_temp.{APPEND_FUNCTION}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            read_stream_recorded: format!(
                "SELECT {COLUMNS} FROM {table} e WHERE e.aggregate_type = $1 \
                 AND e.aggregate_id = $2 AND e.sequence > $3 ORDER BY e.sequence"
            ),
            ping: format!("SELECT 1 FROM {table} LIMIT 1"),
            read_all: read(None, 1),
            read_all_of_type: read(Some("e.aggregate_type = $1"), 2),
            read_all_of_event: read(Some("e.aggregate_type = $1 AND e.event_type = $2"), 3),
            read_all_of_event_any: read(Some("e.event_type = $1"), 2),
            // The last committed event: no position a client holds is beyond it.
            head: format!(
                "SELECT e.tx_id::text::bigint, e.position FROM {table} e \
                 ORDER BY e.tx_id DESC, e.position DESC LIMIT 1"
            ),
            // The lag's two queries walk the commit-order index from the checkpoint, like the
            // reads: the filters are wrapped in CASE (no index serves them), and `lag` runs them
            // with sequential and bitmap scans off (see there).
            oldest_unread: format!(
                "SELECT extract(epoch FROM clock_timestamp() - e.recorded_at)::float8 \
                 FROM {table} e WHERE (e.tx_id, e.position) > ($1::text::xid8, $2) \
                 AND {lag_filter} {order} LIMIT 1"
            ),
            count_unread: format!(
                "SELECT count(*) FROM (SELECT 1 FROM {table} e \
                 WHERE (e.tx_id, e.position) > ($1::text::xid8, $2) \
                 AND {lag_filter} {order} LIMIT $5) AS waiting"
            ),
            read_snapshot: snapshots_table.map(|snapshots| {
                format!(
                    "SELECT sequence, state_version, state::text FROM {snapshots} \
                     WHERE aggregate_type = $1 AND aggregate_id = $2"
                )
            }),
            // Only ever move a snapshot forward: a slower writer must not replace a newer one.
            write_snapshot: snapshots_table.map(|snapshots| {
                format!(
                    "INSERT INTO {snapshots} (aggregate_type, aggregate_id, sequence, \
                         state_version, state) \
                     VALUES ($1, $2, $3, $4, $5::jsonb) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                     SET sequence = EXCLUDED.sequence, state_version = EXCLUDED.state_version, \
                         state = EXCLUDED.state, taken_at = now() \
                     WHERE {snapshots}.sequence < EXCLUDED.sequence \
                        OR {snapshots}.state_version <> EXCLUDED.state_version"
                )
            }),
        })
    }
}

/// A schema-qualified table name, spliced into SQL: plain identifiers only.
fn validate_table(table: &str) -> Result<()> {
    let mut parts = table.split('.');
    let valid =
        parts.clone().count() <= 2 && parts.all(|part| crate::db::validate_schema(part).is_ok());
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "table name {table:?} must be [schema.]name of lower-case identifiers"
        )))
    }
}

fn decode(row: &PgRow) -> Result<RecordedEvent> {
    let index: i64 = row.try_get("position").context("decoding a log row")?;
    let malformed = |problem: String| Error::MalformedLogRow {
        position: index,
        problem,
    };
    let column = |error: sqlx::Error| malformed(error.to_string());
    let metadata: String = row.try_get("metadata").map_err(column)?;
    let sequence: i64 = row.try_get("sequence").map_err(column)?;
    Ok(RecordedEvent {
        position: LogPosition {
            commit: row.try_get("tx_id").map_err(column)?,
            index,
        },
        event_id: row.try_get("event_id").map_err(column)?,
        recorded_at: row
            .try_get::<DateTime<Utc>, _>("recorded_at")
            .map_err(column)?,
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

/// The committer's side: one dedicated session, reconnected after a failure.
struct PgWriter {
    options: PgConnectOptions,
    connection: Option<PgConnection>,
    sql: Sql,
    /// Whether this session has its append function (decision 69).
    one_trip: bool,
}

#[async_trait]
impl BatchWriter for PgWriter {
    async fn write(&mut self, chain: &[Chained]) -> Result<Vec<AppendOutcome>> {
        // Appends left out because a prerequisite of theirs did not come out written. One
        // statement writes the whole batch, so a dependent can only be told from the outcomes;
        // a rare write-again keeps the common path at one statement.
        let mut held_back = vec![false; chain.len()];
        let mut races = 0;
        // The first attempt goes in one round trip where the session could create its function;
        // one the function refuses goes the long way.
        let mut one_trip = true;
        while races < PARTIAL_BATCH_ATTEMPTS {
            if self.connection.is_none() {
                let mut connection = PgConnection::connect_with(&self.options)
                    .await
                    .context("connecting the event log's committer")?;
                crate::db::assert_durable(&mut connection).await?;
                // The version checks must see every batch committed before the lock was
                // granted, whatever the role's or database's default isolation.
                sqlx::Executor::execute(
                    &mut connection,
                    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED",
                )
                .await
                .context("setting up the event log's committer")?;
                self.one_trip =
                    match sqlx::Executor::execute(&mut connection, self.sql.create_append.as_str())
                        .await
                    {
                        Ok(_) => true,
                        Err(sqlx::Error::Database(error))
                            if error.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
                        {
                            tracing::warn!(
                                "the committer may not create temporary objects (the TEMPORARY \
                                 privilege on the database); every batch takes the long way, \
                                 three round trips"
                            );
                            false
                        }
                        Err(source) => {
                            return Err(Error::Database {
                                context: "creating the event log's append function",
                                source,
                            });
                        }
                    };
                self.connection = Some(connection);
            }
            let Some(connection) = self.connection.as_mut() else {
                continue;
            };
            let attempt = if one_trip && self.one_trip {
                write_in_one_trip(connection, &self.sql, chain).await
            } else {
                write_once(connection, &self.sql, chain, &held_back).await
            };
            match attempt {
                Ok(Attempt::Committed(outcomes)) => return Ok(outcomes),
                Ok(Attempt::TheLongWay) => {
                    metrics::counter!("event_log_batches_written_again_total").increment(1);
                    one_trip = false;
                }
                Ok(Attempt::Raced) => {
                    metrics::counter!("event_log_batch_races_total").increment(1);
                    races += 1;
                }
                Ok(Attempt::HoldBack(more)) => {
                    metrics::counter!("event_log_chain_holdbacks_total").increment(1);
                    for index in more {
                        held_back[index] = true;
                    }
                }
                Err(error) => {
                    // The session may be broken or mid-transaction: start afresh next time.
                    self.connection = None;
                    return Err(error);
                }
            }
        }
        Err(Error::CommitFailed(format!(
            "another writer kept racing this batch's streams after {PARTIAL_BATCH_ATTEMPTS} attempts"
        )))
    }
}

/// A batch as column arrays for the `UNNEST` of [`Sql::insert`].
#[derive(Default)]
struct Rows {
    aggregate_type: Vec<String>,
    aggregate_id: Vec<String>,
    expected: Vec<i64>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    event_version: Vec<String>,
    payload: Vec<String>,
    metadata: Vec<String>,
    event_id: Vec<Uuid>,
    ordinal: Vec<i32>,
}

/// A query of the insert or of the append function, bound to nothing yet.
type InsertQuery<'q> = QueryAs<'q, Postgres, InsertedRow, PgArguments>;

impl Rows {
    /// Binds the batch's ten columns, `$1` to `$10` of both [`Sql::insert`] and [`Sql::append`].
    fn bind<'q>(&'q self, query: InsertQuery<'q>) -> InsertQuery<'q> {
        query
            .bind(&self.aggregate_type)
            .bind(&self.aggregate_id)
            .bind(&self.expected)
            .bind(&self.sequence)
            .bind(&self.event_type)
            .bind(&self.event_version)
            .bind(&self.payload)
            .bind(&self.metadata)
            .bind(&self.event_id)
            .bind(&self.ordinal)
    }

    fn of(appends: &[&Append]) -> Result<Rows> {
        let mut rows = Rows::default();
        let mut ordinal = 0_i32;
        for append in appends {
            if append.events.is_empty() {
                return Err(Error::Config(format!(
                    "an append to {} has no events",
                    append.stream
                )));
            }
            let expected = i64::try_from(append.expected_version)
                .map_err(|_| Error::Config("expected version out of range".to_owned()))?;
            for (offset, event) in append.events.iter().enumerate() {
                rows.aggregate_type
                    .push(append.stream.aggregate_type.clone());
                rows.aggregate_id.push(append.stream.aggregate_id.clone());
                rows.expected.push(expected);
                rows.sequence.push(expected + 1 + offset as i64);
                rows.event_type.push(event.event_type.clone());
                rows.event_version.push(event.event_version.clone());
                rows.payload.push(event.payload.clone());
                rows.metadata.push(
                    serde_json::to_string(&event.metadata)
                        .map_err(|error| Error::Config(format!("metadata: {error}")))?,
                );
                rows.event_id.push(event.event_id);
                rows.ordinal.push(ordinal);
                ordinal += 1;
            }
        }
        Ok(rows)
    }
}

type Key = (String, String, i64);

/// What the insert returns per row: the stream, its sequence and the row's log position.
type InsertedRow = (String, String, i64, i64, i64);

/// The log position of each row an insert returned, by its stream and sequence.
fn positions(inserted: Vec<InsertedRow>) -> HashMap<Key, LogPosition> {
    inserted
        .into_iter()
        .map(|(kind, id, sequence, commit, index)| {
            ((kind, id, sequence), LogPosition { commit, index })
        })
        .collect()
}

/// What one attempt at a batch came to.
enum Attempt {
    /// Committed, with every append's outcome.
    Committed(Vec<AppendOutcome>),
    /// Rolled back: an append was half inserted (the long way), or hit a row a writer bypassing
    /// the log lock wrote. Try again.
    Raced,
    /// Rolled back: these appends were inserted although a prerequisite of theirs did not come
    /// out written. Try again without them.
    HoldBack(Vec<usize>),
    /// Rolled back by the append function: a prerequisite was left unwritten. Write it again
    /// with [`write_once`], which looks at the outcomes before it commits and holds back what
    /// depends on an unwritten append.
    TheLongWay,
}

/// One attempt at `chain` in one round trip ([`Sql::append`]), committed when it returns.
async fn write_in_one_trip(
    connection: &mut PgConnection,
    sql: &Sql,
    chain: &[Chained],
) -> Result<Attempt> {
    let appends: Vec<&Append> = chain.iter().map(|chained| &chained.append).collect();
    let rows = Rows::of(&appends)?;
    // Each row of an append another append names as a prerequisite.
    let mut prerequisite = vec![false; chain.len()];
    for chained in chain {
        for &before in &chained.after {
            if let Some(flag) = prerequisite.get_mut(before) {
                *flag = true;
            }
        }
    }
    let required: Vec<bool> = appends
        .iter()
        .zip(&prerequisite)
        .flat_map(|(append, &flag)| std::iter::repeat_n(flag, append.events.len()))
        .collect();
    let stage = std::time::Instant::now();
    let inserted: std::result::Result<Vec<InsertedRow>, sqlx::Error> = rows
        .bind(sqlx::query_as(&sql.append))
        .bind(&required)
        .fetch_all(&mut *connection)
        .await;
    record_stage("one_trip", stage);
    let inserted = match inserted {
        Ok(inserted) => inserted,
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            // As in `write_once`: a writer bypassing the lock; the call rolled back.
            return Ok(Attempt::Raced);
        }
        Err(sqlx::Error::Database(error))
            if error.code().as_deref() == Some(UNWRITTEN_PREREQUISITE) =>
        {
            return Ok(Attempt::TheLongWay);
        }
        Err(source) => {
            return Err(Error::Database {
                context: "appending a batch of events",
                source,
            });
        }
    };
    // Committed. Each append's rows were checked against one snapshot, under the lock, in one
    // statement, so an append is written whole or not at all.
    let inserted = positions(inserted);
    let mut outcomes = Vec::with_capacity(appends.len());
    let mut unwritten = Vec::new();
    for (index, append) in appends.iter().enumerate() {
        let keys = keys_of(append);
        match keys.last().and_then(|key| inserted.get(key)) {
            Some(&position) if keys.iter().all(|key| inserted.contains_key(key)) => {
                outcomes.push(AppendOutcome::Appended {
                    version: version_after(append),
                    position,
                });
            }
            _ if keys.iter().any(|key| inserted.contains_key(key)) => {
                // Cannot happen (see above); if it did, the batch is committed and its callers
                // are told the outcome is unknown, as after a lost answer to a COMMIT.
                return Err(Error::CommitFailed(format!(
                    "an append to {} was written in part",
                    append.stream
                )));
            }
            _ => {
                outcomes.push(AppendOutcome::Conflict);
                unwritten.push(index);
            }
        }
    }
    if !unwritten.is_empty() {
        // Read after the commit, outside the lock: a stored event never changes, so the rows at
        // the versions these appends aimed at are the ones that kept them out, or (if none was
        // there) the append is a conflict either way. Rows another instance stored there since,
        // with the same ids, make it a duplicate, which is as true. If this read fails, the
        // batch is committed and its callers are told the outcome is unknown (they retry with
        // their ids, which come out as duplicates).
        let stored = stored_ids(connection, sql, &appends, &unwritten).await?;
        for index in unwritten {
            outcomes[index] = classify_unwritten(appends[index], &stored);
        }
    }
    Ok(Attempt::Committed(outcomes))
}

/// A duplicate if the stored events at the versions `append` aimed at carry its ids (a retry of
/// an append already made), a conflict otherwise.
fn classify_unwritten(
    append: &Append,
    stored: &HashMap<Key, (Uuid, LogPosition)>,
) -> AppendOutcome {
    let keys = keys_of(append);
    let same = keys
        .iter()
        .zip(&append.events)
        .all(|(key, event)| stored.get(key).is_some_and(|(id, _)| *id == event.event_id));
    match keys.last().and_then(|key| stored.get(key)) {
        Some((_, position)) if same => AppendOutcome::Duplicate {
            version: version_after(append),
            position: *position,
        },
        _ => AppendOutcome::Conflict,
    }
}

/// One attempt at `chain`, leaving out the appends `held_back` marks (they come out as
/// conflicts, unwritten).
async fn write_once(
    connection: &mut PgConnection,
    sql: &Sql,
    chain: &[Chained],
    held_back: &[bool],
) -> Result<Attempt> {
    // The appends this attempt writes, by their index in `chain`.
    let tried: Vec<usize> = (0..chain.len())
        .filter(|&index| !held_back[index])
        .collect();
    let appends: Vec<&Append> = tried.iter().map(|&index| &chain[index].append).collect();
    let rows = Rows::of(&appends)?;
    // The append lock is taken before the insert, so this transaction's id is assigned after
    // every earlier batch committed: commit order is (tx_id, position) order. With the BEGIN,
    // in one round trip (decision 63).
    let stage = std::time::Instant::now();
    let mut transaction = connection
        .begin_with(sql.begin_locked.clone())
        .await
        .context("starting an event log batch under its append lock")?;
    record_stage("lock", stage);
    let stage = std::time::Instant::now();
    let inserted: std::result::Result<Vec<InsertedRow>, sqlx::Error> = rows
        .bind(sqlx::query_as(&sql.insert))
        .bind(&sql.channel)
        .fetch_all(&mut *transaction)
        .await;
    let inserted = match inserted {
        Ok(inserted) => inserted,
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            // A row a writer bypassing the log lock committed after this statement's snapshot:
            // write the batch again, where the version check sees it.
            transaction
                .rollback()
                .await
                .context("rolling back a raced batch")?;
            return Ok(Attempt::Raced);
        }
        Err(source) => {
            return Err(Error::Database {
                context: "appending a batch of events",
                source,
            });
        }
    };
    record_stage("insert", stage);
    let inserted = positions(inserted);
    let mut outcomes: Vec<Option<AppendOutcome>> = Vec::with_capacity(appends.len());
    let mut unwritten = Vec::new();
    for (index, append) in appends.iter().enumerate() {
        let keys = keys_of(append);
        let found = keys
            .iter()
            .filter(|key| inserted.contains_key(*key))
            .count();
        if found == keys.len() {
            let last = keys.last().and_then(|key| inserted.get(key)).copied();
            outcomes.push(last.map(|position| AppendOutcome::Appended {
                version: version_after(append),
                position,
            }));
        } else if found == 0 {
            outcomes.push(None);
            unwritten.push(index);
        } else {
            transaction
                .rollback()
                .await
                .context("rolling back a raced batch")?;
            return Ok(Attempt::Raced);
        }
    }
    if !unwritten.is_empty() {
        let stored = stored_ids(&mut transaction, sql, &appends, &unwritten).await?;
        for index in unwritten {
            outcomes[index] = Some(classify_unwritten(appends[index], &stored));
        }
    }
    // Back to the whole chain's order: the held back are conflicts, unwritten. An append
    // inserted although a prerequisite did not come out written is held back next attempt.
    let mut all = vec![Some(AppendOutcome::Conflict); chain.len()];
    for (&index, outcome) in tried.iter().zip(outcomes) {
        all[index] = outcome;
    }
    let mut written = vec![false; chain.len()];
    let mut hold_back = Vec::new();
    for (index, chained) in chain.iter().enumerate() {
        let outcome = all[index].unwrap_or(AppendOutcome::Conflict);
        if !super::prerequisites_written(&chained.after, &written)
            && matches!(outcome, AppendOutcome::Appended { .. })
        {
            hold_back.push(index);
            continue;
        }
        written[index] = outcome.written().is_some();
    }
    if !hold_back.is_empty() {
        transaction
            .rollback()
            .await
            .context("rolling back a batch with a broken chain")?;
        return Ok(Attempt::HoldBack(hold_back));
    }
    let stage = std::time::Instant::now();
    transaction
        .commit()
        .await
        .context("committing an event log batch")?;
    record_stage("commit", stage);
    Ok(Attempt::Committed(
        all.into_iter()
            .map(|outcome| outcome.unwrap_or(AppendOutcome::Conflict))
            .collect(),
    ))
}

/// How long one step of a batch took, as the committer saw it (its round trip included):
/// `one_trip` (the whole batch, decision 69) or, the long way, `lock` (`BEGIN` and the append
/// lock, its wait included), `insert` and `commit`.
fn record_stage(stage: &'static str, started: std::time::Instant) {
    metrics::histogram!("event_log_batch_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}

fn keys_of(append: &Append) -> Vec<Key> {
    let first = i64::try_from(append.expected_version).unwrap_or(i64::MAX);
    (0..append.events.len())
        .map(|offset| {
            (
                append.stream.aggregate_type.clone(),
                append.stream.aggregate_id.clone(),
                first + 1 + offset as i64,
            )
        })
        .collect()
}

fn version_after(append: &Append) -> u64 {
    append.expected_version + append.events.len() as u64
}

/// The ids and positions stored at the versions the unwritten appends aimed at.
async fn stored_ids(
    connection: &mut PgConnection,
    sql: &Sql,
    appends: &[&Append],
    unwritten: &[usize],
) -> Result<HashMap<Key, (Uuid, LogPosition)>> {
    let (mut kinds, mut ids, mut sequences) = (Vec::new(), Vec::new(), Vec::new());
    for &index in unwritten {
        for (kind, id, sequence) in keys_of(appends[index]) {
            kinds.push(kind);
            ids.push(id);
            sequences.push(sequence);
        }
    }
    let rows: Vec<(String, String, i64, Uuid, i64, i64)> = sqlx::query_as(&sql.stored_ids)
        .bind(&kinds)
        .bind(&ids)
        .bind(&sequences)
        .fetch_all(connection)
        .await
        .context("reading the ids of stored events")?;
    Ok(rows
        .into_iter()
        .map(|(kind, id, sequence, event_id, commit, index)| {
            (
                (kind, id, sequence),
                (event_id, LogPosition { commit, index }),
            )
        })
        .collect())
}

/// The statement the committer runs, under the append lock, for the keys of appends a batch did
/// not write (`$1` aggregate types, `$2` ids, `$3` sequences): which events are stored there,
/// with their ids and positions. For tests of its plan.
#[cfg(feature = "testing")]
pub fn stored_ids_statement(events_table: &str) -> Result<String> {
    Ok(Sql::new(events_table, None)?.stored_ids)
}

/// Up to `limit` events of `events_table` after `after` as the snapshot of `connection`'s
/// transaction sees them, without the followers' visibility bound: for point-in-time reads
/// (audits, replays, verification) that page through one REPEATABLE READ transaction, where
/// every row seen is committed and no row can appear later inside that snapshot.
pub async fn read_in_snapshot(
    connection: &mut PgConnection,
    events_table: &str,
    after: LogPosition,
    limit: i64,
) -> Result<Vec<RecordedEvent>> {
    validate_table(events_table)?;
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {events_table} e \
         WHERE (e.tx_id, e.position) > ($1::text::xid8, $2) \
         ORDER BY e.tx_id, e.position LIMIT $3"
    ))
    .bind(after.commit.to_string())
    .bind(after.index)
    .bind(limit)
    .fetch_all(connection)
    .await
    .context("reading the event log")?;
    rows.iter().map(decode).collect()
}
