//! The event logs: the conformance suite every event log passes, run against PostgreSQL and
//! SQLite, and what is particular to PostgreSQL: commit order across instances (NOTES, "Reading
//! the log in commit order"; here the append lock), followers that no open transaction
//! elsewhere holds back, lag, and wake-ups of followers in another process through NOTIFY.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use infra::db::ScratchDatabase;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::eventlog::{
    Append, AppendOutcome, EventLog, EventMetadata, LogFilter, LogPosition, NewEvent, StreamId,
};
use rand::Rng;

use crate::support::{Gated, Harness};

/// A scratch database, dropped when the check is over.
pub struct Scratch(Option<ScratchDatabase>);

impl Scratch {
    pub fn new(database: ScratchDatabase) -> Self {
        Scratch(Some(database))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(database) = self.0.take() {
            infra::tasks::block_on_own_runtime(async move {
                let _ = database.drop_database().await;
            });
        }
    }
}

/// A fresh, empty PostgreSQL event log that appends through its own committer.
async fn fresh_postgres_log() -> (Arc<dyn EventLog>, Scratch) {
    let database = ScratchDatabase::create(&command_api::testing::admin_url())
        .await
        .expect("a scratch database");
    let pool = infra::db::connect(&database.url(), "command_api", 8, "test")
        .await
        .expect("connects");
    command_api::startup::migrate(&pool)
        .await
        .expect("migrates");
    let log = command_api::testing::writer_log(&pool, &database.url()).await;
    (log, Scratch(Some(database)))
}

mod postgres {
    use super::fresh_postgres_log;
    infra::event_log_conformance!(fresh_postgres_log);
}

/// A fresh, empty SQLite event log in a temporary directory, removed after the check.
async fn fresh_sqlite_log() -> (Arc<dyn EventLog>, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let log = infra::eventlog::sqlite::SqliteEventLog::open_file(
        &directory.path().join("ledger.sqlite"),
        4,
    )
    .await
    .expect("the log opens");
    (Arc::new(log), directory)
}

mod sqlite {
    use super::fresh_sqlite_log;
    infra::event_log_conformance!(fresh_sqlite_log);
}

/// The SQLite log chained link by link, through the trait's own [`EventLog::append_chained`]
/// (what KurrentDB does): the suite holds the default to the same contract.
async fn fresh_stepwise_log() -> (Arc<dyn EventLog>, tempfile::TempDir) {
    let (log, directory) = fresh_sqlite_log().await;
    (Arc::new(Gated::new(log)), directory)
}

mod stepwise {
    use super::fresh_stepwise_log;
    infra::event_log_conformance!(fresh_stepwise_log);
}

/// A log over `pool` that only reads, as another service's would.
async fn reader(pool: &sqlx::PgPool, listen: bool) -> PgEventLog {
    PgEventLog::open(
        pool.clone(),
        PgEventLogOptions {
            listen,
            ..PgEventLogOptions::reader("command_api.events")
        },
    )
    .await
    .expect("the log opens")
}

