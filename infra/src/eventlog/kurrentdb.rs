//! The event log on KurrentDB (formerly EventStoreDB), through its gRPC client: the third
//! implementation of the seam, behind the `kurrentdb` cargo feature.
//!
//! **Streams.** One KurrentDB stream per aggregate, named `<prefix>-<type>-<id>`
//! (`ledger-account-6f1c…`). The prefix (`KURRENTDB_STREAM_PREFIX`, default `ledger`) keeps the
//! ledger's streams apart from whatever else the database holds, and gives each conformance
//! check a log of its own on a shared server. A seam version `v` (events in the stream) is
//! KurrentDB revision `v - 1`; an expected version 0 is `NoStream`, any other is the exact
//! revision `v - 1`.
//!
//! **Appends.** Each append is one gRPC append (atomic per stream) with the writer-chosen event
//! ids. The server treats the same ids at the same expected revision as a retry and answers
//! success without writing, which cannot be told from a write by its answer; so an append first
//! reads the stream's revision: a stream already past the expected version is classified by the
//! stored ids (the same ids there: [`AppendOutcome::Duplicate`]; others: a conflict) without
//! writing. A stream at the expected version is written; a wrong-expected-version answer is
//! classified the same way. After a write the last event is read back for its `$all` position,
//! which is what followers will see. That is three round trips per append where PostgreSQL
//! group-commits many: KurrentDB batches on its own side, and correctness comes first here.
//! (Two *identical* retries racing each other may both report `Appended`; the events are still
//! written once.)
//!
//! **The log** is `$all`, read forward from a position with a server-side stream-prefix filter,
//! in KurrentDB's commit order. A [`LogPosition`] is `{commit, index: prepare}`, ordered the same
//! way KurrentDB orders positions. Reading `$all` from a position includes the event at that
//! position, so it is skipped here. A filter on the event type as well is applied here, after the
//! server's stream filter.
//!
//! **Wake-ups** come from a catch-up subscription to `$all` (from its end, filtered to the
//! prefix), restarted with a back-off when it drops, plus this process's own appends.
//!
//! **Snapshots** live in a stream of their own per aggregate, `<prefix>_snapshot-<type>-<id>`
//! (outside the log's prefix filter), with `$maxCount = 1`: the newest one is all a load needs.
//! A write reads the current one first and appends at its revision, so a concurrent writer of a
//! snapshot conflicts and the write is tried again on the fresh state.
//!
//! **Metadata** (correlation, causation, actor, command, and the event's schema version) is the
//! event's custom metadata, a JSON object; `$correlationId` and `$causationId` are written too,
//! so KurrentDB's own `$by_correlation_id` projection and tools understand them.
//!
//! **Lag** counts unread events up to [`LAG_COUNT_CAP`] (a scan of `$all`; PostgreSQL counts
//! with an index), and the age of the oldest comes from KurrentDB's `created` stamp, which the
//! client gives to the second.
//!
//! No KurrentDB server exists on the machines this was built on: the unit tests below cover the
//! mappings; the shared conformance suite runs against a live server wherever
//! `TEST_KURRENTDB_URL` is set (infra/tests/kurrentdb.rs).

use std::time::Duration;

use ::kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, CurrentRevision, EventData, Position,
    ReadAllOptions, ReadStreamOptions, StreamMetadata, StreamPosition, StreamState,
    SubscribeToAllOptions, SubscriptionFilter,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{
    Append, AppendOutcome, EventLog, EventMetadata, Lag, LogFilter, LogPosition, NewEvent,
    RecordedEvent, Snapshot, StreamEvent, StreamId, Wakeups,
};
use crate::error::{Error, Result};

/// Events read from `$all` per request while counting lag or looking for events of one type.
const PAGE: usize = 1_000;

/// How many counted events a lag query reads at most (a scan of `$all`, page by page).
pub const LAG_COUNT_CAP: i64 = 10_000;

/// How long one request may take before it is given up (and reported as an error).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Attempts of a snapshot write that races another writer of the same snapshot.
const SNAPSHOT_ATTEMPTS: usize = 5;

/// The event type of snapshot records in a snapshot stream.
const SNAPSHOT_EVENT_TYPE: &str = "ledger-snapshot";

