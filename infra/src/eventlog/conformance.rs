//! The event log's conformance suite: one set of checks every implementation passes (PostgreSQL,
//! SQLite, EventStoreDB). Each check takes a fresh, empty log and panics with what it found.
//!
//! An implementation's tests instantiate the whole suite with [`event_log_conformance!`], giving
//! it an async function that opens a fresh log and the value to keep alive (and clean up) while
//! the log is used:
//!
//! ```ignore
//! infra::event_log_conformance!(fresh_postgres_log);
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{
    Append, AppendOutcome, Chained, EventLog, EventMetadata, LogFilter, LogPosition, NewEvent,
    Snapshot, StreamId, event_id,
};

/// Instantiates every check of the suite as a `#[tokio::test]`, each on a log from `$fresh`,
/// an `async fn() -> (Arc<dyn EventLog>, G)` where `G` is dropped after the check.
#[macro_export]
macro_rules! event_log_conformance {
    ($fresh:path) => {
        $crate::event_log_conformance!(@all $fresh, $crate::eventlog::conformance::always);
    };
    // For a store that is not always there (KurrentDB): each check runs only when `$ready()`
    // says the store is reachable, and says so when it skips.
    ($fresh:path, skip_unless = $ready:path) => {
        $crate::event_log_conformance!(@all $fresh, $ready);
    };
    // The checks, listed once for every store.
    (@all $fresh:path, $ready:path) => {
        $crate::event_log_conformance!(@checks $fresh, $ready;
            appends_read_back_in_order,
            a_stream_reads_back_with_ids_times_and_metadata,
            a_stale_expected_version_conflicts_and_writes_nothing,
            a_retried_append_is_a_duplicate_and_writes_nothing,
            another_command_at_the_same_version_conflicts,
            an_expected_version_beyond_the_end_conflicts,
            appends_in_one_call_succeed_or_fail_on_their_own,
            a_chained_append_is_made_only_after_its_prerequisites,
            racing_writers_of_one_stream_leave_it_whole,
            followers_read_every_commit_once_in_stream_order,
            filters_select_streams_and_event_types,
            a_commit_wakes_subscribers,
            head_and_lag_follow_the_log,
            snapshots_only_move_forward
        );
    };
    (@checks $fresh:path, $ready:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                if !$ready() {
                    return;
                }
                let (log, _keep) = $fresh().await;
                $crate::eventlog::conformance::$check(log).await;
            }
        )*
    };
}

/// The readiness of a store that is always there.
pub fn always() -> bool {
    true
}

const KIND: &str = "account";
const OTHER_KIND: &str = "transaction";

/// How long a check waits for an append to become visible to followers.
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

fn stream(kind: &str) -> StreamId {
    StreamId::new(kind, Uuid::new_v4().to_string())
}

fn metadata(command: &str) -> EventMetadata {
    EventMetadata {
        correlation_id: format!("correlation-{command}"),
        causation_id: format!("cause-{command}"),
        actor: "conformance".to_owned(),
        command_id: command.to_owned(),
    }
}

/// `count` events of one command, with ids derived from it.
fn events(command: &str, event_type: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|index| NewEvent {
            event_id: event_id(command, index),
            event_type: event_type.to_owned(),
            event_version: "1".to_owned(),
            payload: format!(r#"{{"command":"{command}","index":{index}}}"#),
            metadata: metadata(command),
        })
        .collect()
}

fn append(stream: &StreamId, expected_version: u64, command: &str, count: usize) -> Append {
    Append {
        stream: stream.clone(),
        expected_version,
        events: events(command, "Tested", count),
    }
}

async fn one(log: &dyn EventLog, append: Append) -> AppendOutcome {
    let outcomes = log
        .append(vec![append])
        .await
        .expect("the append is answered");
    assert_eq!(outcomes.len(), 1, "one outcome per append");
    outcomes[0]
}