const WRITERS: usize = 8;
const EVENTS_PER_WRITER: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_every_event_exactly_once_while_eight_instances_append() {
    // Proves commit order across instances: eight logs with committers of their own (eight
    // command-api instances) append concurrently while a follower reads; it sees every event
    // exactly once, each stream in order, and never one below its checkpoint later. Their
    // batches take the log's append lock, so (tx_id, position) is commit order.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    let follower_log = reader(&pool, false).await;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let log = harness.writer_log().await;
        writers.push(tokio::spawn(async move {
            let stream = StreamId::new("account", format!("writer-{writer}"));
            for version in 0..EVENTS_PER_WRITER {
                let pause_ms = rand::rng().random_range(0..3);
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                let outcome = log
                    .append(vec![Append {
                        stream: stream.clone(),
                        expected_version: version as u64,
                        events: vec![NewEvent {
                            event_id: infra::eventlog::event_id(&format!("w{writer}-{version}"), 0),
                            event_type: "Written".to_owned(),
                            event_version: "1".to_owned(),
                            payload: "{}".to_owned(),
                            metadata: EventMetadata::default(),
                        }],
                    }])
                    .await
                    .expect("appended");
                assert!(matches!(outcome[0], AppendOutcome::Appended { .. }));
            }
        }));
    }
    let mut checkpoint = LogPosition::START;
    let mut seen: Vec<(String, u64)> = Vec::new();
    let expected = WRITERS * EVENTS_PER_WRITER;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower fell behind: {} of {expected}",
            seen.len()
        );
        let batch = follower_log
            .read_all(checkpoint, 7, LogFilter::ALL)
            .await
            .expect("reads");
        for event in &batch {
            assert!(event.position > checkpoint, "positions only move forward");
            checkpoint = event.position;
            seen.push((event.stream.aggregate_id.clone(), event.sequence));
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for writer in writers {
        writer.await.expect("the writer finished");
    }
    assert!(
        follower_log
            .read_all(checkpoint, 100, LogFilter::ALL)
            .await
            .expect("reads")
            .is_empty(),
        "nothing was left behind the checkpoint"
    );
    let distinct: HashSet<(String, u64)> = seen.iter().cloned().collect();
    assert_eq!(distinct.len(), expected, "every event exactly once");
    assert_eq!(seen.len(), expected);
    // Within each writer, events arrive in their own order.
    for writer in 0..WRITERS {
        let sequences: Vec<u64> = seen
            .iter()
            .filter(|(id, _)| *id == format!("writer-{writer}"))
            .map(|(_, sequence)| *sequence)
            .collect();
        assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
    }
    harness.finish().await;
}

