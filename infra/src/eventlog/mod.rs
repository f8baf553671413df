//! The event log seam: what the write side, the followers and the CLI need from an event store,
//! and nothing a particular database would add.
//!
//! - **Streams** (one per aggregate) take appends with an *expected version* (how many events the
//!   writer saw) and *writer-chosen event ids*. An append is atomic: all of its events or none.
//!   Appending the very same events again (same ids, same expected version) is recognised as a
//!   retry and writes nothing ([`AppendOutcome::Duplicate`]); another append at a version that is
//!   no longer current conflicts ([`AppendOutcome::Conflict`]). Event ids must therefore come from
//!   the deciding command, never from the stream and the version: otherwise a *different* command
//!   racing for the same version would look like a retry and its events would be lost.
//! - **The log** is every committed event in commit order. A follower reads it after its
//!   checkpoint ([`EventLog::read_all`]) and never misses an event that commits later with an
//!   earlier position. [`LogPosition`] is an opaque, totally ordered place in that order.
//! - **Wake-ups**: [`EventLog::subscribe`] says "something committed, look now". It is a hint,
//!   never the data: followers also poll, slowly, in case a wake-up was lost.
//! - **Snapshots** of aggregate states are a shortcut for loads; losing one costs a longer load.
//!
//! Several appends passed in one call, or by concurrent callers, may be committed together (a
//! group commit shares one database transaction and one fsync), but each append succeeds or
//! fails on its own: correctness never needs two streams, or an append and a checkpoint, to
//! commit together, because EventStoreDB cannot do that.
//!
//! Implementations: [`postgres::PgEventLog`] (PostgreSQL), [`sqlite::SqliteEventLog`] (the
//! embedded mode) and, behind the `kurrentdb` feature, `kurrentdb::KurrentDbEventLog`.
//! [`conformance`] is the one test suite every implementation passes.

pub mod choice;
pub mod committer;
#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "kurrentdb")]
pub mod kurrentdb;
pub mod postgres;
pub mod sqlite;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::Result;
pub use crate::log::{Lag, LogPosition};

/// One aggregate's stream: its type (`account`, `transaction`) and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    pub aggregate_type: String,
    pub aggregate_id: String,
}

impl StreamId {
    pub fn new(aggregate_type: &str, aggregate_id: impl Into<String>) -> Self {
        StreamId {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// The metadata every event carries (SPEC §4): who acted, on which command, caused by what,
/// within which correlation. Stored as a JSON object with exactly these keys; events written
/// before a key existed read it as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Follows a request through every service and event (SPEC §6).
    #[serde(default)]
    pub correlation_id: String,
    /// What caused this command: the request's command id, or the event the saga reacted to.
    #[serde(default)]
    pub causation_id: String,
    /// The acting `sub`, or a service's name for steps taken on its own (`saga`, `fraud-worker`).
    #[serde(default)]
    pub actor: String,
    /// The deciding command's id; the event ids are derived from it.
    #[serde(default)]
    pub command_id: String,
}

/// Namespace of event ids derived from command ids. Fixed forever: a retried command must derive
/// the ids it derived the first time.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6576_656e_742d_4964_8000_636f_6d6d_616e);

/// The id of the `index`-th event (from 0) a command appends: UUIDv5 of the command id and the
/// index, so a retry of the same command appends the same ids (and is recognised as a retry),
/// and two different commands never share one.
pub fn event_id(command_id: &str, index: usize) -> Uuid {
    Uuid::new_v5(
        &EVENT_ID_NAMESPACE,
        format!("{command_id}/{index}").as_bytes(),
    )
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Writer-chosen: derived from the deciding command ([`event_id`]).
    pub event_id: Uuid,
    pub event_type: String,
    pub event_version: String,
    /// The payload as JSON text.
    pub payload: String,
    pub metadata: EventMetadata,
}

/// Events to append to one stream, atomically, if it holds exactly `expected_version` events.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub stream: StreamId,
    /// How many events the stream holds now, as the writer saw it (0: the stream is new).
    pub expected_version: u64,
    /// At least one.
    pub events: Vec<NewEvent>,
}

/// What became of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Written now. `version` is the stream's version after it; `position` the last event's.
    Appended { version: u64, position: LogPosition },
    /// These very events (the same ids at the same versions) were already in the stream: a
    /// retry of an append that had succeeded. Nothing was written.
    Duplicate { version: u64, position: LogPosition },
    /// The stream does not hold exactly `expected_version` events (another writer got there
    /// first). Nothing was written; decide again on the fresh state.
    Conflict,
}