/// Where a KurrentDB event log lives and which streams are the ledger's.
#[derive(Clone)]
pub struct KurrentDbSettings {
    /// A KurrentDB connection string (`kurrentdb://host:2113?tls=false`, or `esdb://…`). May hold
    /// credentials: never logged.
    pub url: String,
    /// The first part of every stream name of this ledger: letters, digits and `_` only.
    pub stream_prefix: String,
}

impl std::fmt::Debug for KurrentDbSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KurrentDbSettings")
            .field("url", &"<redacted>")
            .field("stream_prefix", &self.stream_prefix)
            .finish()
    }
}

/// Checks a connection string without connecting: the scheme and the options KurrentDB's client
/// accepts. The error never repeats the string (it may hold a password).
pub fn parse_url(url: &str) -> Result<ClientSettings> {
    url.parse::<ClientSettings>().map_err(|error| {
        // Some of the client's messages repeat the string, credentials and all.
        let detail = if error.message().contains('@') || error.message().contains(url) {
            "malformed"
        } else {
            error.message()
        };
        Error::Config(format!(
            "KURRENTDB_URL is not a KurrentDB connection string \
             (kurrentdb://host:2113?tls=false): {detail}"
        ))
    })
}

/// The names of the ledger's streams under one prefix, and the way back from a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamNames {
    prefix: String,
}

impl StreamNames {
    pub fn new(prefix: &str) -> Result<StreamNames> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !valid {
            return Err(Error::Config(format!(
                "KURRENTDB_STREAM_PREFIX {prefix:?} must be 1 to 64 letters, digits or '_'"
            )));
        }
        Ok(StreamNames {
            prefix: prefix.to_owned(),
        })
    }

    /// `<prefix>-<type>-<id>`. A type may not hold `-` (it would make names ambiguous).
    pub fn stream(&self, stream: &StreamId) -> Result<String> {
        Self::check(stream)?;
        Ok(format!(
            "{}-{}-{}",
            self.prefix, stream.aggregate_type, stream.aggregate_id
        ))
    }

    /// `<prefix>_snapshot-<type>-<id>`: outside the log's prefix `<prefix>-`.
    pub fn snapshot(&self, stream: &StreamId) -> Result<String> {
        Self::check(stream)?;
        Ok(format!(
            "{}_snapshot-{}-{}",
            self.prefix, stream.aggregate_type, stream.aggregate_id
        ))
    }

    /// The server-side filter prefix of the events `filter` selects.
    pub fn filter_prefix(&self, filter: LogFilter) -> String {
        match filter.aggregate_type {
            Some(kind) => format!("{}-{kind}-", self.prefix),
            None => format!("{}-", self.prefix),
        }
    }

    /// The aggregate a stream name of this ledger stands for.
    pub fn parse(&self, name: &str) -> Option<StreamId> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        let (kind, id) = rest.split_once('-')?;
        (!kind.is_empty() && !id.is_empty()).then(|| StreamId::new(kind, id))
    }

    fn check(stream: &StreamId) -> Result<()> {
        let kind = &stream.aggregate_type;
        if kind.is_empty() || kind.contains('-') || stream.aggregate_id.is_empty() {
            return Err(Error::Config(format!(
                "stream {stream} cannot be named in KurrentDB: the type must be non-empty \
                 without '-', the id non-empty"
            )));
        }
        Ok(())
    }
}

/// The expected stream state of an append at seam version `expected_version`.
pub fn expected_state(expected_version: u64) -> StreamState {
    match expected_version {
        0 => StreamState::NoStream,
        version => StreamState::StreamRevision(version - 1),
    }
}

/// The seam version of a stream whose last revision is `current`.
pub fn version_of(current: CurrentRevision) -> u64 {
    match current {
        CurrentRevision::NoStream => 0,
        CurrentRevision::Current(revision) => revision.saturating_add(1),
    }
}

/// A KurrentDB `$all` position as the seam's [`LogPosition`]: `{commit, index: prepare}`.
pub fn log_position(position: Position) -> Result<LogPosition> {
    let part = |value: u64| {
        i64::try_from(value).map_err(|_| {
            Error::EventStore(format!(
                "the $all position {position} does not fit a ledger position"
            ))
        })
    };
    Ok(LogPosition {
        commit: part(position.commit)?,
        index: part(position.prepare)?,
    })
}

