//! Read-your-writes (SPEC §5): a GET sending `X-Ledger-Position` waits, up to
//! [`POSITION_WAIT`], until every projection has applied the log up to that position.
//!
//! Waiting is bounded so that it cannot become a lever against the read side:
//! - a position beyond the log's head (one no write of this ledger returned) is refused at once
//!   with 400 `position_unreachable`, instead of waiting the full 2 s for something that will
//!   never come;
//! - at most `POSITION_WAITERS_MAX` requests wait at once; the next one gets 503
//!   `too_many_waiting_reads` with `Retry-After` at once;
//! - waiters share one read of the checkpoints at a time (single flight), on a pool of their
//!   own, and the head is read on another: neither touches the connections the projection
//!   runners and the queries use, so a flood of waiting reads cannot stall the projections;
//! - when this instance runs the projector, its progress wakes every waiter the moment a batch
//!   commits, with no read at all; the checkpoints are still read, at a slowing pace, since
//!   another instance may be the one running it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use infra::eventlog::EventLog;
use infra::log::LogPosition;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::time::Instant;

use super::{POSITION_HEADER, WantedPosition};
use crate::error::{Error, Result};
use crate::store::ReadModels;

/// How long a read waits for the read side to reach the caller's position.
pub const POSITION_WAIT: Duration = Duration::from_secs(2);

/// Reads that may wait at once, per instance: a burst of clients each reading their own write
/// right after it is a few dozen; beyond 64 the wait itself is the problem (the read side is
/// behind) and a quick 503 with `Retry-After` serves the clients better than a queue.
pub const WAITERS_MAX: u32 = 64;

/// Connections of the waiters' checkpoint pool. Reads are single flight, so one is all the pool
/// ever uses at a time.
pub const POOL_CONNECTIONS: u32 = 1;

/// How old a shared read of the checkpoints may be for a waiter to use it instead of reading
/// again: 5 ms, the projections' own pace when busy. It bounds the database work of any number
/// of waiters to 200 small reads a second.
const CHECKPOINTS_FRESHNESS: Duration = Duration::from_millis(5);

/// A waiter's pause between looks at the checkpoints: first soon, then less and less often.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

/// What the waiters share.
pub struct Positions {
    /// The read models, for the live checkpoints (on connections of the waiters' own).
    checkpoints: Arc<dyn ReadModels>,
    /// The event log, for its head (on a connection of its own).
    log: Arc<dyn EventLog>,
    /// This instance's projector's progress, when it runs one.
    applied: Option<watch::Receiver<LogPosition>>,
    waiters: Arc<Semaphore>,
    /// The last read of the checkpoints: when it started, and what it found.
    reached: Mutex<Option<(Instant, LogPosition)>>,
    /// The last read of the log's head: when it started, and the highest head seen.
    head: Mutex<Option<(Instant, LogPosition)>>,
}

impl Positions {
    /// The waiters' state: `checkpoints` and `log` should be the waiters' own (small,
    /// read-only pools); `applied` is the projector's progress when this instance runs it.
    pub fn new(
        checkpoints: Arc<dyn ReadModels>,
        log: Arc<dyn EventLog>,
        applied: Option<watch::Receiver<LogPosition>>,
        waiters_max: u32,
    ) -> Positions {
        Positions {
            checkpoints,
            log,
            applied,
            waiters: Arc::new(Semaphore::new(
                usize::try_from(waiters_max).unwrap_or(usize::MAX),
            )),
            reached: Mutex::new(None),
            head: Mutex::new(None),
        }
    }

    /// Closes the waiters' pool.
    pub async fn close(&self) {
        self.checkpoints.close().await;
    }

    /// What this instance's projector has applied, if it runs here.
    fn applied(&self) -> LogPosition {
        self.applied
            .as_ref()
            .map_or(LogPosition::START, |applied| *applied.borrow())
    }

