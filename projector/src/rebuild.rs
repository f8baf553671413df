//! `ledger rebuild`: builds a fresh generation of one or more projections from the start of the
//! log beside the live ones, with one reader of the log feeding all of them, in bounded batches
//! (each its own transaction, with its own checkpoints, so a killed rebuild resumes where it
//! stopped), then switches them atomically and drops the old tables. Queries keep reading the
//! old generations until the switch commits; the live projector keeps following the log on the
//! old generations until then, and on the new ones after.
//!
//! While one batch is applied, the next one is already being read and decoded, so the database
//! and the fold work at the same time.

use std::time::{Duration, Instant};

use infra::error::DatabaseContext;
use infra::eventlog::{EventLog, LogFilter, LogPosition};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::generations::{self, Checkpoint};
use crate::model::{DecodedBatch, ProjectionName};
use crate::runner::apply_batch;

#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// Events per batch (per transaction).
    pub batch_size: usize,
    /// Discard half-built generations instead of resuming them.
    pub restart: bool,
}

/// Where a rebuild stands, for progress bars.
#[derive(Debug, Clone, Copy)]
pub enum RebuildProgress {
    /// Building, resumed from `resumed_at` (the start for a fresh one); the log's head is `head`.
    Started {
        resumed_at: LogPosition,
        head: LogPosition,
    },
    /// Applied events up to `position`, `events` read in this run.
    Applied { position: LogPosition, events: u64 },
    /// Caught up; switching.
    Switching,
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: ProjectionName,
    pub generation: i32,
    pub replaced_generation: i32,
}

/// What a whole rebuild did.
#[derive(Debug, Clone)]
pub struct RebuildSummary {
    pub projections: Vec<RebuildReport>,
    /// Events read from the log in this run.
    pub events: u64,
    pub elapsed: Duration,
}

/// Rebuilds `names` together. Fails at once if another rebuild of one of them is running.
pub async fn rebuild(
    pool: &PgPool,
    log: &dyn EventLog,
    names: &[ProjectionName],
    options: RebuildOptions,
    mut progress: impl FnMut(RebuildProgress),
) -> Result<RebuildSummary> {
    let started = Instant::now();
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    // The locks live on a connection of their own, closed (and so released) when we return.
    let mut lock = pool
        .acquire()
        .await
        .context("acquiring a connection")?
        .detach();
    for name in &names {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(infra::db::advisory_key(&format!(
                "projector/rebuild/{name}"
            )))
            .fetch_one(&mut lock)
            .await
            .context("taking the rebuild lock")?;
        if !locked {
            return Err(Error::Job(format!(
                "another rebuild of {name} is running; wait for it or stop it"
            )));
        }
    }
    let mut building = Vec::with_capacity(names.len());
    for name in &names {
        building.push((*name, prepare(pool, *name, options.restart).await?));
    }
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let mut resumed_at = None;
    for (name, generation) in &building {
        let at = generations::checkpoint(&mut connection, *name, *generation)
            .await?
            .position;
        resumed_at = Some(resumed_at.map_or(at, |lowest: LogPosition| lowest.min(at)));
    }
    drop(connection);
    progress(RebuildProgress::Started {
        resumed_at: resumed_at.unwrap_or(LogPosition::START),
        head: log.head().await?,
    });
    let mut events = 0u64;
    // Build in bounded batches until a batch comes back short: caught up, near enough.
    let mut next = read(log, lowest_checkpoint(pool, &building).await?, options).await?;
    while let Some(batch) = next.take() {
        let count = batch.events.len();
        let last = batch.last_position().unwrap_or(LogPosition::START);
        let short = count < options.batch_size;
        let apply = async {
            let mut transaction = pool.begin().await.context("starting a rebuild batch")?;
            let targets = lock_building(&mut transaction, &building).await?;
            // No cache: the rebuilt rows are the ones the cache already holds.
            apply_batch(&mut transaction, &targets, &batch, None).await?;
            transaction
                .commit()
                .await
                .context("committing a rebuild batch")?;
            Ok::<_, Error>(())
        };
        if short {
            apply.await?;
        } else {
            let (applied, read_next) = tokio::join!(apply, read(log, last, options));
            applied?;
            next = read_next?;
        }
        events += count as u64;
        progress(RebuildProgress::Applied {
            position: last,
            events,
        });
    }
    progress(RebuildProgress::Switching);
    let replaced = switch(pool, log, &building, options.batch_size).await?;
    // One transaction: a crash drops all of the old generations or none of them (and the next
    // rebuild finds what is left).
    let mut transaction = pool.begin().await.context("starting the clean-up")?;
    for (name, old) in &replaced {
        generations::drop_tables(&mut transaction, *name, *old).await?;
    }
    transaction
        .commit()
        .await
        .context("committing the clean-up")?;
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut lock)
        .await
        .context("releasing the rebuild lock")?;
    let _ = lock.close().await;
    Ok(RebuildSummary {
        projections: building
            .iter()
            .zip(&replaced)
            .map(
                |((projection, generation), (_, replaced_generation))| RebuildReport {
                    projection: *projection,
                    generation: *generation,
                    replaced_generation: *replaced_generation,
                },
            )
            .collect(),
        events,
        elapsed: started.elapsed(),
    })
}