/// The way back: where to read `$all` from to see what follows `position`.
pub fn kurrent_position(position: LogPosition) -> Result<StreamPosition<Position>> {
    if position == LogPosition::START {
        return Ok(StreamPosition::Start);
    }
    let part = |value: i64| {
        u64::try_from(value)
            .map_err(|_| Error::Config(format!("{position} is not a KurrentDB position")))
    };
    Ok(StreamPosition::Position(Position {
        commit: part(position.commit)?,
        prepare: part(position.index)?,
    }))
}

/// The custom metadata of an event: the seam's metadata, the payload's schema version, and the
/// keys KurrentDB's own projections read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMetadata {
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default)]
    pub causation_id: String,
    #[serde(default)]
    pub actor: String,
    #[serde(default)]
    pub command_id: String,
    #[serde(default)]
    pub event_version: String,
    #[serde(rename = "$correlationId", default)]
    pub kurrent_correlation_id: String,
    #[serde(rename = "$causationId", default)]
    pub kurrent_causation_id: String,
}

impl StoredMetadata {
    pub fn new(metadata: &EventMetadata, event_version: &str) -> Self {
        StoredMetadata {
            correlation_id: metadata.correlation_id.clone(),
            causation_id: metadata.causation_id.clone(),
            actor: metadata.actor.clone(),
            command_id: metadata.command_id.clone(),
            event_version: event_version.to_owned(),
            kurrent_correlation_id: metadata.correlation_id.clone(),
            kurrent_causation_id: metadata.causation_id.clone(),
        }
    }

    /// The seam's metadata and the schema version; empty metadata (an event written by another
    /// tool) reads as empty fields.
    pub fn decode(bytes: &[u8]) -> Result<(EventMetadata, String)> {
        if bytes.is_empty() {
            return Ok((EventMetadata::default(), String::new()));
        }
        let stored: StoredMetadata = serde_json::from_slice(bytes)
            .map_err(|error| Error::EventStore(format!("malformed event metadata: {error}")))?;
        Ok((
            EventMetadata {
                correlation_id: stored.correlation_id,
                causation_id: stored.causation_id,
                actor: stored.actor,
                command_id: stored.command_id,
            },
            stored.event_version,
        ))
    }
}

/// The event to send for one [`NewEvent`]: its id, type, JSON payload and custom metadata.
pub fn event_data(event: &NewEvent) -> Result<EventData> {
    let payload = RawValue::from_string(event.payload.clone())
        .map_err(|error| Error::Config(format!("an event payload is not JSON: {error}")))?;
    let data = EventData::json(&event.event_type, &payload)
        .map_err(|error| Error::Config(format!("an event payload: {error}")))?
        .id(event.event_id);
    data.metadata_as_json(&StoredMetadata::new(&event.metadata, &event.event_version))
        .map_err(|error| Error::Config(format!("event metadata: {error}")))
}

/// A snapshot as stored in a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    version: u64,
    state_version: i32,
    state: Box<RawValue>,
}

/// Whether a stored snapshot stays when `new` is offered: the same format and no older.
fn keeps(stored: &Snapshot, new: &Snapshot) -> bool {
    stored.state_version == new.state_version && stored.version >= new.version
}

/// A read failure, named. `ResourceNotFound` is handled by the callers (an absent stream).
fn read_error(context: &str, error: ::kurrentdb::Error) -> Error {
    Error::EventStore(format!("{context}: {error}"))
}

/// A write failure whose outcome is unknown: a retry of the same append is safe.
fn write_error(stream: &str, error: ::kurrentdb::Error) -> Error {
    Error::CommitFailed(format!("appending to KurrentDB stream {stream}: {error}"))
}

/// What a decoded `$all` or stream record is to the seam.
fn recorded(names: &StreamNames, event: &::kurrentdb::RecordedEvent) -> Result<RecordedEvent> {
    let stream_name = event.stream_id();
    let stream = names.parse(stream_name).ok_or_else(|| {
        Error::EventStore(format!(
            "stream {stream_name:?} is not one of this ledger's"
        ))
    })?;
    let (metadata, event_version) = StoredMetadata::decode(&event.custom_metadata)?;
    let payload = String::from_utf8(event.data.to_vec()).map_err(|_| {
        Error::EventStore(format!(
            "event {} of {stream_name} is not UTF-8 JSON",
            event.id
        ))
    })?;
    Ok(RecordedEvent {
        position: log_position(event.position)?,
        event_id: event.id,
        recorded_at: event.created,
        stream,
        sequence: event.revision.saturating_add(1),
        event_type: event.event_type.clone(),
        event_version,
        payload,
        metadata,
    })
}