/// Reads the whole log (as a follower would) until it holds `at_least` events of `filter`.
async fn read_everything(
    log: &dyn EventLog,
    filter: LogFilter,
    at_least: usize,
) -> Vec<super::RecordedEvent> {
    let deadline = tokio::time::Instant::now() + VISIBLE_WITHIN;
    let mut seen = Vec::new();
    let mut after = LogPosition::START;
    loop {
        let batch = log.read_all(after, 7, filter).await.expect("the log reads");
        if let Some(last) = batch.last() {
            after = last.position;
            seen.extend(batch);
            continue;
        }
        if seen.len() >= at_least {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {at_least} events became visible",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A stream read for the audit trail returns each event with the id, metadata and position it
/// was written and committed with, in stream order, after the version asked for.
pub async fn a_stream_reads_back_with_ids_times_and_metadata(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    let before = chrono::Utc::now() - chrono::TimeDelta::minutes(5);
    one(&*log, append(&stream, 0, "t1", 2)).await;
    one(&*log, append(&stream, 2, "t2", 1)).await;
    one(
        &*log,
        append(&super::conformance::stream(OTHER_KIND), 0, "elsewhere", 1),
    )
    .await;

    let read = log
        .read_stream_recorded(&stream, 0)
        .await
        .expect("the stream reads");
    assert_eq!(
        read.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3],
        "this stream's events only, in order"
    );
    let written: Vec<_> = events("t1", "Tested", 2)
        .into_iter()
        .chain(events("t2", "Tested", 1))
        .collect();
    for (recorded, written) in read.iter().zip(&written) {
        assert_eq!(recorded.stream, stream);
        assert_eq!(recorded.event_id, written.event_id);
        assert_eq!(recorded.metadata, written.metadata);
        assert_eq!(recorded.event_type, written.event_type);
        // The same JSON (PostgreSQL's jsonb keeps its own key order).
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
        assert_eq!(json(&recorded.payload), json(&written.payload));
        assert!(
            recorded.recorded_at > before,
            "recorded at {}",
            recorded.recorded_at
        );
    }
    let followed = read_everything(&*log, LogFilter::aggregate(KIND), 3).await;
    assert_eq!(
        read.iter().map(|e| e.position).collect::<Vec<_>>(),
        followed.iter().map(|e| e.position).collect::<Vec<_>>(),
        "the positions followers see"
    );
    let tail = log
        .read_stream_recorded(&stream, 2)
        .await
        .expect("the tail reads");
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].event_id, written[2].event_id);
    assert!(
        log.read_stream_recorded(&super::conformance::stream(KIND), 0)
            .await
            .expect("an unknown stream reads")
            .is_empty()
    );
}

