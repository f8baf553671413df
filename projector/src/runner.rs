//! The projector's follower: one reader of the log feeding every projection.
//!
//! Each batch is one database transaction: lock the projections' rows, read their live
//! generations and checkpoints, read the log once after the lowest checkpoint, decode each event
//! once, and for every projection fold the events after its own checkpoint, store what changed,
//! write changed transactions through to the cache, and move its checkpoint; then commit. A
//! crash anywhere rolls the whole batch back, so an event is applied exactly once. One projector
//! is active across instances (a leader lock); the row locks also make a second one harmless,
//! and serialise batches with a rebuild's switch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use infra::error::DatabaseContext;
use infra::eventlog::{EventLog, Lag, LogFilter, LogPosition};
use infra::follow::{Follower, Outcome};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::generations;
use crate::model::accounts::AccountsModel;
use crate::model::history::HistoryModel;
use crate::model::transactions::TransactionsModel;
use crate::model::{Decoded, DecodedBatch, Model, ProjectionName};

/// Publishes `projection_lag_events` and `projection_lag_seconds` for every projection until
/// `cancel` (see [`infra::log::report_lag`]), from the live checkpoints, whoever leads: a
/// projector whose batches fail shows as a growing lag.
pub async fn report_lag(pool: PgPool, log: Arc<dyn EventLog>, cancel: CancellationToken) {
    infra::log::report_lag("projection_lag", "projection", cancel, || async {
        let lags = measure_lag(&pool, &*log).await?;
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
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let checkpoints = generations::live_checkpoints(&mut connection).await?;
    drop(connection);
    let mut lags = Vec::with_capacity(checkpoints.len());
    for (name, _, position) in checkpoints {
        lags.push((name, log.lag(position, LogFilter::ALL).await?));
    }
    Ok(lags)
}

/// Applies decoded events to generation `generation` of `name`, writing changed transactions
/// through to `cache` (before the caller commits).
pub async fn apply(
    connection: &mut PgConnection,
    name: ProjectionName,
    generation: i32,
    events: &[Decoded<'_>],
    cache: Option<&Cache>,
) -> Result<()> {
    match name {
        ProjectionName::Accounts => {
            fold_and_store::<AccountsModel>(connection, generation, events).await?;
        }
        ProjectionName::Transactions => {
            let model = fold_and_store::<TransactionsModel>(connection, generation, events).await?;
            if let Some(cache) = cache {
                cache.put_all(model.changed()).await;
            }
        }
        ProjectionName::AccountHistory => {
            fold_and_store::<HistoryModel>(connection, generation, events).await?;
        }
    }
    Ok(())
}

async fn fold_and_store<M: Model>(
    connection: &mut PgConnection,
    generation: i32,
    events: &[Decoded<'_>],
) -> Result<M> {
    let mut model = M::load(connection, generation, events).await?;
    for event in events {
        model.fold(event)?;
    }
    model.store(connection, generation).await?;
    Ok(model)
}

/// Applies `batch` to every projection of `targets` (name, generation, checkpoint) after its own
/// checkpoint, moving each checkpoint: the step shared by the live projector and a rebuild.
/// Returns how many events were applied, all projections together.
pub async fn apply_batch(
    connection: &mut PgConnection,
    targets: &[(ProjectionName, i32, generations::Checkpoint)],
    batch: &DecodedBatch,
    cache: Option<&Cache>,
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
        apply(connection, *name, *generation, &events, cache).await?;
        generations::advance(connection, *name, *generation, last, events.len()).await?;
        applied += events.len();
    }
    Ok(applied)
}

/// How the projector reads.
#[derive(Debug, Clone, Copy)]
pub struct ProjectorSettings {
    pub batch_size: usize,
}

pub struct Projector {
    pool: PgPool,
    log: Arc<dyn EventLog>,
    cache: Option<Arc<Cache>>,
    settings: ProjectorSettings,
    /// False while the last batch failed: `/health` reports the projections stalled.
    healthy: Arc<AtomicBool>,
    /// The lowest live checkpoint after the last batch this instance committed: reads waiting
    /// for their position look here before asking the database.
    applied: watch::Sender<LogPosition>,
}

impl Projector {
    pub fn new(
        pool: PgPool,
        log: Arc<dyn EventLog>,
        cache: Option<Arc<Cache>>,
        settings: ProjectorSettings,
    ) -> Self {
        Projector {
            pool,
            log,
            cache,
            settings,
            healthy: Arc::new(AtomicBool::new(true)),
            applied: watch::channel(LogPosition::START).0,
        }
    }

    pub fn health_flag(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Where this instance's projections stand, moving after every batch it commits.
    pub fn applied(&self) -> watch::Receiver<LogPosition> {
        self.applied.subscribe()
    }

    /// Whether the log holds anything after the lowest live checkpoint, looked up without a
    /// transaction. An idle look must not take the projections' row locks: a row lock assigns a
    /// transaction id, so every idle look would burn one and hold back the snapshot horizon that
    /// every follower's read waits on. The locked batch reads the checkpoints again, so a stale
    /// answer here costs one empty batch.
    async fn has_work(&self) -> Result<bool> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?;
        let lowest = generations::live_checkpoints(&mut connection)
            .await?
            .into_iter()
            .map(|(_, _, position)| position)
            .min()
            .unwrap_or(LogPosition::START);
        drop(connection);
        self.applied.send_if_modified(|applied| {
            let moved = *applied < lowest;
            *applied = (*applied).max(lowest);
            moved
        });
        Ok(!self
            .log
            .read_all(lowest, 1, LogFilter::ALL)
            .await?
            .is_empty())
    }

    /// Applies one batch to every projection; returns how many events it read.
    pub async fn step(&self) -> Result<usize> {
        if !self.has_work().await? {
            self.healthy.store(true, Ordering::Relaxed);
            return Ok(0);
        }
        let started = Instant::now();
        let mut transaction = self
            .pool
            .begin()
            .await
            .context("starting a projection batch")?;
        metrics::histogram!("db_pool_acquire_seconds", "pool" => "projector")
            .record(started.elapsed().as_secs_f64());
        let targets = generations::lock_all_live(&mut transaction).await?;
        let lowest = targets
            .iter()
            .map(|(_, _, checkpoint)| checkpoint.position)
            .min()
            .unwrap_or(LogPosition::START);
        let events = self
            .log
            .read_all(lowest, self.settings.batch_size, LogFilter::ALL)
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(0);
        };
        let read = events.len();
        if let Some(first) = events.first() {
            infra::follow::record_event_age("projector", first.recorded_at);
        }
        let batch = DecodedBatch::new(events)?;
        apply_batch(&mut transaction, &targets, &batch, self.cache.as_deref()).await?;
        transaction
            .commit()
            .await
            .context("committing a projection batch")?;
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
        Ok(read)
    }
}

#[async_trait]
impl Follower for Projector {
    type Session = ();
    type Error = Error;

    fn name(&self) -> &'static str {
        "projector"
    }

    async fn lead(&self) -> Result<()> {
        Ok(())
    }

    async fn try_process_batch(&self, _session: &mut ()) -> Result<Outcome> {
        match self.step().await {
            Ok(0) => Ok(Outcome::Idle),
            Ok(events) => Ok(Outcome::Processed(events)),
            Err(error) => {
                self.healthy.store(false, Ordering::Relaxed);
                metrics::counter!("projection_batch_failures_total").increment(1);
                Err(error)
            }
        }
    }
}