impl AppendOutcome {
    /// The version and position of the appended events, whether written now or before.
    pub fn written(self) -> Option<(u64, LogPosition)> {
        match self {
            AppendOutcome::Appended { version, position }
            | AppendOutcome::Duplicate { version, position } => Some((version, position)),
            AppendOutcome::Conflict => None,
        }
    }
}

/// An append made only if the earlier appends of the same call it names come out written
/// ([`EventLog::append_chained`]): how a writer says "these events record those", so that the
/// recording never lands without what it records.
#[derive(Debug, Clone, PartialEq)]
pub struct Chained {
    pub append: Append,
    /// Indexes, in the same call, of earlier appends that must come out written (appended now
    /// or before: [`AppendOutcome::written`]) for this one to be made.
    pub after: Vec<usize>,
}

impl Chained {
    /// An append with no prerequisite.
    pub fn alone(append: Append) -> Self {
        Chained {
            append,
            after: Vec::new(),
        }
    }
}

/// Refuses a chain whose prerequisite is not an earlier append of the call.
pub(crate) fn check_chain(appends: &[Chained]) -> Result<()> {
    for (index, chained) in appends.iter().enumerate() {
        if let Some(wrong) = chained.after.iter().find(|&&before| before >= index) {
            return Err(crate::error::Error::Config(format!(
                "the append to {} at {index} names {wrong} as its prerequisite, which does not \
                 come before it",
                chained.append.stream
            )));
        }
    }
    Ok(())
}

/// Whether every prerequisite of an append came out written, given the outcomes so far.
pub(crate) fn prerequisites_written(after: &[usize], written: &[bool]) -> bool {
    after
        .iter()
        .all(|&before| written.get(before).copied().unwrap_or(false))
}

/// An event of one stream, as an aggregate load needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// The event's version in its stream, from 1.
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    /// JSON text.
    pub payload: String,
}

/// A committed event as followers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: LogPosition,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub stream: StreamId,
    /// The event's version in its stream, from 1.
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    /// JSON text.
    pub payload: String,
    pub metadata: EventMetadata,
}

/// Which events a follower reads. An empty filter reads everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub aggregate_type: Option<&'static str>,
    pub event_type: Option<&'static str>,
}

impl LogFilter {
    pub const ALL: LogFilter = LogFilter {
        aggregate_type: None,
        event_type: None,
    };

    pub const fn aggregate(aggregate_type: &'static str) -> Self {
        LogFilter {
            aggregate_type: Some(aggregate_type),
            event_type: None,
        }
    }

    pub const fn event(aggregate_type: &'static str, event_type: &'static str) -> Self {
        LogFilter {
            aggregate_type: Some(aggregate_type),
            event_type: Some(event_type),
        }
    }

    pub fn matches(&self, stream: &StreamId, event_type: &str) -> bool {
        self.aggregate_type
            .is_none_or(|kind| kind == stream.aggregate_type)
            && self.event_type.is_none_or(|kind| kind == event_type)
    }
}

/// A stored aggregate state after `version` events, in the format `state_version` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub state_version: i32,
    /// JSON text.
    pub state: String,
}

/// Says "something committed": a counter that moves with every commit this process made or
/// heard of. Followers wait on it between reads (and poll slowly in case one was lost).
pub type Wakeups = watch::Receiver<u64>;