#[tokio::test]
async fn a_row_written_past_the_append_lock_makes_a_conflict_not_a_failed_batch() {
    // Proves the committer's insert needs no `ON CONFLICT` (decision 52): a writer that bypasses
    // the log lock holds a stream's next row uncommitted, the committer's batch inserts the same
    // row and waits on it; when the outsider commits, the batch meets a unique violation, writes
    // itself again, and the append comes out as a conflict, with the outsider's row the only one.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    let log = harness.writer_log().await;
    let stream = StreamId::new("account", format!("outsider-{}", uuid::Uuid::new_v4()));
    let mut outsider = pool.begin().await.expect("begins");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ($1, $2, 1, 'Written', '1', '{}', '{}')",
    )
    .bind(&stream.aggregate_type)
    .bind(&stream.aggregate_id)
    .execute(&mut *outsider)
    .await
    .expect("the outsider inserts");
    let append = tokio::spawn({
        let stream = stream.clone();
        async move {
            log.append(vec![Append {
                stream,
                expected_version: 0,
                events: vec![NewEvent {
                    event_id: uuid::Uuid::new_v4(),
                    event_type: "Written".to_owned(),
                    event_version: "1".to_owned(),
                    payload: "{}".to_owned(),
                    metadata: EventMetadata::default(),
                }],
            }])
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !append.is_finished(),
        "the batch waits on the outsider's uncommitted row"
    );
    outsider.commit().await.expect("the outsider commits");
    let outcome = append
        .await
        .expect("the append task ends")
        .expect("the batch is written again, not failed");
    assert_eq!(outcome, vec![AppendOutcome::Conflict]);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(&stream.aggregate_type)
    .bind(&stream.aggregate_id)
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(rows, 1);
    harness.finish().await;
}

#[tokio::test]
async fn an_open_transaction_elsewhere_holds_no_follower_back() {
    // Proves what the append lock buys: a transaction left open in another session (which once
    // held every follower back, since reads stopped below the cluster's oldest running
    // transaction) does not stop a committed event from being read at once.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    let mut blocker = pool.begin().await.expect("begins");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *blocker)
        .await
        .expect("the open transaction has an id");
    let (_, token) = harness.customer();
    harness.open_account(&token, "USD").await;
    let log = reader(&pool, false).await;
    let events = log
        .read_all(LogPosition::START, 10, LogFilter::ALL)
        .await
        .expect("reads");
    assert_eq!(events.len(), 1, "the account's opening is readable at once");
    blocker.rollback().await.expect("rolls back");
    harness.finish().await;
}

#[tokio::test]
async fn lag_counts_what_a_follower_has_not_read_and_how_old_the_oldest_is() {
    // Proves the lag the services report: nothing waiting is zero whatever else the log holds;
    // events waiting give a count and the age of the oldest one, which keeps growing for as
    // long as the follower does not move; other aggregate types do not count for a follower
    // of one type.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    let reader = reader(&pool, false).await;
    let start = LogPosition::START;
    let caught_up = reader.lag(start, LogFilter::ALL).await.expect("the lag");
    assert_eq!(
        (caught_up.events, caught_up.oldest_unread),
        (0, Duration::ZERO)
    );

    // Three events written ten seconds ago that nobody has read (inserted as the committer
    // would, under the append lock, with their time set back).
    let mut head = start;
    for sequence in 1..=3_i64 {
        let mut transaction = pool.begin().await.expect("begins");
        take_the_append_lock(&mut transaction).await;
        let (commit, index): (i64, i64) = sqlx::query_as(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at) \
             VALUES ('lag_test', 'stream', $1, 'Written', '1', '{}', '{}', now() - interval '10 seconds') \
             RETURNING tx_id::text::bigint, position",
        )
        .bind(sequence)
        .fetch_one(&mut *transaction)
        .await
        .expect("inserts");
        transaction.commit().await.expect("commits");
        head = LogPosition { commit, index };
    }
    let behind = reader.lag(start, LogFilter::ALL).await.expect("the lag");
    assert_eq!(behind.events, 3);
    assert!(
        behind.oldest_unread >= Duration::from_secs(10),
        "{behind:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = reader.lag(start, LogFilter::ALL).await.expect("the lag");
    assert!(later.oldest_unread > behind.oldest_unread, "{later:?}");

    // A follower of transactions is not waiting for them; one at the head waits for nothing.
    let transactions_only = reader
        .lag(start, LogFilter::aggregate("transaction"))
        .await
        .expect("the lag");
    assert_eq!(transactions_only.events, 0);
    let at_head = reader.lag(head, LogFilter::ALL).await.expect("the lag");
    assert_eq!((at_head.events, at_head.oldest_unread), (0, Duration::ZERO));
    harness.finish().await;
}

/// Takes the log's append lock in `transaction`, as the committer does before it writes a
/// batch, so that rows written here land in commit order.
async fn take_the_append_lock(transaction: &mut sqlx::PgConnection) {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(infra::db::advisory_key("event-log/command_api.events"))
        .execute(transaction)
        .await
        .expect("locks");
}

/// Writes the events numbered `from..=to` in one commit, as the committer writes (under the
/// append lock): event `g` is of aggregate type `kinds[g % kinds.len()]`, ten per stream and
/// type, all other columns the same.
async fn write_generated_events(pool: &sqlx::PgPool, kinds: &[&str], from: i64, to: i64) {
    let mut transaction = pool.begin().await.expect("begins");
    take_the_append_lock(&mut transaction).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT ($1::text[])[g % cardinality($1) + 1], 'stream-' || (g / (10 * cardinality($1))), \
             g / cardinality($1) % 10 + 1, 'Written', '1', '{}', '{}' \
         FROM generate_series($2::bigint, $3::bigint) AS g",
    )
    .bind(kinds)
    .bind(from)
    .bind(to)
    .execute(&mut *transaction)
    .await
    .expect("inserts");
    transaction.commit().await.expect("commits");
}

/// How many times the events table was scanned whole, and its primary key (stream order)
/// scanned, once every session of `sessions` flushed its statistics (a session flushes them
/// when it next goes idle, before it answers).
async fn scans_of_events(sessions: &[&sqlx::PgPool]) -> (i64, i64) {
    for session in sessions {
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(*session)
            .await
            .expect("flushes");
    }
    sqlx::query_as(
        "SELECT t.seq_scan, i.idx_scan FROM pg_stat_user_tables t \
         JOIN pg_stat_user_indexes i ON i.relid = t.relid AND i.indexrelname = 'events_pkey' \
         WHERE t.schemaname = 'command_api' AND t.relname = 'events'",
    )
    .fetch_one(sessions[0])
    .await
    .expect("the table's statistics")
}

