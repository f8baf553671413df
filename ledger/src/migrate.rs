//! `ledger migrate-log`: copies an event log, in commit order, from one store to another through
//! the event-log seam (PostgreSQL to the embedded mode's SQLite, or to KurrentDB), then proves
//! the copy by counts and a digest of both logs.
//!
//! **Order.** Source events are read in commit order and appended in that order, consecutive
//! events of one stream together, each append at the version its first event had in the source.
//! A target therefore holds a prefix of the source in the same order, whatever moment a copy
//! stopped at.
//!
//! **Resuming.** A run counts what the target holds (`N` events: the first `N` of the source)
//! and appends from the `N+1`-th. The appends are idempotent anyway (the source's event ids at
//! the source's versions): an append the target already holds comes back as a duplicate and
//! writes nothing, and one that does not fit (a target holding other events) is a conflict,
//! which stops the copy with an error rather than writing a log that differs.
//!
//! **Verifying.** SHA-256 over every event in commit order: stream, version, event id, type,
//! schema version, payload text and metadata, each length-prefixed. The times of the events are
//! not compared: each store stamps its own.
//!
//! **Not copied:** identity (customers, credentials), the fraud rules' counters, read models
//! and the followers' checkpoints. Read models are rebuilt from the copied log
//! (`ledger rebuild`), which is what makes them trustworthy.

use std::collections::HashSet;

use infra::eventlog::{
    Append, AppendOutcome, EventLog, LogFilter, LogPosition, NewEvent, RecordedEvent, StreamId,
};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySummary {
    /// Events the target held when the run started (a resumed copy).
    pub already_there: u64,
    /// Events this run appended.
    pub appended: u64,
    /// Appends the target recognised as written before (events appended again after an
    /// interruption between the count and the write).
    pub duplicates: u64,
    /// Whether the run stopped at `--max-events` with more of the source left to copy.
    pub stopped_early: bool,
}

/// Where a copy is, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum CopyProgress {
    /// The target holds `already_there` events; the source about `estimate` in all.
    Started { already_there: u64, estimate: u64 },
    /// `copied` source events are in the target (skipped or appended).
    Copied { copied: u64 },
}

/// A log's event count and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDigest {
    pub events: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// Adds one event to a digest: every field that must survive a copy, length-prefixed so no two
/// different events hash alike by shifting bytes between fields.
fn hash_event(hasher: &mut Sha256, event: &RecordedEvent) {
    let metadata = &event.metadata;
    let event_id = event.event_id.to_string();
    let sequence = event.sequence.to_string();
    for field in [
        event.stream.aggregate_type.as_str(),
        event.stream.aggregate_id.as_str(),
        sequence.as_str(),
        event_id.as_str(),
        event.event_type.as_str(),
        event.event_version.as_str(),
        event.payload.as_str(),
        metadata.correlation_id.as_str(),
        metadata.causation_id.as_str(),
        metadata.actor.as_str(),
        metadata.command_id.as_str(),
    ] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
}

/// Reads the whole log in commit order, `batch` events at a time, calling `each` on every batch
/// until it says to stop.
async fn for_each_batch(log: &dyn EventLog, batch: usize, mut each: impl AsyncBatch) -> Result<()> {
    let mut after = LogPosition::START;
    loop {
        let events = log.read_all(after, batch, LogFilter::ALL).await?;
        let Some(last) = events.last() else {
            return Ok(());
        };
        after = last.position;
        if !each.call(events).await? {
            return Ok(());
        }
    }
}

/// A batch callback that may await (closures returning futures that borrow are awkward).
/// `Ok(false)`: stop reading.
trait AsyncBatch {
    async fn call(&mut self, events: Vec<RecordedEvent>) -> Result<bool>;
}

struct Digesting<'a> {
    hasher: Sha256,
    events: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl AsyncBatch for &mut Digesting<'_> {
    async fn call(&mut self, events: Vec<RecordedEvent>) -> Result<bool> {
        for event in &events {
            hash_event(&mut self.hasher, event);
        }
        self.events += events.len() as u64;
        (self.progress)(self.events);
        Ok(true)
    }
}

/// The count and digest of a whole log.
pub async fn digest(
    log: &dyn EventLog,
    batch: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<LogDigest> {
    let mut state = Digesting {
        hasher: Sha256::new(),
        events: 0,
        progress,
    };
    for_each_batch(log, batch, &mut state).await?;
    Ok(LogDigest {
        events: state.events,
        sha256: hex::encode(state.hasher.finalize()),
    })
}

/// Cuts a batch of source events into appends: runs of consecutive events of one stream, each
/// at the version its first event had in the source.
pub fn appends_of(events: &[RecordedEvent]) -> Vec<Append> {
    let mut appends: Vec<Append> = Vec::new();
    for event in events {
        let new = NewEvent {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload: event.payload.clone(),
            metadata: event.metadata.clone(),
        };
        if let Some(open) = appends.last_mut()
            && open.stream == event.stream
            && open.expected_version + open.events.len() as u64 + 1 == event.sequence
        {
            open.events.push(new);
            continue;
        }
        appends.push(Append {
            stream: event.stream.clone(),
            expected_version: event.sequence.saturating_sub(1),
            events: vec![new],
        });
    }
    appends
}

struct Copying<'a> {
    target: &'a dyn EventLog,
    /// Source events still to pass over: the target holds them already.
    skip: u64,
    /// Events this run may still append (`--max-events`).
    budget: u64,
    copied: u64,
    summary: CopySummary,
    progress: &'a mut dyn FnMut(CopyProgress),
}