/// Appends come back from the stream and from the log, in order, with what was written.
pub async fn appends_read_back_in_order(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    let first = one(&*log, append(&stream, 0, "c1", 2)).await;
    let AppendOutcome::Appended { version, position } = first else {
        panic!("a new stream takes an append at version 0: {first:?}");
    };
    assert_eq!(version, 2);
    let second = one(&*log, append(&stream, 2, "c2", 1)).await;
    let AppendOutcome::Appended {
        version: version_after,
        position: second_position,
    } = second
    else {
        panic!("the next version takes an append: {second:?}");
    };
    assert_eq!(version_after, 3);
    assert!(second_position > position, "positions grow with commits");

    let read = log.read_stream(&stream, 0).await.expect("the stream reads");
    assert_eq!(
        read.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        read[0].payload.replace(' ', ""),
        r#"{"command":"c1","index":0}"#
    );
    assert_eq!(read[2].event_type, "Tested");
    let tail = log.read_stream(&stream, 2).await.expect("the tail reads");
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].sequence, 3);

    let all = read_everything(&*log, LogFilter::ALL, 3).await;
    assert_eq!(all.len(), 3, "exactly the appended events: {all:?}");
    assert!(
        all.windows(2)
            .all(|pair| pair[0].position < pair[1].position)
    );
    assert_eq!(
        all[1].position, position,
        "an append returns its last event's position"
    );
    assert_eq!(all[2].position, second_position);
    assert_eq!(all[0].event_id, event_id("c1", 0));
    assert_eq!(all[2].metadata, metadata("c2"));
    assert_eq!(all[0].stream, stream);
    assert_eq!(
        all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

/// A writer that saw an older version conflicts, and nothing of its append is written.
pub async fn a_stale_expected_version_conflicts_and_writes_nothing(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    one(&*log, append(&stream, 0, "first", 1)).await;
    one(&*log, append(&stream, 1, "second", 1)).await;
    let stale = one(&*log, append(&stream, 1, "stale", 2)).await;
    assert_eq!(stale, AppendOutcome::Conflict);
    let fresh_stream = one(&*log, append(&stream, 0, "new-again", 1)).await;
    assert_eq!(
        fresh_stream,
        AppendOutcome::Conflict,
        "the stream is not new"
    );
    let read = log.read_stream(&stream, 0).await.expect("the stream reads");
    assert_eq!(read.len(), 2, "the conflicting appends wrote nothing");
}

/// The same events appended again (a retry after a lost answer) are recognised and not written
/// twice; the retry learns where they are.
pub async fn a_retried_append_is_a_duplicate_and_writes_nothing(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    let written = one(&*log, append(&stream, 0, "once", 3)).await;
    let retried = one(&*log, append(&stream, 0, "once", 3)).await;
    let (Some(first), Some(again)) = (written.written(), retried.written()) else {
        panic!("both are written: {written:?}, {retried:?}");
    };
    assert!(
        matches!(retried, AppendOutcome::Duplicate { .. }),
        "{retried:?}"
    );
    assert_eq!(
        first, again,
        "the retry names the same version and position"
    );
    let read = log.read_stream(&stream, 0).await.expect("the stream reads");
    assert_eq!(read.len(), 3, "written once");
}

/// A different command at a version that is taken conflicts, even with the same event types and
/// payload shape: ids come from commands, so it cannot pass for a retry.
pub async fn another_command_at_the_same_version_conflicts(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    one(&*log, append(&stream, 0, "winner", 1)).await;
    let loser = one(&*log, append(&stream, 0, "loser", 1)).await;
    assert_eq!(loser, AppendOutcome::Conflict);
    let read = log.read_stream(&stream, 0).await.expect("the stream reads");
    assert_eq!(read.len(), 1);
    assert!(read[0].payload.contains("winner"));
}

/// A writer cannot leave a gap: an expected version beyond the stream's end conflicts.
pub async fn an_expected_version_beyond_the_end_conflicts(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    assert_eq!(
        one(&*log, append(&stream, 3, "gap", 1)).await,
        AppendOutcome::Conflict
    );
    one(&*log, append(&stream, 0, "first", 1)).await;
    assert_eq!(
        one(&*log, append(&stream, 2, "gap-again", 1)).await,
        AppendOutcome::Conflict
    );
    assert_eq!(log.read_stream(&stream, 0).await.expect("reads").len(), 1);
}

/// Appends passed together are independent: one conflicting does not undo the others.
pub async fn appends_in_one_call_succeed_or_fail_on_their_own(log: Arc<dyn EventLog>) {
    let taken = stream(KIND);
    one(&*log, append(&taken, 0, "taken", 1)).await;
    let (a, b) = (stream(KIND), stream(OTHER_KIND));
    let outcomes = log
        .append(vec![
            append(&a, 0, "a", 2),
            append(&taken, 0, "late", 1),
            append(&b, 0, "b", 1),
        ])
        .await
        .expect("answered");
    assert!(matches!(
        outcomes[0],
        AppendOutcome::Appended { version: 2, .. }
    ));
    assert_eq!(outcomes[1], AppendOutcome::Conflict);
    assert!(matches!(
        outcomes[2],
        AppendOutcome::Appended { version: 1, .. }
    ));
    assert_eq!(log.read_stream(&a, 0).await.expect("reads").len(), 2);
    assert_eq!(log.read_stream(&taken, 0).await.expect("reads").len(), 1);
    assert_eq!(log.read_stream(&b, 0).await.expect("reads").len(), 1);
}

/// A chained append is made only when every append it names came out written (now, or before
/// as a retry); otherwise it, and what is chained onto it, writes nothing and conflicts. A
/// made one's events come after its prerequisites' in the log. A chain naming a later append
/// is refused whole.
pub async fn a_chained_append_is_made_only_after_its_prerequisites(log: Arc<dyn EventLog>) {
    let (taken, retried) = (stream(KIND), stream(KIND));
    one(&*log, append(&taken, 0, "taken", 1)).await;
    one(&*log, append(&retried, 0, "retried", 1)).await;
    let source = stream(KIND);
    let [made, broken, broken_further, after_retry] = [(); 4].map(|()| stream(OTHER_KIND));
    let chain = |append: Append, after: &[usize]| Chained {
        append,
        after: after.to_vec(),
    };
    let outcomes = log
        .append_chained(vec![
            chain(append(&source, 0, "source", 2), &[]),
            chain(append(&taken, 0, "late", 1), &[]),
            chain(append(&made, 0, "made", 1), &[0]),
            chain(append(&broken, 0, "broken", 1), &[0, 1]),
            chain(append(&broken_further, 0, "broken-further", 1), &[3]),
            chain(append(&retried, 0, "retried", 1), &[]),
            chain(append(&after_retry, 0, "after-retry", 1), &[5]),
        ])
        .await
        .expect("answered");
    assert_eq!(outcomes.len(), 7, "one outcome per append: {outcomes:?}");
    let (Some((_, source_at)), Some((_, made_at))) = (outcomes[0].written(), outcomes[2].written())
    else {
        panic!("the source and what records it are written: {outcomes:?}");
    };
    assert!(
        made_at > source_at,
        "{made_at:?} is not after {source_at:?}"
    );
    assert_eq!(outcomes[1], AppendOutcome::Conflict);
    assert_eq!(
        outcomes[3],
        AppendOutcome::Conflict,
        "its prerequisite conflicted"
    );
    assert_eq!(
        outcomes[4],
        AppendOutcome::Conflict,
        "its prerequisite was not made"
    );
    assert!(
        matches!(outcomes[5], AppendOutcome::Duplicate { .. }),
        "{:?}",
        outcomes[5]
    );
    assert!(
        matches!(outcomes[6], AppendOutcome::Appended { version: 1, .. }),
        "a retried prerequisite is written: {:?}",
        outcomes[6]
    );
    for (stream, count) in [
        (&source, 2),
        (&taken, 1),
        (&made, 1),
        (&broken, 0),
        (&broken_further, 0),
        (&retried, 1),
        (&after_retry, 1),
    ] {
        let read = log.read_stream(stream, 0).await.expect("the stream reads");
        assert_eq!(read.len(), count, "{stream}");
    }
    let unwritten = stream(KIND);
    let refused = log
        .append_chained(vec![
            chain(append(&unwritten, 0, "first", 1), &[1]),
            chain(append(&stream(KIND), 0, "second", 1), &[]),
        ])
        .await;
    assert!(
        refused.is_err(),
        "a prerequisite after its dependent: {refused:?}"
    );
    assert!(
        log.read_stream(&unwritten, 0)
            .await
            .expect("reads")
            .is_empty()
    );
}

/// Many writers racing for one stream: every version is won by exactly one of them, the stream
/// has no gap and no event twice, and every loser was told it conflicted.
pub async fn racing_writers_of_one_stream_leave_it_whole(log: Arc<dyn EventLog>) {
    const WRITERS: usize = 8;
    const ATTEMPTS: usize = 12;
    let stream = stream(KIND);
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (log, stream) = (log.clone(), stream.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for attempt in 0..ATTEMPTS {
                let version = log.read_stream(&stream, 0).await.expect("reads").len() as u64;
                let command = format!("w{writer}-{attempt}");
                match one(&*log, append(&stream, version, &command, 2)).await {
                    AppendOutcome::Appended { .. } => won += 1,
                    AppendOutcome::Conflict => {}
                    duplicate => panic!("no command repeats, yet {duplicate:?}"),
                }
            }
            won
        }));
    }
    let mut won = 0;
    for task in tasks {
        won += task.await.expect("no writer panicked");
    }
    let read = log.read_stream(&stream, 0).await.expect("reads");
    assert_eq!(
        read.len(),
        won * 2,
        "every win is in the stream, nothing else"
    );
    assert!(
        read.iter()
            .enumerate()
            .all(|(index, event)| event.sequence == index as u64 + 1),
        "no gap"
    );
    // Each win's two events are adjacent and of one command.
    for pair in read.chunks(2) {
        let command = |payload: &str| payload.split('"').nth(3).map(str::to_owned);
        assert_eq!(command(&pair[0].payload), command(&pair[1].payload));
    }
}