/// A scratch database with the write side's schema, and a one-connection pool on it (so that
/// flushing its statistics flushes all it did).
async fn scratch_events_table() -> (Scratch, String, sqlx::PgPool) {
    let database = ScratchDatabase::create(&command_api::testing::admin_url())
        .await
        .expect("a scratch database");
    let url = database.url();
    let pool = infra::db::connect(&url, "command_api", 1, "test")
        .await
        .expect("connects");
    command_api::startup::migrate(&pool)
        .await
        .expect("migrates");
    (Scratch::new(database), url, pool)
}

/// A one-connection pool on `url` whose sessions plan with `plan_cache_mode`.
async fn planned_session(url: &str, plan_cache_mode: &str) -> sqlx::PgPool {
    let options = infra::db::connect_options(url, "command_api")
        .expect("options")
        .options([("plan_cache_mode", plan_cache_mode)]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connects")
}

#[tokio::test]
async fn a_lag_report_walks_the_log_from_the_checkpoint_whatever_the_planner_estimates() {
    // Proves that a lag report costs what is unread, not what the log holds: every follower
    // reports its lag every 2 s. Counting the unread events used to be a sequential scan of the
    // whole log, under the generic plan a pooled statement settles on after five executions
    // and under custom plans on a table without statistics alike (the planner has no useful
    // estimate of a row comparison on `xid8`); a filtered report took a bitmap of every event
    // of its type. Both plan modes are forced here, before and after the table is analysed, and
    // neither the table's scan counter nor its primary key's may move.
    let (_scratch, url, pool) = scratch_events_table().await;
    write_generated_events(&pool, &["lag_plan", "lag_other"], 0, 19_999).await;
    let (commit, index): (i64, i64) = sqlx::query_as(
        "SELECT tx_id::text::bigint, position FROM events ORDER BY tx_id, position OFFSET 19979 LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("a checkpoint near the head");
    let checkpoint = LogPosition { commit, index };

    for (statistics, mode) in [
        ("none", "force_generic_plan"),
        ("none", "force_custom_plan"),
        ("analysed", "force_generic_plan"),
        ("analysed", "force_custom_plan"),
    ] {
        if statistics == "analysed" {
            sqlx::query("ANALYZE events")
                .execute(&pool)
                .await
                .expect("analyses");
        }
        let planned = planned_session(&url, mode).await;
        let log = reader(&planned, false).await;
        let before = scans_of_events(&[&pool, &planned]).await;
        for _ in 0..6 {
            let lag = log.lag(checkpoint, LogFilter::ALL).await.expect("the lag");
            assert_eq!(lag.events, 20, "{mode}, statistics: {statistics}");
            let lag = log
                .lag(checkpoint, LogFilter::aggregate("lag_plan"))
                .await
                .expect("the lag");
            assert_eq!(lag.events, 10, "{mode}, statistics: {statistics}");
        }
        assert_eq!(
            scans_of_events(&[&pool, &planned]).await,
            before,
            "a lag report scanned the whole log, or every event of a type \
             ({mode}, statistics: {statistics})"
        );
        planned.close().await;
    }
    pool.close().await;
}

#[tokio::test]
async fn the_committers_duplicate_check_probes_each_key_with_a_plan_cached_while_the_log_was_small()
{
    // Proves the check the committer runs under the append lock when an append of a batch was
    // not written (a retry's events are there already, or another writer's): it must cost a
    // probe per key, not a scan of the log. The committer's connection lives as long as the
    // process and caches its statements' plans; as a plain join, the generic plan made while the
    // log was small was a hash join over a sequential scan, kept as the log grew (41 ms per
    // check at 300k events, every append waiting behind it).
    let (_scratch, url, pool) = scratch_events_table().await;
    write_generated_events(&pool, &["duplicate_check"], 0, 99).await;
    // One session, as the committer's, whose plan is generic from the first execution.
    let session = planned_session(&url, "force_generic_plan").await;
    let statement = infra::eventlog::postgres::stored_ids_statement("command_api.events")
        .expect("the statement");
    let check = |streams: [i64; 3]| {
        let (session, statement) = (session.clone(), statement.clone());
        async move {
            let rows: Vec<(String, String, i64, uuid::Uuid, i64, i64)> = sqlx::query_as(&statement)
                .bind(vec!["duplicate_check"; 3])
                .bind(streams.map(|stream| format!("stream-{stream}")).to_vec())
                .bind(vec![3_i64; 3])
                .fetch_all(&session)
                .await
                .expect("the check runs");
            rows.len()
        }
    };
    assert_eq!(check([1, 2, 3]).await, 3, "the plan is made on a small log");
    write_generated_events(&pool, &["duplicate_check"], 100, 29_999).await;
    let before = scans_of_events(&[&pool, &session]).await;
    for streams in [[5, 500, 2_999], [7, 8, 9]] {
        assert_eq!(check(streams).await, 3);
    }
    assert_eq!(
        scans_of_events(&[&pool, &session]).await.0,
        before.0,
        "the duplicate check scanned the whole log"
    );
    session.close().await;
    pool.close().await;
}

#[tokio::test]
async fn a_commit_wakes_a_follower_in_another_process_through_notify() {
    // Proves the cross-process wake-up: a log that only reads (the projector's) hears of a
    // batch committed by another log's committer (command-api's), without polling.
    let harness = Harness::start().await;
    let listening = reader(&harness.app.pool, true).await;
    // Only a log that listens may tell its followers that a short read caught up (decision 68);
    // the writer's own log hears its own commits alone.
    assert!(listening.wakes_on_every_commit());
    assert!(
        !reader(&harness.app.pool, false)
            .await
            .wakes_on_every_commit()
    );
    assert!(!harness.app.log().wakes_on_every_commit());
    let mut wakeups = listening.subscribe();
    wakeups.borrow_and_update();
    let (_, token) = harness.customer();
    harness.open_account(&token, "USD").await;
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed())
        .await
        .expect("woken by NOTIFY")
        .expect("the log is alive");
    drop(listening);
    harness.finish().await;
}

#[tokio::test]
async fn a_committer_refused_temporary_objects_writes_the_long_way() {
    // Proves decision 69's fallback: a committer whose role may not create temporary objects
    // (the function it writes each batch through in one round trip) still appends, chained
    // batches included, the long way.
    let role = format!("ledger_no_temp_{}", uuid::Uuid::new_v4().simple());
    // Declared before the database, so dropped after it, when nothing depends on the role.
    let _role = ScratchRole(role.clone());
    let (_scratch, url, pool) = scratch_events_table().await;
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("the database's name");
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("REVOKE TEMPORARY ON DATABASE {name} FROM PUBLIC"),
        format!("GRANT USAGE ON SCHEMA command_api TO {role}"),
        format!("GRANT SELECT, INSERT ON command_api.events TO {role}"),
        format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA command_api TO {role}"),
    ] {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .expect("sets the role up");
    }
    let refused = async {
        let options = infra::db::connect_options(&url, "command_api")
            .expect("options")
            .username(&role);
        let mut session = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .expect("the role connects");
        sqlx::Executor::execute(&mut session, "CREATE TEMPORARY TABLE probe (x int)")
            .await
            .is_err()
    }
    .await;
    assert!(refused, "the role may not create temporary objects");
    let log = PgEventLog::open(
        pool.clone(),
        PgEventLogOptions::writer(
            "command_api",
            infra::db::connect_options(&url, "command_api")
                .expect("options")
                .username(&role),
        ),
    )
    .await
    .expect("the log opens");
    let event = |name: &str| NewEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: name.to_owned(),
        event_version: "1".to_owned(),
        payload: "{}".to_owned(),
        metadata: EventMetadata::default(),
    };
    let (first, second) = (
        StreamId::new("account", "first"),
        StreamId::new("transaction", "second"),
    );
    let outcomes = log
        .append_chained(vec![
            infra::eventlog::Chained::alone(Append {
                stream: first.clone(),
                expected_version: 0,
                events: vec![event("Opened")],
            }),
            infra::eventlog::Chained {
                append: Append {
                    stream: second.clone(),
                    expected_version: 0,
                    events: vec![event("Recorded")],
                },
                after: vec![0],
            },
        ])
        .await
        .expect("the batch is written the long way");
    assert!(
        outcomes
            .iter()
            .all(|outcome| matches!(outcome, AppendOutcome::Appended { version: 1, .. })),
        "{outcomes:?}"
    );
    for stream in [&first, &second] {
        assert_eq!(log.read_stream(stream, 0).await.expect("reads").len(), 1);
    }
    drop(log);
    pool.close().await;
}