pub struct KurrentDbEventLog {
    client: Client,
    names: StreamNames,
    wakeups: watch::Sender<u64>,
    subscription: JoinHandle<()>,
}

impl Drop for KurrentDbEventLog {
    fn drop(&mut self) {
        self.subscription.abort();
    }
}

impl KurrentDbEventLog {
    /// A log over the server at `settings.url`. Connects lazily: a server that is away fails the
    /// first request (and `/health`), not this call; a malformed URL or prefix fails here.
    pub async fn connect(settings: &KurrentDbSettings) -> Result<KurrentDbEventLog> {
        let names = StreamNames::new(&settings.stream_prefix)?;
        let client = Client::new(parse_url(&settings.url)?)
            .map_err(|error| Error::Config(format!("cannot create a KurrentDB client: {error}")))?;
        let (wakeups, _) = watch::channel(0_u64);
        let subscription = tokio::spawn(listen(
            client.clone(),
            names.filter_prefix(LogFilter::ALL),
            wakeups.clone(),
        ));
        Ok(KurrentDbEventLog {
            client,
            names,
            wakeups,
            subscription,
        })
    }

    pub fn stream_names(&self) -> &StreamNames {
        &self.names
    }

    /// The last event of stream `name`, if the stream exists.
    async fn last_event(&self, name: &str) -> Result<Option<::kurrentdb::RecordedEvent>> {
        let options = ReadStreamOptions::default()
            .position(StreamPosition::End)
            .max_count(1)
            .deadline(REQUEST_DEADLINE);
        let mut read = match self.client.read_stream(name, &options).await {
            Ok(read) => read,
            Err(::kurrentdb::Error::ResourceNotFound) => return Ok(None),
            Err(error) => return Err(read_error("reading a stream's end", error)),
        };
        match read.next().await {
            Ok(event) => Ok(event.and_then(|event| event.event)),
            Err(::kurrentdb::Error::ResourceNotFound) => Ok(None),
            Err(error) => Err(read_error("reading a stream's end", error)),
        }
    }

    /// Up to `count` events of stream `name` from revision `from`.
    async fn stream_events(
        &self,
        name: &str,
        from: u64,
        count: usize,
    ) -> Result<Vec<::kurrentdb::RecordedEvent>> {
        let options = ReadStreamOptions::default()
            .position(StreamPosition::Position(from))
            .forwards()
            .max_count(count)
            .deadline(REQUEST_DEADLINE);
        let mut read = match self.client.read_stream(name, &options).await {
            Ok(read) => read,
            Err(::kurrentdb::Error::ResourceNotFound) => return Ok(Vec::new()),
            Err(error) => return Err(read_error("reading a stream", error)),
        };
        let mut events = Vec::new();
        loop {
            match read.next().await {
                Ok(Some(event)) => events.extend(event.event),
                Ok(None) | Err(::kurrentdb::Error::ResourceNotFound) => return Ok(events),
                Err(error) => return Err(read_error("reading a stream", error)),
            }
        }
    }

    /// The outcome of an append that met a stream not at its expected version: a retry if the
    /// stream holds exactly its events (by id) at those versions, a conflict otherwise.
    async fn classify(&self, name: &str, append: &Append) -> Result<AppendOutcome> {
        let stored = self
            .stream_events(name, append.expected_version, append.events.len())
            .await?;
        let same = stored.len() == append.events.len()
            && stored
                .iter()
                .zip(&append.events)
                .all(|(stored, event)| stored.id == event.event_id);
        Ok(match stored.last() {
            Some(last) if same => AppendOutcome::Duplicate {
                version: append.expected_version + append.events.len() as u64,
                position: log_position(last.position)?,
            },
            _ => AppendOutcome::Conflict,
        })
    }

