//! The event logs: the conformance suite every event log passes, run against PostgreSQL and
//! SQLite, and what is particular to PostgreSQL: the gap-safe read (NOTES, "Reading the log in
//! commit order") with writers whose transactions commit out of insert order, lag held back by
//! an open transaction, and wake-ups of followers in another process through NOTIFY.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use infra::db::ScratchDatabase;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::eventlog::{EventLog, LogFilter, LogPosition};
use rand::Rng;

use crate::support::Harness;

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
    let pool = infra::db::connect(&database.url(), "command_api", 8)
        .await
        .expect("connects");
    command_api::startup::migrate(&pool)
        .await
        .expect("migrates");
    let log = PgEventLog::open(
        pool,
        PgEventLogOptions::writer(
            "command_api",
            infra::db::connect_options(&database.url(), "command_api").expect("options"),
        ),
    )
    .await
    .expect("the log opens");
    (Arc::new(log), Scratch(Some(database)))
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

const LOG_TEST: LogFilter = LogFilter::aggregate("log_test");

const WRITERS: usize = 8;
const EVENTS_PER_WRITER: usize = 60;

#[tokio::test]
async fn a_follower_sees_every_event_exactly_once_while_eight_writers_commit() {
    // Proves the reader never skips a row that commits late and never returns one twice, while a
    // reader checkpointing the bare insert position demonstrably skips the late commit.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    // A transaction that inserts first and commits last: the gap a bare position checkpoint
    // skips. A naive follower that reads while it is open moves past its position for good.
    let mut late = pool.begin().await.expect("begins");
    let late_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('log_test', 'late', 1, 'Written', '1', '{}', '{}') RETURNING position",
    )
    .fetch_one(&mut *late)
    .await
    .expect("inserts");
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for index in 0..EVENTS_PER_WRITER {
                    let pause_ms: f64 = rand::rng().random_range(0.0..4.0);
                    let mut transaction = pool.begin().await.expect("begins");
                    sqlx::query(
                        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                         VALUES ('log_test', $1, $2, 'Written', '1', '{}', '{}')",
                    )
                    .bind(format!("writer-{writer}"))
                    .bind(i64::try_from(index + 1).expect("small"))
                    .execute(&mut *transaction)
                    .await
                    .expect("inserts");
                    // Hold the transaction open a little so that later inserts commit first.
                    sqlx::query("SELECT pg_sleep($1)")
                        .bind(pause_ms / 1000.0)
                        .execute(&mut *transaction)
                        .await
                        .expect("sleeps");
                    transaction.commit().await.expect("commits");
                }
            })
        })
        .collect();

    // Let some of the others commit, look with a naive position checkpoint, then commit.
    let naive_deadline = std::time::Instant::now() + Duration::from_secs(30);
    let naive_checkpoint = loop {
        let newer: Vec<i64> = sqlx::query_scalar(
            "SELECT position FROM events WHERE aggregate_type = 'log_test' ORDER BY position",
        )
        .fetch_all(&pool)
        .await
        .expect("reads");
        if newer.len() >= 20 {
            break *newer.last().expect("not empty");
        }
        assert!(
            std::time::Instant::now() < naive_deadline,
            "the writers never committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    late.commit().await.expect("commits");
    let naive_sees_late: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE aggregate_type = 'log_test' AND position > $1 AND aggregate_id = 'late')",
    )
    .bind(naive_checkpoint)
    .fetch_one(&pool)
    .await
    .expect("reads");
    assert!(
        late_position < naive_checkpoint && !naive_sees_late,
        "a bare position checkpoint skips the late commit"
    );

    let reader = reader(&pool, false).await;
    let mut checkpoint = LogPosition::START;
    let mut seen: Vec<(String, u64, i64)> = Vec::new();
    let expected = WRITERS * EVENTS_PER_WRITER + 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower fell behind: {} of {expected}",
            seen.len()
        );
        let batch = reader
            .read_all(checkpoint, 7, LOG_TEST)
            .await
            .expect("reads");
        for event in &batch {
            assert!(event.position > checkpoint, "positions only move forward");
            checkpoint = event.position;
            seen.push((
                event.stream.aggregate_id.clone(),
                event.sequence,
                event.position.index,
            ));
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for writer in writers {
        writer.await.expect("the writer finished");
    }
    assert!(
        reader
            .read_all(checkpoint, 100, LOG_TEST)
            .await
            .expect("reads")
            .is_empty()
    );
    let distinct: HashSet<(String, u64)> = seen
        .iter()
        .map(|(id, sequence, _)| (id.clone(), *sequence))
        .collect();
    assert_eq!(distinct.len(), expected, "every event exactly once");
    assert_eq!(seen.len(), expected);
    assert!(
        distinct.contains(&("late".to_owned(), 1)),
        "the gap-safe reader saw the late commit"
    );
    // Within each writer, events arrive in their own order.
    for writer in 0..WRITERS {
        let sequences: Vec<u64> = seen
            .iter()
            .filter(|(id, _, _)| *id == format!("writer-{writer}"))
            .map(|(_, sequence, _)| *sequence)
            .collect();
        assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
    }
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
    // The scratch log is empty. (Positions come from the inserts, not from `head()`: its
    // visibility bound is cluster-wide, so a transaction open in another test moves it.)
    let start = LogPosition::START;
    let caught_up = reader.lag(start, LogFilter::ALL).await.expect("the lag");
    assert_eq!(
        (caught_up.events, caught_up.oldest_unread),
        (0, Duration::ZERO)
    );

    // Three events written ten seconds ago that nobody has read.
    let mut head = start;
    for sequence in 1..=3_i64 {
        let (commit, index): (i64, i64) = sqlx::query_as(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at) \
             VALUES ('lag_test', 'stream', $1, 'Written', '1', '{}', '{}', now() - interval '10 seconds') \
             RETURNING tx_id::text::bigint, position",
        )
        .bind(sequence)
        .fetch_one(&pool)
        .await
        .expect("inserts");
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

    // A committed event that an open transaction holds back from followers still counts.
    let mut blocker = pool.begin().await.expect("begins");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('lag_test', 'blocker', 1, 'Written', '1', '{}', '{}')",
    )
    .execute(&mut *blocker)
    .await
    .expect("inserts");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('lag_test', 'stream', 4, 'Written', '1', '{}', '{}')",
    )
    .execute(&pool)
    .await
    .expect("inserts");
    assert!(
        reader
            .read_all(head, 10, LogFilter::ALL)
            .await
            .expect("reads")
            .is_empty(),
        "the open transaction holds the committed event back"
    );
    let held_back = reader.lag(head, LogFilter::ALL).await.expect("the lag");
    blocker.rollback().await.expect("rolls back");
    assert!(held_back.events >= 1, "{held_back:?}");
    assert!(held_back.oldest_unread > Duration::ZERO, "{held_back:?}");
    harness.finish().await;
}

#[tokio::test]
async fn a_commit_wakes_a_follower_in_another_process_through_notify() {
    // Proves the cross-process wake-up: a log that only reads (the projector's) hears of a
    // batch committed by another log's committer (command-api's), without polling.
    let harness = Harness::start().await;
    let listening = reader(&harness.app.pool, true).await;
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
