//! The projector's follower: one reader of the log feeding every projection.
//!
//! Each batch reads the log once after the lowest live checkpoint and decodes each event once;
//! then every projection, under its own row lock, reads its live generation and checkpoint,
//! folds the events after that checkpoint, stores what changed (writing changed transactions
//! through to the cache) and moves its checkpoint, in the same database transaction as its rows.
//! PostgreSQL runs the projections' transactions concurrently, SQLite in one transaction (its one
//! writer). A crash anywhere rolls back what a projection had not committed, so an event is
//! applied exactly once to each projection. One projector is active across instances (a leader
//! lock); the row locks also make a second one harmless, and serialise batches with a rebuild's
//! switch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use infra::eventlog::{EventLog, Lag, LogFilter, LogPosition};
use infra::follow::{Follower, Outcome};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::generations;
use crate::model::accounts::AccountsModel;
use crate::model::history::HistoryModel;
use crate::model::transactions::{Remembered, TransactionMemory, TransactionsModel};
use crate::model::{Db, Decoded, DecodedBatch, Model, ProjectionName};
use crate::store::{EventSource, LogSource, PgReadModels, ReadModels};

/// Publishes `projection_lag_events` and `projection_lag_seconds` for every projection until
/// `cancel` (see [`infra::log::report_lag`]), from the live checkpoints, whoever leads: a
/// projector whose batches fail shows as a growing lag.
pub async fn report_lag(
    models: Arc<dyn ReadModels>,
    log: Arc<dyn EventLog>,
    cancel: CancellationToken,
) {
    infra::log::report_lag("projection_lag", "projection", cancel, || async {
        let lags = measure_lag_of(&*models, &*log).await?;
        Ok::<_, Error>(
            lags.into_iter()
                .map(|(name, lag)| (name.as_str(), lag))
                .collect(),
        )
    })
    .await;
}

/// How far each projection's live checkpoint is behind the log.
pub async fn measure_lag(pool: &PgPool, log: &dyn EventLog) -> Result<Vec<(ProjectionName, Lag)>> {
    measure_lag_of(&PgReadModels::new(pool.clone()), log).await
}

/// How far each projection's live checkpoint in `models` is behind the log.
pub async fn measure_lag_of(
    models: &dyn ReadModels,
    log: &dyn EventLog,
) -> Result<Vec<(ProjectionName, Lag)>> {
    let checkpoints = models.live_checkpoints().await?;
    let mut lags: Vec<(ProjectionName, Lag)> = Vec::with_capacity(checkpoints.len());
    let mut measured: Vec<(LogPosition, Lag)> = Vec::with_capacity(checkpoints.len());
    for (name, _, position) in checkpoints {
        // The live projections advance together, so they usually share one checkpoint: count
        // the events after it once (a count is a scan of up to LAG_COUNT_CAP index entries).
        let lag = match measured.iter().find(|(at, _)| *at == position) {
            Some((_, lag)) => *lag,
            None => {
                let lag = log.lag(position, LogFilter::ALL).await?;
                measured.push((position, lag));
                lag
            }
        };
        lags.push((name, lag));
    }
    Ok(lags)
}