/// A login role for one check, dropped even when the check fails: declared before the check's
/// scratch database, it is dropped after it, when no grant depends on it any more.
struct ScratchRole(String);

impl Drop for ScratchRole {
    fn drop(&mut self) {
        let statement = format!("DROP ROLE IF EXISTS {}", self.0);
        infra::tasks::block_on_own_runtime(async move {
            use sqlx::Connection;
            if let Ok(mut admin) =
                sqlx::PgConnection::connect(&command_api::testing::admin_url()).await
            {
                let _ = sqlx::query(&statement).execute(&mut admin).await;
            }
        });
    }
}

/// The type and collation of one column of the event log, as PostgreSQL reports them.
async fn events_column(pool: &sqlx::PgPool, column: &str) -> (String, Option<String>) {
    sqlx::query_as(
        "SELECT data_type, collation_name FROM information_schema.columns
         WHERE table_schema = 'command_api' AND table_name = 'events' AND column_name = $1",
    )
    .bind(column)
    .fetch_one(pool)
    .await
    .expect("the column exists")
}

/// A scratch database whose event log has the schema from before migration 0003, its URL, and
/// a pool on it.
async fn database_before_the_json_migration() -> (Scratch, String, sqlx::PgPool) {
    let database = ScratchDatabase::create(&command_api::testing::admin_url())
        .await
        .expect("a scratch database");
    let url = database.url();
    let scratch = Scratch::new(database);
    let pool = infra::db::connect(&url, "command_api", 8, "test")
        .await
        .expect("connects");
    command_api::startup::migrate_before(&pool, 3)
        .await
        .expect("migrates to the schema before 0003");
    (scratch, url, pool)
}