/// Reads and decodes the batch after `after`; `None` when nothing is left.
async fn read(
    log: &dyn EventLog,
    after: LogPosition,
    options: RebuildOptions,
) -> Result<Option<DecodedBatch>> {
    let events = log
        .read_all(after, options.batch_size, LogFilter::ALL)
        .await?;
    if events.is_empty() {
        return Ok(None);
    }
    DecodedBatch::new(events).map(Some)
}

async fn lowest_checkpoint(
    pool: &PgPool,
    building: &[(ProjectionName, i32)],
) -> Result<LogPosition> {
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let mut lowest: Option<LogPosition> = None;
    for (name, generation) in building {
        let at = generations::checkpoint(&mut connection, *name, *generation)
            .await?
            .position;
        lowest = Some(lowest.map_or(at, |lowest| lowest.min(at)));
    }
    Ok(lowest.unwrap_or(LogPosition::START))
}

/// Locks the building generations' checkpoint rows and reads them: a second rebuild cannot get
/// here (advisory lock), but the lock keeps each read-apply-advance sequence honest regardless.
async fn lock_building(
    connection: &mut PgConnection,
    building: &[(ProjectionName, i32)],
) -> Result<Vec<(ProjectionName, i32, Checkpoint)>> {
    let mut targets = Vec::with_capacity(building.len());
    for (name, generation) in building {
        sqlx::query(
            "SELECT 1 FROM checkpoints WHERE projection = $1 AND generation = $2 FOR UPDATE",
        )
        .bind(name.as_str())
        .bind(generation)
        .execute(&mut *connection)
        .await
        .context("locking a rebuild checkpoint")?;
        let checkpoint = generations::checkpoint(connection, *name, *generation).await?;
        targets.push((*name, *generation, checkpoint));
    }
    Ok(targets)
}

/// The generation to build: the half-built one (resumed), or a new one.
async fn prepare(pool: &PgPool, name: ProjectionName, restart: bool) -> Result<i32> {
    let mut transaction = pool.begin().await.context("starting a rebuild")?;
    let (building, next): (Option<i32>, i32) = sqlx::query_as(
        "SELECT building_generation, next_generation FROM projections WHERE name = $1 FOR UPDATE",
    )
    .bind(name.as_str())
    .fetch_one(&mut *transaction)
    .await
    .context("reading a projection")?;
    drop_leftovers(&mut transaction, name).await?;
    if let Some(generation) = building {
        if !restart {
            transaction.commit().await.context("resuming a rebuild")?;
            tracing::info!(projection = %name, generation, "resuming an unfinished rebuild");
            return Ok(generation);
        }
        generations::drop_tables(&mut transaction, name, generation).await?;
    }
    generations::create_tables(&mut transaction, name, next).await?;
    sqlx::query(
        "UPDATE projections SET building_generation = $2, next_generation = $2 + 1 WHERE name = $1",
    )
    .bind(name.as_str())
    .bind(next)
    .execute(&mut *transaction)
    .await
    .context("registering a rebuild")?;
    transaction.commit().await.context("starting a rebuild")?;
    Ok(next)
}