    /// Waits until every projection has applied the log up to `wanted` and returns the headers
    /// that say so; without a wanted position, returns at once.
    pub async fn reach(&self, wanted: &WantedPosition) -> Result<HeaderMap> {
        let Some(wanted) = wanted.0 else {
            return Ok(HeaderMap::new());
        };
        let arrived = Instant::now();
        let applied = self.applied();
        if applied >= wanted {
            return Ok(reached_headers(applied, arrived));
        }
        let reached = self.reached(fresh_since(arrived)).await?;
        if reached >= wanted {
            return Ok(reached_headers(reached, arrived));
        }
        if !self.reachable(wanted, arrived).await? {
            return Err(Error::PositionUnreachable {
                wanted: wanted.to_string(),
            });
        }
        let Ok(_permit) = self.waiters.clone().try_acquire_owned() else {
            return Err(Error::TooManyWaitingReads);
        };
        let mut applied = self.applied.clone();
        let mut poll = POLL_FIRST;
        let mut next_read = Instant::now() + poll;
        loop {
            if arrived.elapsed() >= POSITION_WAIT {
                return Err(Error::PositionNotReached {
                    wanted: wanted.to_string(),
                    reached: self.reached(Instant::now()).await?.to_string(),
                });
            }
            let deadline = (arrived + POSITION_WAIT).min(next_read);
            // Woken by this instance's projector committing a batch, or by the next read's time.
            let progressed = match applied.as_mut() {
                Some(receiver) => tokio::select! {
                    changed = receiver.changed() => changed.is_ok(),
                    () = tokio::time::sleep_until(deadline) => false,
                },
                None => {
                    tokio::time::sleep_until(deadline).await;
                    false
                }
            };
            if progressed {
                let now = applied
                    .as_ref()
                    .map_or(LogPosition::START, |receiver| *receiver.borrow());
                if now >= wanted {
                    return Ok(reached_headers(now, arrived));
                }
                continue;
            }
            poll = (poll * 2).min(POLL_MAX);
            next_read = Instant::now() + poll;
            let reached = self.reached(fresh_since(Instant::now())).await?;
            if reached >= wanted {
                return Ok(reached_headers(reached, arrived));
            }
        }
    }

    /// The lowest live checkpoint, read no earlier than `not_before`: one read at a time, every
    /// waiter that queued behind it takes its answer.
    async fn reached(&self, not_before: Instant) -> Result<LogPosition> {
        let mut cached = self.reached.lock().await;
        if let Some((read_at, position)) = *cached
            && read_at >= not_before
        {
            return Ok(position);
        }
        let read_at = Instant::now();
        let position = self.checkpoints.read_position().await?;
        *cached = Some((read_at, position));
        Ok(position)
    }

    /// Whether `wanted` is at or below the log's head. The head only grows, so a head seen
    /// earlier that is high enough answers at once; otherwise the head is read again unless a
    /// read started after this request arrived (which sees every write acknowledged before it).
    async fn reachable(&self, wanted: LogPosition, arrived: Instant) -> Result<bool> {
        let mut cached = self.head.lock().await;
        if let Some((read_at, head)) = *cached
            && (wanted <= head || read_at >= arrived)
        {
            return Ok(wanted <= head);
        }
        let read_at = Instant::now();
        let head = self.log.head().await?;
        let highest = cached.map_or(head, |(_, known)| known.max(head));
        *cached = Some((read_at, highest));
        Ok(wanted <= highest)
    }
}

/// The oldest start of a checkpoint read a waiter at `now` may use.
fn fresh_since(now: Instant) -> Instant {
    now.checked_sub(CHECKPOINTS_FRESHNESS).unwrap_or(now)
}

fn reached_headers(reached: LogPosition, arrived: Instant) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&reached.to_string()) {
        headers.insert(POSITION_HEADER, value);
    }
    metrics::histogram!("read_your_writes_wait_seconds").record(arrived.elapsed().as_secs_f64());
    headers
}