/// A follower reading while many writers append sees every event exactly once, each stream's
/// events in their order, and never one below its checkpoint later (commit order).
pub async fn followers_read_every_commit_once_in_stream_order(log: Arc<dyn EventLog>) {
    const WRITERS: usize = 6;
    const APPENDS: usize = 20;
    let follower = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = LogPosition::START;
            let deadline = tokio::time::Instant::now() + VISIBLE_WITHIN * 3;
            while seen.len() < WRITERS * APPENDS {
                let batch = log
                    .read_all(after, 13, LogFilter::ALL)
                    .await
                    .expect("reads");
                match batch.last() {
                    Some(last) => {
                        assert!(last.position > after);
                        after = last.position;
                        seen.extend(batch);
                    }
                    None => {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "events went missing"
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            seen
        })
    };
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            let stream = stream(KIND);
            for version in 0..APPENDS {
                let outcome = one(
                    &*log,
                    append(&stream, version as u64, &format!("f{writer}-{version}"), 1),
                )
                .await;
                assert!(
                    matches!(outcome, AppendOutcome::Appended { .. }),
                    "{outcome:?}"
                );
            }
        }));
    }
    for writer in writers {
        writer.await.expect("no writer panicked");
    }
    let seen = follower.await.expect("the follower did not panic");
    assert_eq!(seen.len(), WRITERS * APPENDS, "every event once");
    let mut ids: Vec<Uuid> = seen.iter().map(|event| event.event_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), seen.len(), "no event twice");
    let mut next: HashMap<&StreamId, u64> = HashMap::new();
    for event in &seen {
        let expected = next.entry(&event.stream).or_insert(1);
        assert_eq!(event.sequence, *expected, "stream order in the log");
        *expected += 1;
    }
}