    async fn append_one(&self, append: &Append) -> Result<AppendOutcome> {
        let name = self.names.stream(&append.stream)?;
        let Some(last_new) = append.events.last() else {
            return Err(Error::Config(
                "an append holds at least one event".to_owned(),
            ));
        };
        let current = self
            .last_event(&name)
            .await?
            .map_or(0, |event| event.revision.saturating_add(1));
        if current != append.expected_version {
            return self.classify(&name, append).await;
        }
        let events = append
            .events
            .iter()
            .map(event_data)
            .collect::<Result<Vec<_>>>()?;
        let options = AppendToStreamOptions::default()
            .stream_state(expected_state(append.expected_version))
            .deadline(REQUEST_DEADLINE);
        match self
            .client
            .append_to_stream(name.as_str(), &options, events)
            .await
        {
            Ok(_) => {}
            Err(::kurrentdb::Error::WrongExpectedVersion { .. }) => {
                return self.classify(&name, append).await;
            }
            Err(error) => return Err(write_error(&name, error)),
        }
        self.wakeups.send_modify(|counter| *counter += 1);
        let version = append.expected_version + append.events.len() as u64;
        // The last event's own `$all` position: what a follower will checkpoint.
        let written = self.stream_events(&name, version - 1, 1).await?;
        match written.first() {
            Some(event) if event.id == last_new.event_id => Ok(AppendOutcome::Appended {
                version,
                position: log_position(event.position)?,
            }),
            _ => Err(Error::CommitFailed(format!(
                "the events appended to {name} were not found where they were written"
            ))),
        }
    }

    /// Up to `limit` events of `$all` after `after` whose stream begins with `prefix`, and
    /// whether `$all` held more.
    async fn read_page(
        &self,
        after: LogPosition,
        limit: usize,
        prefix: &str,
    ) -> Result<(Vec<RecordedEvent>, bool)> {
        // Reading from a position includes the event there: ask for one more.
        let asked = limit.saturating_add(1);
        let options = ReadAllOptions::default()
            .position(kurrent_position(after)?)
            .forwards()
            .filter(SubscriptionFilter::on_stream_name().add_prefix(prefix))
            .max_count(asked)
            .deadline(REQUEST_DEADLINE);
        let mut read = self
            .client
            .read_all(&options)
            .await
            .map_err(|error| read_error("reading $all", error))?;
        let mut events = Vec::new();
        let mut received = 0;
        loop {
            match read.next().await {
                Ok(Some(resolved)) => {
                    received += 1;
                    let Some(event) = resolved.event else {
                        continue;
                    };
                    let event = recorded(&self.names, &event)?;
                    if event.position > after && events.len() < limit {
                        events.push(event);
                    }
                }
                Ok(None) => break,
                Err(error) => return Err(read_error("reading $all", error)),
            }
        }
        Ok((events, received >= asked))
    }
}

/// Wakes followers on every event of the ledger's streams that commits, wherever it was written:
/// a catch-up subscription to `$all` from its end, resubscribed with a back-off when it drops.
async fn listen(client: Client, prefix: String, wakeups: watch::Sender<u64>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let options = SubscribeToAllOptions::default()
            .position(StreamPosition::End)
            .filter(SubscriptionFilter::on_stream_name().add_prefix(&prefix));
        let mut subscription = client.subscribe_to_all(&options).await;
        loop {
            match subscription.next().await {
                Ok(_) => {
                    pause = Duration::from_millis(100);
                    wakeups.send_modify(|counter| *counter += 1);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "KurrentDB subscription dropped; resubscribing");
                    break;
                }
            }
        }
        // Followers poll slowly anyway; a wake-up now makes them look after the gap.
        wakeups.send_modify(|counter| *counter += 1);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

#[async_trait]
impl EventLog for KurrentDbEventLog {
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<AppendOutcome>> {
        let mut outcomes = Vec::with_capacity(appends.len());
        for append in &appends {
            outcomes.push(self.append_one(append).await?);
        }
        Ok(outcomes)
    }

    async fn read_stream(&self, stream: &StreamId, after: u64) -> Result<Vec<StreamEvent>> {
        let name = self.names.stream(stream)?;
        self.stream_events(&name, after, usize::MAX)
            .await?
            .iter()
            .map(|event| {
                let event = recorded(&self.names, event)?;
                Ok(StreamEvent {
                    sequence: event.sequence,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                })
            })
            .collect()
    }

    async fn read_stream_recorded(
        &self,
        stream: &StreamId,
        after: u64,
    ) -> Result<Vec<RecordedEvent>> {
        let name = self.names.stream(stream)?;
        self.stream_events(&name, after, usize::MAX)
            .await?
            .iter()
            .map(|event| recorded(&self.names, event))
            .collect()
    }

