//! The event store: postgres-es's repository for reading and appending, wrapped in our own
//! implementation of cqrs-es's `EventStore` that keeps long-lived streams cheap to load.
//!
//! Not cqrs-es 0.5's snapshot modes (they apply the new events twice, NOTES). Instead:
//! - an in-process cache of recently used aggregates, keyed by stream, holding the state *after*
//!   a known sequence; a load reads only the events after it (usually none);
//! - a snapshot table written every [`SNAPSHOT_EVERY`] events from the state `handle` already
//!   produced (never re-applying events), for cold loads.
//!
//! Both are shortcuts: a load through them equals a full replay (tested), and either may be
//! stale without harm because the events after it are always read. Writes use the stream's
//! expected version; a conflict reloads and decides again, bounded, so conflicts never reach
//! a client.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventRepository, SerializedEvent};
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventEnvelope, EventStore};
use infra::log::LogPosition;
use lru::LruCache;
use postgres_es::PostgresEventRepository;
use rand::Rng;
use serde_json::Value;
use sqlx::PgPool;

use crate::aggregates::{AccountAggregate, EVENT_VERSION, TransactionAggregate};
use crate::error::{DatabaseContext, Error, Result};

/// A snapshot is written each time a stream crosses a multiple of this many events, so a cold
/// load reads at most this many events past its snapshot. 100 keeps snapshot writes at 1 % of
/// appends while bounding a cold load to ~100 small JSON rows.
pub const SNAPSHOT_EVERY: usize = 100;

/// Streams kept in the in-process cache. An account's state is a few hundred bytes plus its open
/// holds, so 10,000 streams stay within a few megabytes.
pub const CACHE_STREAMS_MAX: usize = 10_000;

/// How many times a command is decided again after a write conflict before giving up. Writers
/// of one stream are serialised in-process, so conflicts only come from other instances; 32
/// jittered attempts outlast any realistic burst.
const CONFLICT_ATTEMPTS_MAX: u32 = 32;

/// The format version of an aggregate's snapshot state. A snapshot written in another format is
/// ignored (the stream is replayed), so changing a state type only needs this bumped.
pub trait SnapshotFormat {
    const STATE_VERSION: i32;
}

impl SnapshotFormat for AccountAggregate {
    const STATE_VERSION: i32 = 1;
}

impl SnapshotFormat for TransactionAggregate {
    const STATE_VERSION: i32 = 1;
}

/// The result of a command: the state after it, its version, and the events it appended
/// (empty when the command was a no-op, as repeated steps are).
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    pub aggregate: A,
    pub version: usize,
    pub committed: Vec<EventEnvelope<A>>,
}

/// An aggregate store over the `events` table of the pool's schema.
pub struct AggregateStore<A: Aggregate> {
    repository: PostgresEventRepository,
    pool: PgPool,
    snapshots: bool,
    cache: Option<Mutex<LruCache<String, (A, usize)>>>,
}