/// Migration 0003 stores payloads and metadata as `json` instead of `jsonb`, and compares stream
/// keys byte by byte (decision 71). A log written before it reads back exactly the same after
/// it, its streams go on from where they were, and what is appended afterwards is kept as
/// written.
#[tokio::test]
async fn a_log_written_as_jsonb_reads_the_same_after_the_json_migration() {
    let (_scratch, url, pool) = database_before_the_json_migration().await;
    assert_eq!(events_column(&pool, "payload").await.0, "jsonb");

    let event = |name: &str, payload: &str| NewEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: name.to_owned(),
        event_version: "1".to_owned(),
        payload: payload.to_owned(),
        metadata: EventMetadata {
            correlation_id: "corr-1".to_owned(),
            ..EventMetadata::default()
        },
    };
    let streams = [
        StreamId::new("transaction", "json-migration-1"),
        StreamId::new("account", "json-migration-2"),
    ];
    let before = {
        let log = command_api::testing::writer_log(&pool, &url).await;
        for (stream, payload) in streams.iter().zip([
            r#"{"b":1,"a":{"d":[1,2],"c":"x"}}"#,
            r#"{"amount_minor":125,"at":"2026-12-05T20:00:00Z"}"#,
        ]) {
            let outcome = log
                .append(vec![Append {
                    stream: stream.clone(),
                    expected_version: 0,
                    events: vec![event("Written", payload)],
                }])
                .await
                .expect("appends");
            assert!(matches!(outcome[..], [AppendOutcome::Appended { .. }]));
        }
        log.read_all(LogPosition::START, 100, LogFilter::default())
            .await
            .expect("reads")
    };
    // `jsonb` kept the value, not the text: keys sorted, its own spacing.
    assert_eq!(
        before[0].payload,
        r#"{"a": {"c": "x", "d": [1, 2]}, "b": 1}"#
    );

    command_api::startup::migrate(&pool)
        .await
        .expect("applies 0003");
    assert_eq!(events_column(&pool, "payload").await.0, "json");
    assert_eq!(events_column(&pool, "metadata").await.0, "json");
    for column in ["aggregate_type", "aggregate_id"] {
        let (_, collation) = events_column(&pool, column).await;
        assert_eq!(
            collation.as_deref(),
            Some("C"),
            "{column} compares by bytes"
        );
    }

    // As after an upgrade: the services start again on the migrated schema. A connection that
    // prepared a read of the log before the migration cannot run it after it ("cached plan
    // must not change result type": the keys' collation is part of the result's type), which is
    // why operations.md asks for every process reading the log to be stopped while it runs.
    pool.close().await;
    let pool = infra::db::connect(&url, "command_api", 8, "test")
        .await
        .expect("connects again");
    let log = command_api::testing::writer_log(&pool, &url).await;
    let after = log
        .read_all(LogPosition::START, 100, LogFilter::default())
        .await
        .expect("reads");
    assert_eq!(
        after, before,
        "the migration changed what the log reads back"
    );
    let loaded = log
        .read_stream_recorded(&streams[0], 0)
        .await
        .expect("loads");
    assert_eq!(loaded, before[..1], "a stream load differs from the log");

    let written = r#"{"b":2,"a":1}"#;
    let outcome = log
        .append(vec![Append {
            stream: streams[0].clone(),
            expected_version: 1,
            events: vec![event("WrittenAgain", written)],
        }])
        .await
        .expect("appends after the migration");
    assert!(matches!(
        outcome[..],
        [AppendOutcome::Appended { version: 2, .. }]
    ));
    let last = log
        .read_all(before[1].position, 100, LogFilter::default())
        .await
        .expect("reads");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].payload, written, "json keeps the text as written");
    assert_eq!(last[0].metadata.correlation_id, "corr-1");
}