    async fn read_all(
        &self,
        after: LogPosition,
        limit: usize,
        filter: LogFilter,
    ) -> Result<Vec<RecordedEvent>> {
        let prefix = self.names.filter_prefix(filter);
        let Some(event_type) = filter.event_type else {
            return Ok(self.read_page(after, limit, &prefix).await?.0);
        };
        // The server filters by stream; events of other types are skipped here, page by page,
        // so that an empty answer still means "nothing more yet".
        let mut found = Vec::new();
        let mut from = after;
        loop {
            let (page, more) = self.read_page(from, PAGE, &prefix).await?;
            let Some(last) = page.last() else {
                return Ok(found);
            };
            from = last.position;
            for event in page {
                if filter.matches(&event.stream, &event.event_type) && found.len() < limit {
                    found.push(event);
                }
            }
            if found.len() >= limit || !more {
                debug_assert!(found.iter().all(|event| event.event_type == event_type));
                return Ok(found);
            }
        }
    }

    async fn head(&self) -> Result<LogPosition> {
        let options = ReadAllOptions::default()
            .position(StreamPosition::End)
            .filter(
                SubscriptionFilter::on_stream_name()
                    .add_prefix(self.names.filter_prefix(LogFilter::ALL)),
            )
            .max_count(1)
            .deadline(REQUEST_DEADLINE);
        let mut read = self
            .client
            .read_all(&options)
            .await
            .map_err(|error| read_error("reading the head of $all", error))?;
        loop {
            match read.next().await {
                Ok(Some(resolved)) => {
                    if let Some(event) = resolved.event {
                        return log_position(event.position);
                    }
                }
                Ok(None) => return Ok(LogPosition::START),
                Err(error) => return Err(read_error("reading the head of $all", error)),
            }
        }
    }

    async fn lag(&self, checkpoint: LogPosition, filter: LogFilter) -> Result<Lag> {
        let mut oldest: Option<DateTime<Utc>> = None;
        let mut events: i64 = 0;
        let mut from = checkpoint;
        while events < LAG_COUNT_CAP {
            let page = self.read_all(from, PAGE, filter).await?;
            let Some(last) = page.last() else {
                break;
            };
            from = last.position;
            if oldest.is_none() {
                oldest = page.first().map(|event| event.recorded_at);
            }
            events = events.saturating_add(page.len() as i64);
        }
        let Some(oldest) = oldest else {
            return Ok(Lag::NONE);
        };
        Ok(Lag {
            events: events.clamp(1, LAG_COUNT_CAP),
            oldest_unread: (Utc::now() - oldest).to_std().unwrap_or_default(),
        })
    }

    fn subscribe(&self) -> Wakeups {
        self.wakeups.subscribe()
    }

    /// The subscription to `$all` delivers every written event of the log's prefix, whoever
    /// wrote it.
    fn wakes_on_every_commit(&self) -> bool {
        true
    }

    async fn read_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let name = self.names.snapshot(stream)?;
        let Some(event) = self.last_event(&name).await? else {
            return Ok(None);
        };
        decode_snapshot(&event.data).map(Some)
    }

    async fn write_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<()> {
        let name = self.names.snapshot(stream)?;
        let state = RawValue::from_string(snapshot.state.clone())
            .map_err(|error| Error::Config(format!("a snapshot state is not JSON: {error}")))?;
        let stored = StoredSnapshot {
            version: snapshot.version,
            state_version: snapshot.state_version,
            state,
        };
        for _ in 0..SNAPSHOT_ATTEMPTS {
            let current = self.last_event(&name).await?;
            let expected = match &current {
                Some(event) => {
                    if keeps(&decode_snapshot(&event.data)?, &snapshot) {
                        return Ok(());
                    }
                    StreamState::StreamRevision(event.revision)
                }
                None => {
                    // A snapshot stream keeps its newest record only.
                    let metadata = StreamMetadata::builder().max_count(1).build();
                    self.client
                        .set_stream_metadata(
                            name.as_str(),
                            &AppendToStreamOptions::default().deadline(REQUEST_DEADLINE),
                            &metadata,
                        )
                        .await
                        .map_err(|error| write_error(&name, error))?;
                    StreamState::NoStream
                }
            };
            let data = EventData::json(SNAPSHOT_EVENT_TYPE, &stored)
                .map_err(|error| Error::Config(format!("a snapshot: {error}")))?
                .id(Uuid::new_v4());
            let options = AppendToStreamOptions::default()
                .stream_state(expected)
                .deadline(REQUEST_DEADLINE);
            match self
                .client
                .append_to_stream(name.as_str(), &options, data)
                .await
            {
                Ok(_) => return Ok(()),
                Err(::kurrentdb::Error::WrongExpectedVersion { .. }) => continue,
                Err(error) => return Err(write_error(&name, error)),
            }
        }
        // Others kept writing snapshots of this stream: theirs are as good as this one.
        Ok(())
    }

    async fn ping(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), self.head())
            .await
            .is_ok_and(|head| head.is_ok())
    }
}