/// Filters select by aggregate type and by event type.
pub async fn filters_select_streams_and_event_types(log: Arc<dyn EventLog>) {
    let (accounts, transactions) = (stream(KIND), stream(OTHER_KIND));
    one(&*log, append(&accounts, 0, "a", 1)).await;
    one(
        &*log,
        Append {
            stream: transactions.clone(),
            expected_version: 0,
            events: [events("t1", "Created", 1), events("t2", "Checked", 1)].concat(),
        },
    )
    .await;
    let everything = read_everything(&*log, LogFilter::ALL, 3).await;
    assert_eq!(everything.len(), 3);
    let of_type = read_everything(&*log, LogFilter::aggregate(OTHER_KIND), 2).await;
    assert_eq!(of_type.len(), 2);
    assert!(of_type.iter().all(|event| event.stream == transactions));
    let of_event = read_everything(&*log, LogFilter::event(OTHER_KIND, "Checked"), 1).await;
    assert_eq!(of_event.len(), 1);
    assert_eq!(of_event[0].event_type, "Checked");
    assert_eq!(of_event[0].sequence, 2);
}

/// Subscribers are told when something commits.
pub async fn a_commit_wakes_subscribers(log: Arc<dyn EventLog>) {
    let mut wakeups = log.subscribe();
    wakeups.borrow_and_update();
    one(&*log, append(&stream(KIND), 0, "wake", 1)).await;
    tokio::time::timeout(VISIBLE_WITHIN, wakeups.changed())
        .await
        .expect("woken within the bound")
        .expect("the log is alive");
}

/// The head is the last committed event; lag counts what a checkpoint has not read.
pub async fn head_and_lag_follow_the_log(log: Arc<dyn EventLog>) {
    assert_eq!(log.head().await.expect("head"), LogPosition::START);
    let caught_up = log
        .lag(LogPosition::START, LogFilter::ALL)
        .await
        .expect("lag");
    assert_eq!(caught_up.events, 0);
    let stream = stream(KIND);
    one(&*log, append(&stream, 0, "h1", 1)).await;
    let AppendOutcome::Appended { position, .. } = one(&*log, append(&stream, 1, "h2", 2)).await
    else {
        panic!("appended");
    };
    assert_eq!(log.head().await.expect("head"), position);
    let behind = log
        .lag(LogPosition::START, LogFilter::ALL)
        .await
        .expect("lag");
    assert_eq!(behind.events, 3);
    let of_other = log
        .lag(LogPosition::START, LogFilter::aggregate(OTHER_KIND))
        .await
        .expect("lag");
    assert_eq!(of_other.events, 0, "a filter counts only its events");
    assert_eq!(
        log.lag(position, LogFilter::ALL).await.expect("lag").events,
        0
    );
}

/// A snapshot reads back; an older one never replaces a newer one of the same format, and a
/// new format replaces whatever is there.
pub async fn snapshots_only_move_forward(log: Arc<dyn EventLog>) {
    let stream = stream(KIND);
    assert_eq!(log.read_snapshot(&stream).await.expect("reads"), None);
    let snapshot = |version: u64, state_version: i32, state: &str| Snapshot {
        version,
        state_version,
        state: state.to_owned(),
    };
    log.write_snapshot(&stream, snapshot(100, 1, r#"{"at":100}"#))
        .await
        .expect("written");
    log.write_snapshot(&stream, snapshot(50, 1, r#"{"at":50}"#))
        .await
        .expect("answered");
    let read = log
        .read_snapshot(&stream)
        .await
        .expect("reads")
        .expect("kept");
    assert_eq!((read.version, read.state_version), (100, 1));
    assert_eq!(read.state.replace(' ', ""), r#"{"at":100}"#);
    log.write_snapshot(&stream, snapshot(40, 2, r#"{"v2":true}"#))
        .await
        .expect("written");
    let read = log
        .read_snapshot(&stream)
        .await
        .expect("reads")
        .expect("kept");
    assert_eq!((read.version, read.state_version), (40, 2));
}
