//! The projection runner: follows the log with the gap-safe reader and applies it to the live
//! generation of one projection, batch by batch. Each batch is one database transaction: lock
//! the projection row, read the checkpoint, load the rows the events touch, fold, store, write
//! the cache through, move the checkpoint, commit. A crash anywhere rolls the whole batch back,
//! so an event is applied exactly once. One runner per projection is active across instances
//! (a leader lock); the row lock also makes a second one harmless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use infra::error::DatabaseContext;
use infra::leader::Leadership;
use infra::log::{Lag, LogEvent, LogReader};
use infra::tasks::pause;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::error::Result;
use crate::generations;
use crate::model::accounts::AccountsModel;
use crate::model::history::HistoryModel;
use crate::model::transactions::TransactionsModel;
use crate::model::{Decoded, Model, ProjectionName};

/// How long a runner waits after a failed batch before trying again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Publishes `projection_lag_events` and `projection_lag_seconds` for every projection until
/// `cancel` (see [`infra::log::report_lag`]), from the live checkpoints, whoever leads each
/// projection: a projection whose batches fail shows as a growing lag.
pub async fn report_lag(pool: PgPool, reader: LogReader, cancel: CancellationToken) {
    infra::log::report_lag("projection_lag", "projection", cancel, || async {
        let lags = measure_lag(&pool, &reader).await?;
        Ok::<_, crate::Error>(
            lags.into_iter()
                .map(|(name, lag)| (name.as_str(), lag))
                .collect(),
        )
    })
    .await;
}

/// How far each projection's live checkpoint is behind the log.
pub async fn measure_lag(pool: &PgPool, reader: &LogReader) -> Result<Vec<(ProjectionName, Lag)>> {
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let checkpoints = generations::live_checkpoints(&mut connection).await?;
    drop(connection);
    let mut lags = Vec::with_capacity(checkpoints.len());
    for (name, _, position) in checkpoints {
        lags.push((name, reader.lag(position, None).await?));
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

/// How a runner reads and pauses.
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    pub batch_size: i64,
    pub poll_interval: Duration,
}

pub struct Runner {
    name: ProjectionName,
    pool: PgPool,
    reader: LogReader,
    cache: Option<Arc<Cache>>,
    settings: RunnerSettings,
    /// False while the runner's last batch failed: `/health` reports the projection stalled.
    healthy: Arc<AtomicBool>,
}

impl Runner {
    pub fn new(
        name: ProjectionName,
        pool: PgPool,
        reader: LogReader,
        cache: Option<Arc<Cache>>,
        settings: RunnerSettings,
    ) -> Self {
        Runner {
            name,
            pool,
            reader,
            cache,
            settings,
            healthy: Arc::new(AtomicBool::new(true)),
        }
    }

    pub fn name(&self) -> ProjectionName {
        self.name
    }

    pub fn health_flag(&self) -> Arc<AtomicBool> {
        self.healthy.clone()
    }

    /// Follows the log until cancelled, while this instance leads the projection.
    pub async fn run(self: Arc<Self>, lock_options: PgConnectOptions, cancel: CancellationToken) {
        let lock = format!("projector/{}", self.name);
        while !cancel.is_cancelled() {
            let mut leadership = match Leadership::acquire(&lock_options, &lock, &cancel).await {
                Ok(Some(leadership)) => leadership,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(projection = %self.name, error.message = %error, "cannot take the projection lock");
                    pause(&cancel, RETRY_PAUSE).await;
                    continue;
                }
            };
            while !cancel.is_cancelled() && leadership.still_held().await {
                match self.step().await {
                    Ok(0) => pause(&cancel, self.settings.poll_interval).await,
                    Ok(_) => {}
                    Err(error) => {
                        self.healthy.store(false, Ordering::Relaxed);
                        // The lag gauges keep growing meanwhile; this counter says why.
                        metrics::counter!("projection_batch_failures_total", "projection" => self.name.as_str())
                            .increment(1);
                        tracing::error!(
                            projection = %self.name,
                            error.message = %error,
                            error.cause_chain = %infra::problem::cause_chain(&error),
                            "projection batch failed; retrying"
                        );
                        pause(&cancel, RETRY_PAUSE).await;
                    }
                }
            }
        }
    }

    /// Whether the log holds anything after the live checkpoint, looked up without a
    /// transaction. An idle poll must not take the projection row lock: a row lock assigns a
    /// transaction id, so every poll of every runner would burn one (about 150 a second per
    /// instance at the default interval, pushing the cluster towards wraparound vacuums) and
    /// would hold back the snapshot xmin that every follower's gap-safe read waits on. The
    /// locked batch reads the checkpoint again, so a stale answer here costs one empty batch.
    async fn has_work(&self) -> Result<bool> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?;
        let after = generations::live_checkpoints(&mut connection)
            .await?
            .into_iter()
            .find(|(name, _, _)| *name == self.name)
            .map_or(infra::log::LogPosition::START, |(_, _, position)| position);
        drop(connection);
        Ok(!self.reader.read_after(after, 1, None).await?.is_empty())
    }

    fn idle(&self) {
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// Applies one batch; returns how many events it applied.
    pub async fn step(&self) -> Result<usize> {
        let started = Instant::now();
        if !self.has_work().await? {
            self.idle();
            return Ok(0);
        }
        let mut transaction = self
            .pool
            .begin()
            .await
            .context("starting a projection batch")?;
        let (generation, checkpoint) = generations::lock_live(&mut transaction, self.name).await?;
        let events: Vec<LogEvent> = self
            .reader
            .read_after(checkpoint.position, self.settings.batch_size, None)
            .await?;
        let Some(last) = events.last() else {
            drop(transaction);
            self.idle();
            return Ok(0);
        };
        let position = last.position;
        let decoded = Decoded::batch(&events, checkpoint.events_applied)?;
        apply(
            &mut transaction,
            self.name,
            generation,
            &decoded,
            self.cache.as_deref(),
        )
        .await?;
        generations::advance(
            &mut transaction,
            self.name,
            generation,
            position,
            events.len(),
        )
        .await?;
        transaction
            .commit()
            .await
            .context("committing a projection batch")?;
        self.healthy.store(true, Ordering::Relaxed);
        let labels = [("projection", self.name.as_str())];
        metrics::counter!("projection_events_applied_total", &labels)
            .increment(events.len() as u64);
        metrics::histogram!("projection_batch_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        for event in &events {
            tracing::info!(
                projection = %self.name,
                correlation_id = event.metadata_str("correlation_id").unwrap_or(""),
                event_type = %event.event_type,
                stream = %format_args!("{}/{}", event.aggregate_type, event.aggregate_id),
                position = %event.position,
                "event projected"
            );
        }
        Ok(events.len())
    }
}