/// Applies decoded events to generation `generation` of `name`, writing changed transactions
/// through to `cache` (before the caller commits).
pub async fn apply(
    db: &mut Db<'_>,
    name: ProjectionName,
    generation: i32,
    events: &[Decoded<'_>],
    cache: Option<&Cache>,
    mut memory: Option<&mut Remembered>,
) -> Result<()> {
    match name {
        ProjectionName::Accounts => {
            fold_and_store::<AccountsModel>(db, generation, events).await?;
        }
        ProjectionName::Transactions => {
            let loaded =
                TransactionsModel::load_remembering(db, generation, events, memory.as_deref_mut())
                    .await?;
            let mut model = fold_all(loaded, events)?;
            match cache {
                // The write-through while the rows are stored: both are done before the
                // caller commits, as when they ran one after the other (decision 64).
                Some(cache) => {
                    let changed: Vec<_> = model.changed().cloned().collect();
                    let (stored, ()) =
                        tokio::join!(model.store(db, generation), cache.put_all(&changed));
                    stored?;
                }
                None => model.store(db, generation).await?,
            }
            if let Some(memory) = memory {
                model.remember(memory);
            }
        }
        ProjectionName::AccountHistory => {
            fold_and_store::<HistoryModel>(db, generation, events).await?;
        }
    }
    Ok(())
}

async fn fold_and_store<M: Model>(
    db: &mut Db<'_>,
    generation: i32,
    events: &[Decoded<'_>],
) -> Result<M> {
    let mut model = load_and_fold::<M>(db, generation, events).await?;
    model.store(db, generation).await?;
    Ok(model)
}

/// Loads the rows `events` touch from generation `generation` and folds the events into them.
async fn load_and_fold<M: Model>(
    db: &mut Db<'_>,
    generation: i32,
    events: &[Decoded<'_>],
) -> Result<M> {
    fold_all(M::load(db, generation, events).await?, events)
}

/// Folds `events` into the rows a model loaded for them.
fn fold_all<M: Model>(mut model: M, events: &[Decoded<'_>]) -> Result<M> {
    for event in events {
        model.fold(event)?;
    }
    Ok(model)
}

/// Applies `batch` to every projection of `targets` (name, generation, checkpoint) after its own
/// checkpoint, moving each checkpoint: the step shared by the live projector and a rebuild.
/// Returns how many events were applied, all projections together.
pub async fn apply_batch(
    db: &mut Db<'_>,
    targets: &[(ProjectionName, i32, generations::Checkpoint)],
    batch: &DecodedBatch,
    cache: Option<&Cache>,
    memory: Option<&TransactionMemory>,
) -> Result<usize> {
    let Some(last) = batch.last_position() else {
        return Ok(0);
    };
    let mut applied = 0;
    for (name, generation, checkpoint) in targets {
        let events = batch.after(checkpoint.position, checkpoint.events_applied);
        if events.is_empty() {
            continue;
        }
        let mut remembered = memory
            .filter(|_| *name == ProjectionName::Transactions)
            .map(|memory| (memory, memory.take(*generation, checkpoint.position)));
        apply(
            db,
            *name,
            *generation,
            &events,
            cache,
            remembered.as_mut().map(|(_, remembered)| remembered),
        )
        .await?;
        generations::advance(db, *name, *generation, last, events.len()).await?;
        if let Some((memory, remembered)) = remembered {
            memory.keep(remembered, last);
        }
        applied += events.len();
    }
    Ok(applied)
}

/// The body of one live batch inside the store's transaction (see
/// [`ReadModels::apply_live`]): lock the projections, read the log after the lowest live
/// checkpoint, decode once, apply and advance. The caller commits.
pub async fn live_batch(
    db: &mut Db<'_>,
    source: &dyn EventSource,
    batch_size: usize,
    cache: Option<&Cache>,
    memory: Option<&TransactionMemory>,
) -> Result<Option<DecodedBatch>> {
    let targets = generations::lock_all_live(db).await?;
    let lowest = targets
        .iter()
        .map(|(_, _, checkpoint)| checkpoint.position)
        .min()
        .unwrap_or(LogPosition::START);
    let Some(batch) = read_batch(source, lowest, batch_size).await? else {
        return Ok(None);
    };
    apply_batch(db, &targets, &batch, cache, memory).await?;
    Ok(Some(batch))
}

/// Up to `batch_size` events after `after` from `source`, decoded once for every projection;
/// `None` when there are none. Records how old the first one is.
pub async fn read_batch(
    source: &dyn EventSource,
    after: LogPosition,
    batch_size: usize,
) -> Result<Option<DecodedBatch>> {
    let events = source.read_after(after, batch_size).await?;
    let Some(first) = events.first() else {
        return Ok(None);
    };
    infra::follow::record_event_age("projector", first.recorded_at);
    Ok(Some(DecodedBatch::new(events)?))
}

/// One projection's share of a live batch read from `read_from` (see
/// [`ReadModels::apply_live`]), inside the caller's transaction: lock the projection, read its
/// live generation and checkpoint, apply the events of `batch` after it and move it. The caller
/// commits. Returns how many events were applied: none when the checkpoint is already past the
/// batch, or (which the caller's read of the checkpoints rules out) behind where it was read.
pub async fn live_projection(
    db: &mut Db<'_>,
    name: ProjectionName,
    read_from: LogPosition,
    batch: &DecodedBatch,
    cache: Option<&Cache>,
    memory: Option<&TransactionMemory>,
) -> Result<usize> {
    let (generation, checkpoint) = generations::lock_live(db, name).await?;
    if checkpoint.position < read_from {
        // The batch does not hold the events right after this checkpoint; the next one will.
        return Ok(0);
    }
    apply_batch(db, &[(name, generation, checkpoint)], batch, cache, memory).await
}

/// Events the projector applies per batch, unless configured (`PROJECTOR_BATCH_SIZE`).
pub const BATCH_SIZE_DEFAULT: usize = 1_000;

/// How the projector reads.
#[derive(Debug, Clone, Copy)]
pub struct ProjectorSettings {
    pub batch_size: usize,
}

pub struct Projector {
    models: Arc<dyn ReadModels>,
    log: Arc<dyn EventLog>,
    cache: Option<Arc<Cache>>,
    settings: ProjectorSettings,
    /// False while the last batch failed: `/health` reports the projections stalled.
    healthy: Arc<AtomicBool>,
    /// The lowest live checkpoint after the last batch this instance committed: reads waiting
    /// for their position look here before asking the database.
    applied: watch::Sender<LogPosition>,
    /// The transactions in flight as this instance's last batch stored them (decision 70).
    memory: TransactionMemory,
}

impl Projector {
    pub fn new(
        models: Arc<dyn ReadModels>,
        log: Arc<dyn EventLog>,
        cache: Option<Arc<Cache>>,
        settings: ProjectorSettings,
    ) -> Self {
        Projector {
            models,
            log,
            cache,
            settings,
            healthy: Arc::new(AtomicBool::new(true)),
            applied: watch::channel(LogPosition::START).0,
            memory: TransactionMemory::default(),
        }
    }

    pub fn health_flag(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Where this instance's projections stand, moving after every batch it commits.
    pub fn applied(&self) -> watch::Receiver<LogPosition> {
        self.applied.subscribe()
    }

    /// Applies one batch to every projection; returns how many events it read. One look at the
    /// checkpoints, without a transaction, says where to read from; the store takes its locks
    /// only once it has read something (an idle look must not take the projections' row locks:
    /// a row lock assigns a transaction id, so every idle look would burn one and hold back the
    /// snapshot horizon that every follower's read waits on).
    pub async fn step(&self) -> Result<usize> {
        let lowest = self.models.read_position().await?;
        Ok(self.step_from(lowest).await?.0)
    }

    /// [`Projector::step`] from `lowest`, which must be at or below every live checkpoint (the
    /// lowest one as read, or where this instance's last batch left them all: checkpoints only
    /// move forward). Reading from below a checkpoint is safe: each projection applies only
    /// what is after its own. Returns how many events it read and where the next batch can be
    /// read from: `lowest` when there were none, else the batch's last event, which every
    /// projection has reached.
    async fn step_from(&self, lowest: LogPosition) -> Result<(usize, LogPosition)> {
        let started = Instant::now();
        self.applied.send_if_modified(|applied| {
            let moved = *applied < lowest;
            *applied = (*applied).max(lowest);
            moved
        });
        let log = LogSource(&*self.log);
        let Some(batch) = self
            .models
            .apply_live(
                &log,
                lowest,
                self.settings.batch_size,
                self.cache.as_deref(),
                Some(&self.memory),
            )
            .await?
        else {
            self.healthy.store(true, Ordering::Relaxed);
            return Ok((0, lowest));
        };
        let read = batch.events.len();
        let last = batch.last_position().unwrap_or(LogPosition::START);
        self.healthy.store(true, Ordering::Relaxed);
        self.applied
            .send_modify(|applied| *applied = (*applied).max(last));
        metrics::counter!("projection_events_applied_total").increment(read as u64);
        metrics::histogram!("projection_batch_seconds").record(started.elapsed().as_secs_f64());
        let mut correlation_ids: Vec<&str> = batch
            .events
            .iter()
            .map(|event| event.metadata.correlation_id.as_str())
            .collect();
        correlation_ids.sort_unstable();
        correlation_ids.dedup();
        tracing::info!(
            events = read,
            position = %last,
            elapsed_ms = started.elapsed().as_millis() as u64,
            correlation_ids = %correlation_ids.join(","),
            "projection batch applied"
        );
        Ok((read, last))
    }
}

/// What a leadership session of the projector keeps: where its batches left every live
/// checkpoint, so the next batch need not read them first (decision 67). `None` until the
/// session's first batch, and again after each housekeeping, which follows anything that moved
/// them elsewhere (a switch moves them forward, never back).
#[derive(Debug, Default)]
pub struct ProjectorSession {
    read_from: Option<LogPosition>,
}

#[async_trait]
impl Follower for Projector {
    type Session = ProjectorSession;
    type Error = Error;

    fn name(&self) -> &'static str {
        "projector"
    }

    async fn lead(&self) -> Result<ProjectorSession> {
        Ok(ProjectorSession::default())
    }

    async fn try_process_batch(&self, session: &mut ProjectorSession) -> Result<Outcome> {
        let outcome = async {
            let lowest = match session.read_from {
                Some(lowest) => lowest,
                None => self.models.read_position().await?,
            };
            self.step_from(lowest).await
        }
        .await;
        match outcome {
            Ok((0, next)) => {
                session.read_from = Some(next);
                Ok(Outcome::Idle)
            }
            Ok((events, next)) => {
                session.read_from = Some(next);
                // The projector's log listens for command-api's commits.
                Ok(Outcome::of_batch(
                    events,
                    self.settings.batch_size,
                    &*self.log,
                ))
            }
            Err(error) => {
                self.healthy.store(false, Ordering::Relaxed);
                metrics::counter!("projection_batch_failures_total").increment(1);
                Err(error)
            }
        }
    }

    async fn housekeeping(&self, session: &mut ProjectorSession) -> Result<()> {
        session.read_from = None;
        Ok(())
    }
}
