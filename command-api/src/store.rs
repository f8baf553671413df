//! The store façade: aggregates in, domain states out. Handlers, the saga and the decision
//! consumer ask it to run a command on a stream and get back what happened
//! ([`Executed::Appended`], [`Executed::Unchanged`] or [`Executed::Refused`]), never a cqrs-es
//! wrapper or a nested `Result`.
//!
//! Under it sit the cqrs-es aggregates (the domain's `decide` and `apply` behind `handle`) and
//! the [`EventLog`] seam. It keeps streams cheap:
//! - an in-process cache of recently used aggregates, holding the state *after* a known version,
//!   filled by loads, by this process's own appends and by the saga from the log it follows
//!   ([`AggregateStore::observe`]);
//! - snapshots written every [`SNAPSHOT_EVERY`] events from the state `handle` already produced
//!   (never re-applying events: cqrs-es 0.5's snapshot modes do, NOTES), for cold loads.
//!
//! A command is decided on the cached state without reading the database. That is safe because
//! only an append can act on it, and an append carries the version it was decided at: a stale
//! cache conflicts, is refreshed, and the command is decided again (bounded, jittered), so a
//! conflict never reaches a client. A refusal or a no-op decided on a cached state is checked
//! against a fresh load before it is believed, since a stale state could refuse what the real
//! one allows.
//!
//! Writers of one stream within this process do not race each other: while an append to a
//! stream is in flight ([`AggregateStore::writing`]), a command on that stream waits for its
//! outcome and decides on the state after it (decision 56).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_es::Aggregate;
use cqrs_es::event_sink::EventSink;
use infra::codec::{StoredEvent, decode_stream_event, encode};
use infra::eventlog::{
    Append, AppendOutcome, EventLog, EventMetadata, LogPosition, Snapshot, StreamId,
};
use lru::LruCache;
use rand::Rng;
use tokio::sync::Notify;

use crate::error::{Error, Result};

/// A snapshot is written each time a stream crosses a multiple of this many events, so a cold
/// load reads at most this many events past its snapshot. 100 keeps snapshot writes at 1 % of
/// appends while bounding a cold load to ~100 small JSON rows.
pub const SNAPSHOT_EVERY: u64 = 100;

/// Streams kept in the in-process cache. An account's state is a few hundred bytes plus its open
/// holds, a transaction's about as much, so 50,000 streams stay within tens of megabytes while
/// covering every transaction in flight at thousands per second.
pub const CACHE_STREAMS_MAX: usize = 50_000;

/// How many times a command is decided again after a write conflict before giving up. Writers
/// of one stream are serialised in-process, so conflicts only come from other instances or a
/// stale cache; 32 jittered attempts outlast any realistic burst.
const CONFLICT_ATTEMPTS_MAX: u32 = 32;

/// Follow-on commands chained onto one ([`AggregateStore::execute_then`]) at most: a bound on a
/// `follow` that never says "enough". The ledger's chains are one step long.
const FOLLOW_ONS_MAX: usize = 4;

/// How long a command waits for an append of this process in flight on its stream before it
/// decides anyway: past the committer's own deadline, so only a stuck append is given up on.
pub const WRITERS_WAIT_MAX: Duration = Duration::from_secs(3);

/// An aggregate whose events are a domain event type of the stored format.
pub trait StreamAggregate:
    Aggregate<Services = (), Command: Clone + Send + Sync, Event: Send + Sync, Error: Send + Sync>
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The format version of a snapshot's state. A snapshot of another format is ignored (the
    /// stream is replayed), so changing a state type only needs this bumped.
    const STATE_VERSION: i32;
    /// The domain event stored in this aggregate's streams.
    type Stored: StoredEvent + Clone + Send + Sync;
    fn stored(event: &Self::Event) -> &Self::Stored;
    fn record(event: Self::Stored) -> Self::Event;
}

/// What running a command did.
#[derive(Debug)]
pub enum Executed<A: Aggregate> {
    /// The command's events are in the stream: `state` and `version` after them, `position` of
    /// the last one. `replayed` when an earlier attempt of the same command had written them.
    Appended {
        state: A,
        version: u64,
        position: LogPosition,
        replayed: bool,
    },
    /// The command changed nothing (a repeated step, a replayed request), decided on a fresh
    /// state.
    Unchanged { state: A, version: u64 },
    /// The aggregate refused the command, decided on a fresh state.
    Refused(A::Error),
}