impl AsyncBatch for &mut Copying<'_> {
    async fn call(&mut self, events: Vec<RecordedEvent>) -> Result<bool> {
        let skipped = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(events.len());
        self.skip -= skipped as u64;
        self.copied += skipped as u64;
        let budget = usize::try_from(self.budget).unwrap_or(usize::MAX);
        let end = events.len().min(skipped.saturating_add(budget));
        let rest = &events[skipped..end];
        self.budget -= rest.len() as u64;
        // One call may name a stream once: a stream met again starts the next call.
        let mut call: Vec<Append> = Vec::new();
        let mut streams: HashSet<StreamId> = HashSet::new();
        for append in appends_of(rest) {
            if !streams.insert(append.stream.clone()) {
                self.send(std::mem::take(&mut call)).await?;
                streams.clear();
                streams.insert(append.stream.clone());
            }
            call.push(append);
        }
        self.send(call).await?;
        (self.progress)(CopyProgress::Copied {
            copied: self.copied,
        });
        Ok(self.budget > 0)
    }
}

impl Copying<'_> {
    /// Appends `appends` (no stream twice) and counts what became of them.
    async fn send(&mut self, appends: Vec<Append>) -> Result<()> {
        if appends.is_empty() {
            return Ok(());
        }
        let outcomes = self.target.append(appends.clone()).await?;
        for (append, outcome) in appends.iter().zip(outcomes) {
            let count = append.events.len() as u64;
            match outcome {
                AppendOutcome::Appended { .. } => self.summary.appended += count,
                AppendOutcome::Duplicate { .. } => self.summary.duplicates += 1,
                AppendOutcome::Conflict => {
                    return Err(Error::Usage(format!(
                        "the target's stream {} does not hold what the source held before \
                         version {}: it is not a copy of this log (use an empty target)",
                        append.stream,
                        append.expected_version + 1
                    )));
                }
            }
            self.copied += count;
        }
        Ok(())
    }
}

/// Copies `source` into `target` in commit order, resuming after what the target holds, and
/// appending at most `max_events` events in this run (all when `None`).
pub async fn copy(
    source: &dyn EventLog,
    target: &dyn EventLog,
    batch: usize,
    max_events: Option<u64>,
    progress: &mut dyn FnMut(CopyProgress),
) -> Result<CopySummary> {
    let already_there = digest(target, batch, &mut |_| {}).await?.events;
    let estimate = source
        .lag(LogPosition::START, LogFilter::ALL)
        .await
        .map(|lag| u64::try_from(lag.events).unwrap_or(0))
        .unwrap_or(0);
    progress(CopyProgress::Started {
        already_there,
        estimate,
    });
    let mut state = Copying {
        target,
        skip: already_there,
        budget: max_events.unwrap_or(u64::MAX),
        copied: 0,
        summary: CopySummary {
            already_there,
            appended: 0,
            duplicates: 0,
            stopped_early: false,
        },
        progress,
    };
    for_each_batch(source, batch, &mut state).await?;
    if state.skip > 0 && state.budget > 0 {
        return Err(Error::Usage(format!(
            "the target holds {already_there} events, more than the source: it is not a copy \
             of this log"
        )));
    }
    state.summary.stopped_early = state.budget == 0;
    Ok(state.summary)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use infra::eventlog::EventMetadata;
    use uuid::Uuid;

    use super::*;

    fn event(stream: &StreamId, sequence: u64, index: i64) -> RecordedEvent {
        RecordedEvent {
            position: LogPosition { commit: 1, index },
            event_id: Uuid::new_v4(),
            recorded_at: Utc::now(),
            stream: stream.clone(),
            sequence,
            event_type: "Tested".to_owned(),
            event_version: "1".to_owned(),
            payload: "{}".to_owned(),
            metadata: EventMetadata::default(),
        }
    }

    #[test]
    fn consecutive_events_of_a_stream_go_together_at_their_source_version() {
        let (a, b) = (StreamId::new("account", "a"), StreamId::new("account", "b"));
        let events = [
            event(&a, 3, 1),
            event(&a, 4, 2),
            event(&b, 1, 3),
            event(&a, 5, 4),
            event(&a, 7, 5),
        ];
        let appends = appends_of(&events);
        let shape: Vec<(&str, u64, usize)> = appends
            .iter()
            .map(|append| {
                (
                    append.stream.aggregate_id.as_str(),
                    append.expected_version,
                    append.events.len(),
                )
            })
            .collect();
        assert_eq!(shape, [("a", 2, 2), ("b", 0, 1), ("a", 4, 1), ("a", 6, 1)]);
        assert_eq!(appends[0].events[1].event_id, events[1].event_id);
    }

    #[test]
    fn the_digest_sees_every_field_and_their_boundaries() {
        let stream = StreamId::new("account", "a");
        let one = event(&stream, 1, 1);
        let hash = |event: &RecordedEvent| {
            let mut hasher = Sha256::new();
            hash_event(&mut hasher, event);
            hex::encode(hasher.finalize())
        };
        let mut other = one.clone();
        other.recorded_at = Utc::now() + chrono::TimeDelta::days(1);
        other.position = LogPosition {
            commit: 99,
            index: 99,
        };
        assert_eq!(
            hash(&one),
            hash(&other),
            "times and positions are the store's own"
        );
        let mut changed = one.clone();
        changed.metadata.actor = "someone".to_owned();
        assert_ne!(hash(&one), hash(&changed));
        let mut shifted = one.clone();
        shifted.event_type = "Teste".to_owned();
        shifted.event_version = "d1".to_owned();
        assert_ne!(hash(&one), hash(&shifted), "fields are length-prefixed");
    }
}