/// The event store as the ledger uses it. See the module documentation for the contract.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends each append atomically and independently; outcomes come back in the same order.
    /// An error means the outcome is unknown (the database went away mid-commit): a retry of the
    /// same appends is safe, it will find them written ([`AppendOutcome::Duplicate`]) or write them.
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<AppendOutcome>>;

    /// As [`EventLog::append`], except that an append is made only if each earlier append it
    /// names ([`Chained::after`]) comes out written (appended now, or before); otherwise it is
    /// not attempted and comes back as [`AppendOutcome::Conflict`], with nothing written. The
    /// events of a chained append always come after its prerequisites' in the log.
    ///
    /// A shortcut, never a need: correctness must hold with every link committed on its own,
    /// in order, which is what this default does (one [`EventLog::append`] per link). PostgreSQL
    /// and SQLite override it to commit the whole chain in one batch, so a writer that records
    /// a step after the accounts it moved waits for one durable write instead of two.
    async fn append_chained(&self, appends: Vec<Chained>) -> Result<Vec<AppendOutcome>> {
        check_chain(&appends)?;
        // Each append's link: 0 without prerequisites, else one past its furthest one's.
        let mut links: Vec<usize> = Vec::with_capacity(appends.len());
        for chained in &appends {
            let link = chained
                .after
                .iter()
                .map(|&before| links[before] + 1)
                .max()
                .unwrap_or(0);
            links.push(link);
        }
        let mut outcomes = vec![AppendOutcome::Conflict; appends.len()];
        let mut written = vec![false; appends.len()];
        let last = links.iter().copied().max().unwrap_or(0);
        for link in 0..=last {
            let now: Vec<usize> = (0..appends.len())
                .filter(|&index| links[index] == link)
                .filter(|&index| prerequisites_written(&appends[index].after, &written))
                .collect();
            if now.is_empty() {
                continue;
            }
            let batch = now
                .iter()
                .map(|&index| appends[index].append.clone())
                .collect();
            for (index, outcome) in now.into_iter().zip(self.append(batch).await?) {
                written[index] = outcome.written().is_some();
                outcomes[index] = outcome;
            }
        }
        Ok(outcomes)
    }

    /// The events of `stream` after version `after` (0: all), in order.
    async fn read_stream(&self, stream: &StreamId, after: u64) -> Result<Vec<StreamEvent>>;

    /// The events of `stream` after version `after`, in order, with everything stored about
    /// them (ids, times, metadata, positions): the audit trail's read. Aggregate loads, the hot
    /// path, use [`EventLog::read_stream`], which leaves those out.
    async fn read_stream_recorded(
        &self,
        stream: &StreamId,
        after: u64,
    ) -> Result<Vec<RecordedEvent>>;

    /// Up to `limit` committed events after `after` that match `filter`, in commit order. An
    /// empty answer means "nothing more is visible yet", not "the end".
    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: LogFilter,
    ) -> Result<Vec<RecordedEvent>>;

    /// The position of the last committed event (`LogPosition::START` for an empty log).
    async fn head(&self) -> Result<LogPosition>;

    /// How far `checkpoint` is behind the log, counting the events `filter` matches.
    async fn lag(&self, checkpoint: LogPosition, filter: LogFilter) -> Result<Lag>;

    /// Wake-ups for followers: moves after every commit this log makes or hears of.
    fn subscribe(&self) -> Wakeups;

    /// Whether [`EventLog::subscribe`] moves after every commit of the log, whichever process
    /// made it, once the commit is readable. Then a follower whose read came back short has
    /// caught up and may wait for the next wake-up (decision 68); otherwise (a PostgreSQL writer
    /// that does not listen hears only its own commits) it must look again, or another
    /// process's commits would wait for the poll interval.
    fn wakes_on_every_commit(&self) -> bool {
        false
    }

    /// The newest snapshot of `stream`, if any.
    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>>;

    /// Stores a snapshot, unless a newer one (by version) of the same format is stored.
    async fn write_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<()>;

    /// What `/health` calls this dependency, and whether it answers now.
    async fn ping(&self) -> bool;
}

/// The two stream types of the ledger as postgres-es and sqlite-es want them: their repositories
/// are generic over a cqrs-es `Aggregate` but only use its `TYPE`, so these carry nothing else.
mod streams {
    use std::convert::Infallible;

    use cqrs_es::event_sink::EventSink;
    use cqrs_es::{Aggregate, DomainEvent};
    use serde::{Deserialize, Serialize};

    /// Any stored payload, unread.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct AnyEvent(serde_json::Value);

    impl DomainEvent for AnyEvent {
        fn event_type(&self) -> String {
            String::new()
        }
        fn event_version(&self) -> String {
            String::new()
        }
    }

    macro_rules! stream_type {
        ($name:ident, $type_name:literal) => {
            #[derive(Debug, Default, Serialize, Deserialize)]
            pub struct $name;

            impl $name {
                pub const TYPE_NAME: &'static str = $type_name;
            }

            impl Aggregate for $name {
                const TYPE: &'static str = $type_name;
                type Command = ();
                type Event = AnyEvent;
                type Error = Infallible;
                type Services = ();

                async fn handle(
                    &mut self,
                    _command: (),
                    _services: &(),
                    _sink: &EventSink<Self>,
                ) -> Result<(), Infallible> {
                    Ok(())
                }

                fn apply(&mut self, _event: AnyEvent) {}
            }
        };
    }

    stream_type!(AccountStream, "account");
    stream_type!(TransactionStream, "transaction");
}