/// Events decided for one stream, to append in a batch with other streams' ([`AggregateStore::append_all`]).
pub struct Pending<A: StreamAggregate> {
    pub id: String,
    /// The version the events were decided at.
    pub expected_version: u64,
    /// The state after them.
    pub state_after: A,
    /// Each deciding command's events, with its metadata (the event ids derive from it).
    pub decisions: Vec<(Vec<A::Stored>, EventMetadata)>,
}

/// Which shortcuts a store takes.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    pub cache: bool,
    pub snapshots: bool,
}

pub struct AggregateStore<A: StreamAggregate> {
    log: Arc<dyn EventLog>,
    options: StoreOptions,
    cache: Mutex<LruCache<String, (A, u64)>>,
    /// Streams this process has an append in flight for: how many, and how to hear they were
    /// all answered ([`AggregateStore::writing`]).
    writing: Mutex<HashMap<String, (usize, Arc<Notify>)>>,
}

/// Registers appends in flight on streams of a store until dropped, after their outcomes were
/// taken into the cache; then wakes whoever waits to decide on those streams.
pub struct Writing<'a, A: StreamAggregate> {
    store: &'a AggregateStore<A>,
    ids: Vec<String>,
}

impl<A: StreamAggregate> Drop for Writing<'_, A> {
    fn drop(&mut self) {
        let mut writing = lock(&self.store.writing);
        for id in &self.ids {
            if let Some((count, _)) = writing.get_mut(id) {
                *count -= 1;
                if *count == 0
                    && let Some((_, done)) = writing.remove(id)
                {
                    done.notify_waiters();
                }
            }
        }
    }
}