/// Drops the tables of generations that are neither live nor being built: what a rebuild killed
/// between its switch and its clean-up left behind.
async fn drop_leftovers(connection: &mut PgConnection, name: ProjectionName) -> Result<()> {
    let (live, building): (i32, Option<i32>) = sqlx::query_as(
        "SELECT live_generation, building_generation FROM projections WHERE name = $1",
    )
    .bind(name.as_str())
    .fetch_one(&mut *connection)
    .await
    .context("reading a projection")?;
    let mut found: Vec<i32> =
        sqlx::query_scalar("SELECT generation FROM checkpoints WHERE projection = $1")
            .bind(name.as_str())
            .fetch_all(&mut *connection)
            .await
            .context("listing checkpoints")?;
    for shape in name.tables() {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
               AND table_name::text ~ ('^' || $1 || '_g[0-9]+$')",
        )
        .bind(shape.name)
        .fetch_all(&mut *connection)
        .await
        .context("listing generations")?;
        found.extend(tables.iter().filter_map(|table| {
            table
                .rsplit_once("_g")
                .and_then(|(_, number)| number.parse::<i32>().ok())
        }));
    }
    found.sort_unstable();
    found.dedup();
    for generation in found {
        if generation != live && Some(generation) != building {
            tracing::info!(projection = %name, generation, "dropping a leftover generation");
            generations::drop_tables(connection, name, generation).await?;
        }
    }
    Ok(())
}

/// Catches up under the projections' locks and makes the built generations live; returns the
/// replaced generations.
async fn switch(
    pool: &PgPool,
    log: &dyn EventLog,
    building: &[(ProjectionName, i32)],
    batch_size: usize,
) -> Result<Vec<(ProjectionName, i32)>> {
    let mut transaction = pool.begin().await.context("starting the switch")?;
    // Every row in one order, as the live projector locks them.
    let rows: Vec<(String, i32, Option<i32>)> = sqlx::query_as(
        "SELECT name, live_generation, building_generation FROM projections \
         ORDER BY name FOR UPDATE",
    )
    .fetch_all(&mut *transaction)
    .await
    .context("locking the projections for the switch")?;
    let mut replaced = Vec::with_capacity(building.len());
    for (name, generation) in building {
        let Some((_, live, now_building)) = rows.iter().find(|(row, _, _)| row == name.as_str())
        else {
            return Err(Error::Job(format!("projection {name} is not registered")));
        };
        if *now_building != Some(*generation) {
            return Err(Error::Job(format!(
                "generation {generation} of {name} is no longer being built (another rebuild \
                 restarted it?); nothing was switched"
            )));
        }
        replaced.push((*name, *live));
    }
    // The live projector waits on our locks now; apply what it has seen that we have not, so
    // the new generations start exactly where the old ones stand or later.
    loop {
        let targets = lock_building(&mut transaction, building).await?;
        let lowest = targets
            .iter()
            .map(|(_, _, checkpoint)| checkpoint.position)
            .min()
            .unwrap_or(LogPosition::START);
        let events = log.read_all(lowest, batch_size, LogFilter::ALL).await?;
        let count = events.len();
        if count == 0 {
            break;
        }
        let batch = DecodedBatch::new(events)?;
        apply_batch(&mut transaction, &targets, &batch, None).await?;
        if count < batch_size {
            break;
        }
    }
    for (name, generation) in building {
        generations::point_views(&mut transaction, *name, *generation).await?;
        sqlx::query(
            "UPDATE projections SET live_generation = $2, building_generation = NULL,
                 switched_at = now() WHERE name = $1",
        )
        .bind(name.as_str())
        .bind(generation)
        .execute(&mut *transaction)
        .await
        .context("switching generations")?;
    }
    transaction
        .commit()
        .await
        .context("committing the switch")?;
    for ((name, generation), (_, old)) in building.iter().zip(&replaced) {
        tracing::info!(projection = %name, generation, replaced = old, "rebuilt projection is live");
    }
    Ok(replaced)
}