/// A reader that read the log before migration 0003 (another service started at the same time
/// as command-api, or left running through an upgrade) goes on reading after it. Its connection
/// prepared the reads against the old table; the migration changes their result's type (the
/// keys' collation), and PostgreSQL then refuses to run them ("cached plan must not change
/// result type", SQLSTATE 0A000) until they are prepared again. One connection in the pool, so
/// every read after the migration runs on the connection that prepared it before.
#[tokio::test]
async fn a_reader_that_read_before_the_json_migration_reads_after_it() {
    let (_scratch, url, pool) = database_before_the_json_migration().await;
    let writer = command_api::testing::writer_log(&pool, &url).await;
    let stream = StreamId::new("transaction", "replanned-1");
    writer
        .append(vec![Append {
            stream: stream.clone(),
            expected_version: 0,
            events: vec![NewEvent {
                event_id: uuid::Uuid::new_v4(),
                event_type: "Written".to_owned(),
                event_version: "1".to_owned(),
                payload: r#"{"a":1}"#.to_owned(),
                metadata: EventMetadata::default(),
            }],
        }])
        .await
        .expect("appends");

    let one_connection = infra::db::connect(&url, "command_api", 1, "test reader")
        .await
        .expect("connects");
    let log = reader(&one_connection, false).await;
    let filtered = LogFilter {
        aggregate_type: Some("transaction"),
        event_type: None,
    };
    let before = log
        .read_all(LogPosition::START, 10, LogFilter::default())
        .await
        .expect("reads before");
    assert_eq!(before.len(), 1);
    let head = log.head().await.expect("the head before");
    assert_eq!(
        log.read_all(LogPosition::START, 10, filtered)
            .await
            .expect("reads filtered before"),
        before
    );
    assert_eq!(
        log.read_stream_recorded(&stream, 0)
            .await
            .expect("loads before"),
        before
    );
    log.lag(LogPosition::START, filtered)
        .await
        .expect("the lag before");

    command_api::startup::migrate(&pool)
        .await
        .expect("applies 0003");

    for _ in 0..2 {
        assert_eq!(
            log.read_all(LogPosition::START, 10, LogFilter::default())
                .await
                .expect("reads after the migration"),
            before
        );
        assert_eq!(
            log.read_all(LogPosition::START, 10, filtered)
                .await
                .expect("reads filtered after the migration"),
            before
        );
        assert_eq!(log.head().await.expect("the head after"), head);
        assert_eq!(
            log.read_stream_recorded(&stream, 0)
                .await
                .expect("loads after the migration"),
            before
        );
        let lag = log
            .lag(LogPosition::START, filtered)
            .await
            .expect("the lag after the migration");
        assert_eq!(lag.events, 1);
    }
    one_connection.close().await;
}