fn decode_snapshot(data: &[u8]) -> Result<Snapshot> {
    let stored: StoredSnapshot = serde_json::from_slice(data)
        .map_err(|error| Error::EventStore(format!("malformed snapshot: {error}")))?;
    Ok(Snapshot {
        version: stored.version,
        state_version: stored.state_version,
        state: stored.state.get().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> StreamNames {
        StreamNames::new("ledger").expect("a valid prefix")
    }

    #[test]
    fn stream_names_round_trip_and_stay_apart_from_snapshots() {
        let names = names();
        let stream = StreamId::new("account", "6f1c2a3b-0000-4000-8000-000000000001");
        let name = names.stream(&stream).expect("named");
        assert_eq!(name, "ledger-account-6f1c2a3b-0000-4000-8000-000000000001");
        assert_eq!(names.parse(&name), Some(stream.clone()));
        let snapshot = names.snapshot(&stream).expect("named");
        assert!(!snapshot.starts_with(&names.filter_prefix(LogFilter::ALL)));
        assert_eq!(names.parse(&snapshot), None);
        assert_eq!(names.parse("other-account-1"), None);
        assert_eq!(names.parse("ledger-account-"), None);
        assert_eq!(names.parse("$$ledger-account-1"), None);
        assert_eq!(
            names.filter_prefix(LogFilter::aggregate("transaction")),
            "ledger-transaction-"
        );
        assert!(names.stream(&StreamId::new("bad-type", "1")).is_err());
        assert!(names.stream(&StreamId::new("account", "")).is_err());
    }

    #[test]
    fn prefixes_are_plain_words() {
        for bad in ["", "with-dash", "with space", "$system", &"x".repeat(65)] {
            assert!(StreamNames::new(bad).is_err(), "{bad:?}");
        }
        assert!(StreamNames::new("ledger_test_42").is_ok());
    }

    #[test]
    fn expected_versions_map_to_stream_states_and_back() {
        assert_eq!(expected_state(0), StreamState::NoStream);
        assert_eq!(expected_state(1), StreamState::StreamRevision(0));
        assert_eq!(expected_state(7), StreamState::StreamRevision(6));
        assert_eq!(version_of(CurrentRevision::NoStream), 0);
        assert_eq!(version_of(CurrentRevision::Current(0)), 1);
        assert_eq!(version_of(CurrentRevision::Current(6)), 7);
    }

    #[test]
    fn positions_map_both_ways_and_keep_their_order() {
        let early = Position {
            commit: 100,
            prepare: 100,
        };
        let same_commit = Position {
            commit: 100,
            prepare: 180,
        };
        let late = Position {
            commit: 250,
            prepare: 200,
        };
        let mapped: Vec<LogPosition> = [early, same_commit, late]
            .into_iter()
            .map(|position| log_position(position).expect("fits"))
            .collect();
        assert_eq!(
            mapped[1],
            LogPosition {
                commit: 100,
                index: 180
            }
        );
        assert!(mapped.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(
            early < same_commit && same_commit < late,
            "KurrentDB's order"
        );
        assert_eq!(
            kurrent_position(mapped[1]).expect("maps"),
            StreamPosition::Position(same_commit)
        );
        assert_eq!(
            kurrent_position(LogPosition::START).expect("maps"),
            StreamPosition::Start
        );
        assert!(
            log_position(Position::end()).is_err(),
            "u64::MAX does not fit"
        );
        assert!(
            kurrent_position(LogPosition {
                commit: -1,
                index: 0
            })
            .is_err()
        );
    }

    #[test]
    fn metadata_round_trips_with_kurrentdb_keys() {
        let metadata = EventMetadata {
            correlation_id: "corr".to_owned(),
            causation_id: "cause".to_owned(),
            actor: "saga".to_owned(),
            command_id: "cmd".to_owned(),
        };
        let bytes = serde_json::to_vec(&StoredMetadata::new(&metadata, "2")).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(json["$correlationId"], "corr");
        assert_eq!(json["$causationId"], "cause");
        assert_eq!(json["command_id"], "cmd");
        let (decoded, version) = StoredMetadata::decode(&bytes).expect("decodes");
        assert_eq!(decoded, metadata);
        assert_eq!(version, "2");
        let (empty, version) = StoredMetadata::decode(b"").expect("empty is fine");
        assert_eq!((empty, version.as_str()), (EventMetadata::default(), ""));
        let (partial, _) = StoredMetadata::decode(br#"{"actor":"x"}"#).expect("decodes");
        assert_eq!(partial.actor, "x");
        assert!(matches!(
            StoredMetadata::decode(b"not json"),
            Err(Error::EventStore(_))
        ));
    }

    #[test]
    fn new_events_carry_their_id_and_refuse_non_json_payloads() {
        let event = NewEvent {
            event_id: super::super::event_id("command", 0),
            event_type: "Opened".to_owned(),
            event_version: "1".to_owned(),
            payload: r#"{"a":1}"#.to_owned(),
            metadata: EventMetadata::default(),
        };
        assert!(event_data(&event).is_ok());
        let broken = NewEvent {
            payload: "{".to_owned(),
            ..event
        };
        assert!(matches!(event_data(&broken), Err(Error::Config(_))));
    }

    #[test]
    fn snapshots_keep_the_newest_of_a_format() {
        let snapshot = |version, state_version| Snapshot {
            version,
            state_version,
            state: "{}".to_owned(),
        };
        assert!(keeps(&snapshot(100, 1), &snapshot(50, 1)));
        assert!(keeps(&snapshot(100, 1), &snapshot(100, 1)));
        assert!(!keeps(&snapshot(100, 1), &snapshot(101, 1)));
        assert!(
            !keeps(&snapshot(100, 1), &snapshot(40, 2)),
            "a new format wins"
        );
        let stored = br#"{"version":3,"state_version":2,"state":{"balance":5}}"#;
        let decoded = decode_snapshot(stored).expect("decodes");
        assert_eq!((decoded.version, decoded.state_version), (3, 2));
        assert_eq!(decoded.state, r#"{"balance":5}"#);
        assert!(decode_snapshot(b"[]").is_err());
    }

    #[test]
    fn errors_say_whether_a_retry_is_safe() {
        let unknown = write_error("ledger-account-1", ::kurrentdb::Error::DeadlineExceeded);
        assert!(matches!(unknown, Error::CommitFailed(_)), "{unknown}");
        let read = read_error("reading $all", ::kurrentdb::Error::AccessDenied);
        assert!(matches!(read, Error::EventStore(_)));
        assert!(read.to_string().contains("reading $all"));
    }

    #[test]
    fn connection_strings_are_checked_without_echoing_them() {
        assert!(parse_url("kurrentdb://localhost:2113?tls=false").is_ok());
        assert!(parse_url("esdb://localhost:2113?tls=false").is_ok());
        let error = parse_url("postgres://admin:hunter2@localhost/ledger")
            .expect_err("not a KurrentDB URL")
            .to_string();
        assert!(error.contains("KURRENTDB_URL"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        let settings = KurrentDbSettings {
            url: "kurrentdb://admin:hunter2@localhost:2113".to_owned(),
            stream_prefix: "ledger".to_owned(),
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn a_log_is_created_without_a_server_and_fails_requests_cleanly() {
        // Nothing listens on this port: the client is lazy, so opening succeeds and the first
        // request fails with an error (not a panic), which is what `/health` reports.
        let settings = KurrentDbSettings {
            url: format!(
                "kurrentdb://127.0.0.1:{}?tls=false&maxDiscoverAttempts=1&discoveryInterval=10&gossipTimeout=200",
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|listener| listener.local_addr())
                    .map(|address| address.port())
                    .expect("a free port")
            ),
            stream_prefix: "ledger".to_owned(),
        };
        let log = KurrentDbEventLog::connect(&settings).await.expect("opens");
        assert!(!log.ping().await);
    }
}