impl<A: StreamAggregate> AggregateStore<A> {
    /// The store the services use: cache and snapshots on.
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self::with_options(
            log,
            StoreOptions {
                cache: true,
                snapshots: true,
            },
        )
    }

    /// A store that replays every stream from its first event on every load: the reference the
    /// shortcuts are tested and measured against.
    pub fn full_replay(log: Arc<dyn EventLog>) -> Self {
        Self::with_options(
            log,
            StoreOptions {
                cache: false,
                snapshots: false,
            },
        )
    }

    /// A store that uses snapshots but no cache: what a freshly started instance sees.
    pub fn snapshots_only(log: Arc<dyn EventLog>) -> Self {
        Self::with_options(
            log,
            StoreOptions {
                cache: false,
                snapshots: true,
            },
        )
    }

    pub fn with_options(log: Arc<dyn EventLog>, options: StoreOptions) -> Self {
        let capacity = NonZeroUsize::new(CACHE_STREAMS_MAX).expect("the cache bound is not zero");
        AggregateStore {
            log,
            options,
            cache: Mutex::new(LruCache::new(capacity)),
            writing: Mutex::new(HashMap::new()),
        }
    }

    /// Marks appends to streams `ids` as in flight until the guard is dropped: a command on one
    /// of them ([`AggregateStore::execute`]) waits for their outcomes before it decides, rather
    /// than decide on the state they are replacing and conflict (decision 56). Drop the guard
    /// after the outcomes are in the cache ([`AggregateStore::after_outcomes`]).
    pub fn writing<'a>(&'a self, ids: impl IntoIterator<Item = String>) -> Writing<'a, A> {
        let ids: Vec<String> = ids.into_iter().collect();
        let mut writing = lock(&self.writing);
        for id in &ids {
            writing
                .entry(id.clone())
                .or_insert_with(|| (0, Arc::new(Notify::new())))
                .0 += 1;
        }
        Writing { store: self, ids }
    }

    /// Waits, at most [`WRITERS_WAIT_MAX`], until no append of this process to stream `id` is
    /// in flight. A shortcut, not a lock: whatever is decided after it is still checked by the
    /// append's expected version.
    async fn wait_for_writers(&self, id: &str) {
        let Some(done) = lock(&self.writing).get(id).map(|(_, done)| done.clone()) else {
            return;
        };
        let answered = done.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if !lock(&self.writing).contains_key(id) {
            return;
        }
        metrics::counter!("event_store_writer_waits_total", "aggregate" => A::TYPE).increment(1);
        let _ = tokio::time::timeout(WRITERS_WAIT_MAX, answered).await;
    }

    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    fn stream(id: &str) -> StreamId {
        StreamId::new(A::TYPE, id)
    }

    /// The state of a stream and its version (the default state and 0 when it has no events),
    /// from the cache when it holds it: it may lag behind another instance's writes, which an
    /// append would notice.
    pub async fn load(&self, id: &str) -> Result<(A, u64)> {
        match self.cached(id) {
            Some(entry) => Ok(entry),
            None => self.load_fresh(id).await,
        }
    }

    /// Like [`AggregateStore::load`], also saying whether the state was read from the log now
    /// (`true`) or came from the cache (`false`).
    pub async fn load_marked(&self, id: &str) -> Result<(A, u64, bool)> {
        match self.cached(id) {
            Some((state, version)) => Ok((state, version, false)),
            None => {
                let (state, version) = self.load_fresh(id).await?;
                Ok((state, version, true))
            }
        }
    }

    /// The state of a stream as the log holds it now.
    pub async fn load_fresh(&self, id: &str) -> Result<(A, u64)> {
        let (mut state, mut version) = match self.cached(id) {
            Some(entry) => entry,
            None if self.options.snapshots => self.read_snapshot(id).await?.unwrap_or_default(),
            None => (A::default(), 0),
        };
        let tail = self.log.read_stream(&Self::stream(id), version).await?;
        for event in tail {
            let stored = decode_stream_event::<A::Stored>(&event).map_err(|problem| {
                Error::UnreadableEvent {
                    stream: format!("{}/{id}", A::TYPE),
                    event_type: event.event_type.clone(),
                    event_version: event.event_version.clone(),
                    problem,
                }
            })?;
            version = event.sequence;
            state.apply(A::record(stored));
        }
        // An empty stream is not remembered: it may be created by the next request.
        if version > 0 {
            self.remember(id, &state, version);
        }
        Ok((state, version))
    }

    /// Decides `command` on `state` with the aggregate's own `handle`: the state after the
    /// events, and the events; or the aggregate's refusal.
    pub async fn decide(state: &A, command: A::Command) -> Result<(A, Vec<A::Stored>), A::Error> {
        let mut next = state.clone();
        let sink = EventSink::default();
        next.handle(command, &(), &sink).await?;
        let events = sink
            .collect()
            .await
            .iter()
            .map(|event| A::stored(event).clone())
            .collect();
        Ok((next, events))
    }

    /// Runs `command` on stream `id` (see the module documentation).
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<Executed<A>> {
        self.execute_then(id, command, metadata, |_: &A| None).await
    }

    /// As [`AggregateStore::execute`], then decides on the state after `command`'s events
    /// whatever `follow` names next, and again after those, appending every event decided in
    /// one append: a chain of steps that costs one durable write. A follow-on that is refused or
    /// changes nothing ends the chain; it never fails the command. Each follow-on carries its
    /// own metadata (its event ids derive from its own command id).
    pub async fn execute_then<F>(
        &self,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        follow: F,
    ) -> Result<Executed<A>>
    where
        F: Fn(&A) -> Option<(A::Command, EventMetadata)>,
    {
        self.wait_for_writers(id).await;
        let (state, version) = match self.cached(id) {
            Some(entry) => (entry, false),
            None => (self.load_fresh(id).await?, true),
        };
        self.execute_from(id, command, metadata, state, version, follow)
            .await
    }

    /// Runs a command that starts a stream, assuming at first that the stream is new (no read);
    /// if it is not, the command is decided again on what it holds.
    pub async fn execute_new(
        &self,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<Executed<A>> {
        self.execute_from(id, command, metadata, (A::default(), 0), false, |_: &A| {
            None
        })
        .await
    }

    async fn execute_from<F>(
        &self,
        id: &str,
        command: A::Command,
        metadata: &EventMetadata,
        (mut state, mut version): (A, u64),
        mut fresh: bool,
        follow: F,
    ) -> Result<Executed<A>>
    where
        F: Fn(&A) -> Option<(A::Command, EventMetadata)>,
    {
        for attempt in 0..CONFLICT_ATTEMPTS_MAX {
            let decided = Self::decide(&state, command.clone()).await;
            // Only an append is checked by the log; a refusal or a no-op decided on a cached
            // state is decided again on a fresh one before it is believed.
            let believable = fresh || matches!(&decided, Ok((_, events)) if !events.is_empty());
            if !believable {
                (state, version) = self.load_fresh(id).await?;
                fresh = true;
                continue;
            }
            let (next, events) = match decided {
                Err(refusal) => return Ok(Executed::Refused(refusal)),
                Ok((next, events)) if events.is_empty() => {
                    return Ok(Executed::Unchanged {
                        state: next,
                        version,
                    });
                }
                Ok(decided) => decided,
            };
            let mut decisions = vec![(events, metadata.clone())];
            let mut next = next;
            for _ in 0..FOLLOW_ONS_MAX {
                let Some((command, metadata)) = follow(&next) else {
                    break;
                };
                match Self::decide(&next, command).await {
                    Ok((after, events)) if !events.is_empty() => {
                        decisions.push((events, metadata));
                        next = after;
                    }
                    _ => break,
                }
            }
            let pending = Pending {
                id: id.to_owned(),
                expected_version: version,
                state_after: next,
                decisions,
            };
            let state_after = pending.state_after.clone();
            let outcome = self.append_all(vec![pending]).await?;
            match outcome[0] {
                AppendOutcome::Appended {
                    version: after,
                    position,
                } => {
                    return Ok(Executed::Appended {
                        state: state_after,
                        version: after,
                        position,
                        replayed: false,
                    });
                }
                AppendOutcome::Duplicate { .. } => {
                    // Written by an earlier attempt of this command, maybe with other
                    // timestamps: read what is stored.
                    let (state, after) = self.load_fresh(id).await?;
                    let position = outcome[0].written().map(|(_, position)| position);
                    return Ok(Executed::Appended {
                        state,
                        version: after,
                        position: position.unwrap_or(LogPosition::START),
                        replayed: true,
                    });
                }
                AppendOutcome::Conflict => {
                    metrics::counter!("event_store_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    if attempt > 0 {
                        tokio::time::sleep(conflict_backoff(attempt)).await;
                    }
                    (state, version) = self.load_fresh(id).await?;
                    fresh = true;
                }
            }
        }
        Err(Error::ConflictsExhausted {
            stream: format!("{}/{id}", A::TYPE),
            attempts: CONFLICT_ATTEMPTS_MAX,
        })
    }

    /// Appends several streams' decided events in one call (one group commit), remembering the
    /// states of those written. Outcomes come back in order; a conflicting stream is forgotten,
    /// so its next load reads the log.
    pub async fn append_all(&self, pending: Vec<Pending<A>>) -> Result<Vec<AppendOutcome>> {
        let appends = Self::encode_all(&pending)?;
        let _writing = self.writing(pending.iter().map(|item| item.id.clone()));
        let outcomes = match self.log.append(appends).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                self.forget_unknown(&pending);
                return Err(error.into());
            }
        };
        self.after_outcomes(pending, &outcomes).await;
        Ok(outcomes)
    }

    /// The appends of decided events, for a caller that writes them together with another
    /// store's ([`EventLog::append_chained`]); then [`AggregateStore::after_outcomes`], or
    /// [`AggregateStore::forget_unknown`] if the write failed.
    pub fn encode_all(pending: &[Pending<A>]) -> Result<Vec<Append>> {
        let mut appends = Vec::with_capacity(pending.len());
        for item in pending {
            let mut events = Vec::new();
            for (decided, metadata) in &item.decisions {
                events.extend(encode(decided, metadata).map_err(|problem| Error::Store {
                    context: "encoding events",
                    message: problem,
                })?);
            }
            appends.push(Append {
                stream: Self::stream(&item.id),
                expected_version: item.expected_version,
                events,
            });
        }
        Ok(appends)
    }

    /// Remembers the states of the streams written; forgets those that were not.
    pub async fn after_outcomes(&self, pending: Vec<Pending<A>>, outcomes: &[AppendOutcome]) {
        for (item, outcome) in pending.into_iter().zip(outcomes) {
            match outcome {
                AppendOutcome::Appended { version, .. } => {
                    self.after_append(&item.id, item.expected_version, item.state_after, *version)
                        .await;
                }
                AppendOutcome::Duplicate { .. } | AppendOutcome::Conflict => self.forget(&item.id),
            }
        }
    }

    /// After a write whose outcome is unknown: the events may be in the log, so no cached state
    /// of these streams can be trusted any more.
    pub fn forget_unknown(&self, pending: &[Pending<A>]) {
        for item in pending {
            self.forget(&item.id);
        }
    }

    /// Advances the cached state of `id` by an event read from the log, when the cache holds the
    /// state right before it; otherwise leaves the cache alone (a later load reads the log).
    ///
    /// It never creates an entry: a follower replaying the log behind its streams' heads (after
    /// a restart, its checkpoint behind what it had done) would otherwise cache a state older
    /// than its own later events, and the saga decides account steps from those states.
    pub fn observe(&self, id: &str, sequence: u64, event: &A::Stored) {
        if !self.options.cache {
            return;
        }
        let mut cache = lock(&self.cache);
        let advanced = match cache.peek_mut(id) {
            Some((state, version)) if *version + 1 == sequence => {
                state.apply(A::record(event.clone()));
                *version = sequence;
                true
            }
            Some((_, version)) if *version >= sequence => true,
            Some(_) => false,
            None => true,
        };
        if !advanced {
            // A gap: something was missed; the next load reads the log.
            cache.pop(id);
        }
    }

    /// Drops a stream from the cache.
    pub fn forget(&self, id: &str) {
        lock(&self.cache).pop(id);
    }

    /// Drops every cached stream (a new leader starts from the log).
    pub fn forget_all(&self) {
        lock(&self.cache).clear();
    }

    fn cached(&self, id: &str) -> Option<(A, u64)> {
        if !self.options.cache {
            return None;
        }
        lock(&self.cache).get(id).cloned()
    }

    /// Caches `state` at `version`, unless a newer state of the stream is already cached: the
    /// cache only moves forward. A load that read the log before another task's append and
    /// finishes after it would otherwise put an older state back, and a step decided on it
    /// could find "already done" what the log holds as not done yet.
    fn remember(&self, id: &str, state: &A, version: u64) {
        if !self.options.cache {
            return;
        }
        let mut cache = lock(&self.cache);
        match cache.get_mut(id) {
            Some((_, cached)) if *cached > version => {}
            Some(entry) => *entry = (state.clone(), version),
            None => {
                cache.put(id.to_owned(), (state.clone(), version));
            }
        }
    }

    async fn after_append(&self, id: &str, before: u64, state: A, after: u64) {
        if self.options.snapshots && after / SNAPSHOT_EVERY > before / SNAPSHOT_EVERY {
            // The events are committed; a failed snapshot only costs a longer load later.
            if let Err(error) = self.write_snapshot(id, &state, after).await {
                tracing::warn!(stream = %id, error.message = %error, "snapshot not written");
            }
        }
        self.remember(id, &state, after);
    }

    async fn read_snapshot(&self, id: &str) -> Result<Option<(A, u64)>> {
        let Some(snapshot) = self.log.read_snapshot(&Self::stream(id)).await? else {
            return Ok(None);
        };
        if snapshot.state_version != A::STATE_VERSION {
            return Ok(None);
        }
        match serde_json::from_str::<A>(&snapshot.state) {
            Ok(state) => Ok(Some((state, snapshot.version))),
            Err(error) => {
                tracing::warn!(stream = %id, error.message = %error, "unreadable snapshot ignored");
                Ok(None)
            }
        }
    }

    async fn write_snapshot(&self, id: &str, state: &A, version: u64) -> Result<()> {
        let state = serde_json::to_string(state).map_err(|error| Error::Store {
            context: "serialising a snapshot",
            message: error.to_string(),
        })?;
        self.log
            .write_snapshot(
                &Self::stream(id),
                Snapshot {
                    version,
                    state_version: A::STATE_VERSION,
                    state,
                },
            )
            .await?;
        Ok(())
    }
}

fn conflict_backoff(attempt: u32) -> Duration {
    let ceiling_ms = 2_u64.saturating_pow(attempt.min(6)).min(50);
    Duration::from_millis(rand::rng().random_range(0..=ceiling_ms))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The cache holds no invariant a panicking holder could break half-way (every entry is a
    // whole state), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