impl<A> AggregateStore<A>
where
    A: Aggregate<Services = ()> + Clone + SnapshotFormat,
    A::Command: Clone,
{
    /// The store the services use: cache and snapshots on.
    pub fn new(pool: PgPool) -> Self {
        let capacity = NonZeroUsize::new(CACHE_STREAMS_MAX).expect("the cache bound is not zero");
        AggregateStore {
            repository: PostgresEventRepository::new(pool.clone()),
            pool,
            snapshots: true,
            cache: Some(Mutex::new(LruCache::new(capacity))),
        }
    }

    /// A store that replays every stream from its first event on every load: the reference the
    /// shortcuts are tested and measured against.
    pub fn full_replay(pool: PgPool) -> Self {
        AggregateStore {
            repository: PostgresEventRepository::new(pool.clone()),
            pool,
            snapshots: false,
            cache: None,
        }
    }

    /// A store that uses snapshots but no cache: what a freshly started instance sees.
    pub fn snapshots_only(pool: PgPool) -> Self {
        AggregateStore {
            cache: None,
            ..AggregateStore::new(pool)
        }
    }

    /// The state of a stream and its version (0 and the default state when it has no events).
    pub async fn load(&self, id: &str) -> Result<(A, usize)> {
        let context = self.load_context(id).await?;
        Ok((context.aggregate, context.current_sequence))
    }

    /// Decides `command` against the current state and appends the resulting events with the
    /// stream's expected version, deciding again after a conflict. The outer `Result` is an
    /// infrastructure failure; the inner one the aggregate's refusal.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        metadata: &HashMap<String, String>,
    ) -> Result<Result<Executed<A>, A::Error>> {
        for attempt in 0..CONFLICT_ATTEMPTS_MAX {
            let mut context = self.load_context(id).await?;
            let sink = EventSink::default();
            if let Err(refusal) = context.aggregate.handle(command.clone(), &(), &sink).await {
                return Ok(Err(refusal));
            }
            let events = sink.collect().await;
            if events.is_empty() {
                return Ok(Ok(Executed {
                    aggregate: context.aggregate,
                    version: context.current_sequence,
                    committed: Vec::new(),
                }));
            }
            let aggregate = context.aggregate.clone();
            match self.commit(events, context, metadata.clone()).await {
                Ok(committed) => {
                    let version = committed.last().map_or(0, |envelope| envelope.sequence);
                    return Ok(Ok(Executed {
                        aggregate,
                        version,
                        committed,
                    }));
                }
                Err(AggregateError::AggregateConflict) => {
                    metrics::counter!("event_store_conflicts_total", "aggregate" => A::TYPE)
                        .increment(1);
                    self.forget(id);
                    tokio::time::sleep(conflict_backoff(attempt)).await;
                }
                Err(other) => return Err(store_error("appending events", other)),
            }
        }
        Err(Error::ConflictsExhausted {
            stream: format!("{}/{id}", A::TYPE),
            attempts: CONFLICT_ATTEMPTS_MAX,
        })
    }

    /// The log position of one stored event, for `X-Ledger-Position`.
    pub async fn position_of(&self, id: &str, sequence: usize) -> Result<LogPosition> {
        let (tx_id, position): (i64, i64) = sqlx::query_as(
            "SELECT tx_id::text::bigint, position FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(to_i64(sequence))
        .fetch_one(&self.pool)
        .await
        .context("looking up an event's log position")?;
        Ok(LogPosition { tx_id, position })
    }

    fn forget(&self, id: &str) {
        if let Some(cache) = &self.cache {
            lock(cache).pop(id);
        }
    }

    async fn load_context(&self, id: &str) -> Result<EventStoreAggregateContext<A>> {
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| lock(cache).get(id).cloned());
        let (mut aggregate, mut sequence) = match cached {
            Some(entry) => entry,
            None if self.snapshots => self.read_snapshot(id).await?.unwrap_or_default(),
            None => (A::default(), 0),
        };
        let tail = self
            .repository
            .get_last_events::<A>(id, sequence)
            .await
            .map_err(|error| Error::Store {
                context: "reading a stream",
                message: error.to_string(),
            })?;
        for event in tail {
            sequence = event.sequence;
            aggregate.apply(deserialize::<A>(event)?);
        }
        if let Some(cache) = &self.cache {
            lock(cache).put(id.to_owned(), (aggregate.clone(), sequence));
        }
        Ok(EventStoreAggregateContext {
            aggregate_id: id.to_owned(),
            aggregate,
            current_sequence: sequence,
            current_snapshot: None,
        })
    }

    async fn read_snapshot(&self, id: &str) -> Result<Option<(A, usize)>> {
        let row: Option<(i64, i32, Value)> = sqlx::query_as(
            "SELECT sequence, state_version, state FROM aggregate_snapshots \
             WHERE aggregate_type = $1 AND aggregate_id = $2",
        )
        .bind(A::TYPE)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .context("reading a snapshot")?;
        let Some((sequence, state_version, state)) = row else {
            return Ok(None);
        };
        if state_version != A::STATE_VERSION {
            return Ok(None);
        }
        match serde_json::from_value::<A>(state) {
            Ok(aggregate) => Ok(Some((aggregate, usize::try_from(sequence).unwrap_or(0)))),
            Err(error) => {
                tracing::warn!(stream = %id, error.message = %error, "unreadable snapshot ignored");
                Ok(None)
            }
        }
    }

    async fn write_snapshot(&self, id: &str, aggregate: &A, sequence: usize) -> Result<()> {
        let state = serde_json::to_value(aggregate).map_err(|error| Error::Store {
            context: "serialising a snapshot",
            message: error.to_string(),
        })?;
        // Only ever move a snapshot forward: a slower writer must not replace a newer one.
        sqlx::query(
            "INSERT INTO aggregate_snapshots (aggregate_type, aggregate_id, sequence, state_version, state) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
             SET sequence = EXCLUDED.sequence, state_version = EXCLUDED.state_version, \
                 state = EXCLUDED.state, taken_at = now() \
             WHERE aggregate_snapshots.sequence < EXCLUDED.sequence \
                OR aggregate_snapshots.state_version <> EXCLUDED.state_version",
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(to_i64(sequence))
        .bind(A::STATE_VERSION)
        .bind(state)
        .execute(&self.pool)
        .await
        .context("writing a snapshot")?;
        Ok(())
    }
}

impl<A> EventStore<A> for AggregateStore<A>
where
    A: Aggregate<Services = ()> + Clone + SnapshotFormat,
    A::Command: Clone,
{
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(
        &self,
        id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let events = self.repository.get_events::<A>(id).await?;
        events
            .into_iter()
            .map(|event| {
                let (aggregate_id, sequence) = (event.aggregate_id.clone(), event.sequence);
                let metadata = serde_json::from_value(event.metadata.clone())
                    .map_err(|error| AggregateError::DeserializationError(Box::new(error)))?;
                let payload = deserialize::<A>(event)
                    .map_err(|error| AggregateError::DeserializationError(Box::new(error)))?;
                Ok(EventEnvelope {
                    aggregate_id,
                    sequence,
                    payload,
                    metadata,
                })
            })
            .collect()
    }

    async fn load_aggregate(&self, id: &str) -> Result<Self::AC, AggregateError<A::Error>> {
        self.load_context(id)
            .await
            .map_err(|error| AggregateError::UnexpectedError(Box::new(error)))
    }

    /// Appends `events`. `context.aggregate` is the state *after* them: `handle` applied each
    /// event through the sink, so the state is cached and snapshotted as is, never re-applied.
    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let id = context.aggregate_id.clone();
        let before = context.current_sequence;
        let envelopes: Vec<EventEnvelope<A>> = events
            .into_iter()
            .zip(before + 1..)
            .map(|(payload, sequence)| EventEnvelope {
                aggregate_id: id.clone(),
                sequence,
                payload,
                metadata: metadata.clone(),
            })
            .collect();
        let serialized = envelopes
            .iter()
            .map(serialize)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| AggregateError::UnexpectedError(Box::new(error)))?;
        self.repository.persist::<A>(&serialized, None).await?;
        let after = before + envelopes.len();
        if self.snapshots && after / SNAPSHOT_EVERY > before / SNAPSHOT_EVERY {
            // The events are committed; a failed snapshot only costs a longer load later.
            if let Err(error) = self.write_snapshot(&id, &context.aggregate, after).await {
                tracing::warn!(stream = %id, error.message = %error, "snapshot not written");
            }
        }
        if let Some(cache) = &self.cache {
            lock(cache).put(id, (context.aggregate, after));
        }
        Ok(envelopes)
    }
}

fn serialize<A: Aggregate>(envelope: &EventEnvelope<A>) -> serde_json::Result<SerializedEvent> {
    Ok(SerializedEvent {
        aggregate_id: envelope.aggregate_id.clone(),
        sequence: envelope.sequence,
        aggregate_type: A::TYPE.to_owned(),
        event_type: envelope.payload.event_type(),
        event_version: envelope.payload.event_version(),
        payload: serde_json::to_value(&envelope.payload)?,
        metadata: serde_json::to_value(&envelope.metadata)?,
    })
}

/// Reads a stored event. Version 1 is the only payload format so far; a later format adds its
/// upcaster here.
fn deserialize<A: Aggregate>(event: SerializedEvent) -> Result<A::Event> {
    let unreadable = |problem: String| Error::UnreadableEvent {
        stream: format!("{}/{}", A::TYPE, event.aggregate_id),
        event_type: event.event_type.clone(),
        event_version: event.event_version.clone(),
        problem,
    };
    if event.event_version != EVENT_VERSION {
        return Err(unreadable("unknown event version".to_owned()));
    }
    serde_json::from_value(event.payload.clone()).map_err(|error| unreadable(error.to_string()))
}

fn store_error<E: std::error::Error>(context: &'static str, error: AggregateError<E>) -> Error {
    Error::Store {
        context,
        message: error.to_string(),
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

fn to_i64(sequence: usize) -> i64 {
    i64::try_from(sequence).expect("a stream never holds more than i64::MAX events")
}
