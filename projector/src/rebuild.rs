//! `ledger rebuild`: builds a fresh generation of one or more projections from the start of the
//! log beside the live ones, with one reader of the log feeding all of them, in bounded batches
//! (each its own transaction, with its own checkpoints, so a killed rebuild resumes where it
//! stopped; on PostgreSQL one transaction per projection, all at once, decision 49), then
//! switches them atomically and drops the old tables. Queries keep reading the
//! old generations until the switch commits; the live projector keeps following the log on the
//! old generations until then, and on the new ones after.
//!
//! While one batch is applied, the next one is already being read and decoded, so the database
//! and the fold work at the same time.

use std::time::{Duration, Instant};

use infra::error::DatabaseContext;
use infra::eventlog::{EventLog, LogPosition};
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::generations::{self, Checkpoint, on};
use crate::model::{Backend, Db, DecodedBatch, ProjectionName};
use crate::runner::apply_batch;
use crate::store::{EventSource, LogSource, PgReadModels, ReadModels};

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

/// Rebuilds `names` together in the PostgreSQL read models on `pool`. Fails at once if another
/// rebuild of one of them is running.
pub async fn rebuild(
    pool: &PgPool,
    log: &dyn EventLog,
    names: &[ProjectionName],
    options: RebuildOptions,
    progress: impl FnMut(RebuildProgress),
) -> Result<RebuildSummary> {
    rebuild_in(
        &PgReadModels::new(pool.clone()),
        log,
        names,
        options,
        progress,
    )
    .await
}

/// Rebuilds `names` together in `models` (either store). Fails at once if another rebuild of
/// one of them is running.
pub async fn rebuild_in(
    models: &dyn ReadModels,
    log: &dyn EventLog,
    names: &[ProjectionName],
    options: RebuildOptions,
    mut progress: impl FnMut(RebuildProgress),
) -> Result<RebuildSummary> {
    let started = Instant::now();
    let mut names = names.to_vec();
    names.sort();
    names.dedup();
    let lock = models.lock_rebuilds(&names).await?;
    let mut building = Vec::with_capacity(names.len());
    for name in &names {
        building.push((
            *name,
            models.prepare_generation(*name, options.restart).await?,
        ));
    }
    let resumed_at = lowest_checkpoint(models, &building).await?;
    progress(RebuildProgress::Started {
        resumed_at,
        head: log.head().await?,
    });
    let source = LogSource(log);
    let mut events = 0u64;
    // Build in bounded batches until a batch comes back short: caught up, near enough.
    let mut next = read(&source, resumed_at, options).await?;
    while let Some(batch) = next.take() {
        let count = batch.events.len();
        let last = batch.last_position().unwrap_or(LogPosition::START);
        let short = count < options.batch_size;
        // No cache: the rebuilt rows are the ones the cache already holds.
        let apply = models.apply_building(&building, &batch);
        if short {
            apply.await?;
        } else {
            let (applied, read_next) = tokio::join!(apply, read(&source, last, options));
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
    let replaced = models
        .switch(&building, &source, options.batch_size)
        .await?;
    // One transaction: a crash drops all of the old generations or none of them (and the next
    // rebuild finds what is left).
    models.drop_generations(&replaced).await?;
    lock.release().await;
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
    source: &dyn EventSource,
    after: LogPosition,
    options: RebuildOptions,
) -> Result<Option<DecodedBatch>> {
    let events = source.read_after(after, options.batch_size).await?;
    if events.is_empty() {
        return Ok(None);
    }
    DecodedBatch::new(events).map(Some)
}

async fn lowest_checkpoint(
    models: &dyn ReadModels,
    building: &[(ProjectionName, i32)],
) -> Result<LogPosition> {
    let mut lowest: Option<LogPosition> = None;
    for (name, generation) in building {
        let at = models.checkpoint(*name, *generation).await?.position;
        lowest = Some(lowest.map_or(at, |lowest| lowest.min(at)));
    }
    Ok(lowest.unwrap_or(LogPosition::START))
}

/// Locks the building generations' checkpoint rows and reads them: a second rebuild cannot get
/// here (rebuild lock), but the lock keeps each read-apply-advance sequence honest regardless.
/// (SQLite: the transaction's write lock covers it.)
pub(crate) async fn lock_building(
    db: &mut Db<'_>,
    building: &[(ProjectionName, i32)],
) -> Result<Vec<(ProjectionName, i32, Checkpoint)>> {
    let mut targets = Vec::with_capacity(building.len());
    for (name, generation) in building {
        if db.backend() == Backend::Postgres {
            on!(
                db,
                sqlx::query(
                    "SELECT 1 FROM checkpoints WHERE projection = $1 AND generation = $2 \
                     FOR UPDATE",
                )
                .bind(name.as_str())
                .bind(generation),
                execute
            )
            .context("locking a rebuild checkpoint")?;
        }
        let checkpoint = generations::checkpoint(db, *name, *generation).await?;
        targets.push((*name, *generation, checkpoint));
    }
    Ok(targets)
}

/// One rebuild batch inside the store's transaction: lock, apply, advance. The caller commits.
pub(crate) async fn building_batch(
    db: &mut Db<'_>,
    building: &[(ProjectionName, i32)],
    batch: &DecodedBatch,
) -> Result<usize> {
    let targets = lock_building(db, building).await?;
    apply_batch(db, &targets, batch, None, None).await
}

/// The generation to build, inside the store's transaction: the half-built one (resumed), or a
/// new one. The caller commits.
pub(crate) async fn prepare_in(
    db: &mut Db<'_>,
    name: ProjectionName,
    restart: bool,
) -> Result<i32> {
    let statement = match db.backend() {
        Backend::Postgres => {
            "SELECT building_generation, next_generation FROM projections WHERE name = $1 \
             FOR UPDATE"
        }
        Backend::Sqlite => {
            "SELECT building_generation, next_generation FROM projections WHERE name = $1"
        }
    };
    let (building, next): (Option<i32>, i32) =
        on!(db, sqlx::query_as(statement).bind(name.as_str()), fetch_one)
            .context("reading a projection")?;
    drop_leftovers(db, name).await?;
    if let Some(generation) = building {
        if !restart {
            tracing::info!(projection = %name, generation, "resuming an unfinished rebuild");
            return Ok(generation);
        }
        generations::drop_tables(db, name, generation).await?;
    }
    generations::create_tables(db, name, next).await?;
    on!(
        db,
        sqlx::query(
            "UPDATE projections SET building_generation = $2, next_generation = $2 + 1 \
             WHERE name = $1",
        )
        .bind(name.as_str())
        .bind(next),
        execute
    )
    .context("registering a rebuild")?;
    Ok(next)
}

/// Drops the tables of generations that are neither live nor being built: what a rebuild killed
/// between its switch and its clean-up left behind.
async fn drop_leftovers(db: &mut Db<'_>, name: ProjectionName) -> Result<()> {
    let (live, building): (i32, Option<i32>) = on!(
        db,
        sqlx::query_as(
            "SELECT live_generation, building_generation FROM projections WHERE name = $1",
        )
        .bind(name.as_str()),
        fetch_one
    )
    .context("reading a projection")?;
    let mut found: Vec<i32> = on!(
        db,
        sqlx::query_scalar("SELECT generation FROM checkpoints WHERE projection = $1")
            .bind(name.as_str()),
        fetch_all
    )
    .context("listing checkpoints")?;
    let tables_statement = match db.backend() {
        Backend::Postgres => {
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
               AND table_name::text ~ ('^' || $1 || '_g[0-9]+$')"
        }
        // GLOB: `_` is no wildcard there; the number is checked below.
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB ($1 || '_g[0-9]*')"
        }
    };
    for shape in name.tables() {
        let tables: Vec<String> = on!(
            db,
            sqlx::query_scalar(tables_statement).bind(shape.name),
            fetch_all
        )
        .context("listing generations")?;
        found.extend(tables.iter().filter_map(|table| {
            table
                .strip_prefix(shape.name)
                .and_then(|rest| rest.strip_prefix("_g"))
                .filter(|number| number.bytes().all(|byte| byte.is_ascii_digit()))
                .and_then(|number| number.parse::<i32>().ok())
        }));
    }
    found.sort_unstable();
    found.dedup();
    for generation in found {
        if generation != live && Some(generation) != building {
            tracing::info!(projection = %name, generation, "dropping a leftover generation");
            generations::drop_tables(db, name, generation).await?;
        }
    }
    Ok(())
}

/// Catches up under the projections' locks and makes the built generations live, inside the
/// store's transaction; returns the replaced generations. The caller commits.
pub(crate) async fn switch_in(
    db: &mut Db<'_>,
    source: &dyn EventSource,
    building: &[(ProjectionName, i32)],
    batch_size: usize,
) -> Result<Vec<(ProjectionName, i32)>> {
    // Every row in one order, as the live projector locks them.
    let statement = match db.backend() {
        Backend::Postgres => {
            "SELECT name, live_generation, building_generation FROM projections \
             ORDER BY name FOR UPDATE"
        }
        Backend::Sqlite => {
            "SELECT name, live_generation, building_generation FROM projections ORDER BY name"
        }
    };
    let rows: Vec<(String, i32, Option<i32>)> = on!(db, sqlx::query_as(statement), fetch_all)
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
        let targets = lock_building(db, building).await?;
        let lowest = targets
            .iter()
            .map(|(_, _, checkpoint)| checkpoint.position)
            .min()
            .unwrap_or(LogPosition::START);
        let events = source.read_after(lowest, batch_size).await?;
        let count = events.len();
        if count == 0 {
            break;
        }
        let batch = DecodedBatch::new(events)?;
        apply_batch(db, &targets, &batch, None, None).await?;
        if count < batch_size {
            break;
        }
    }
    let switched = match db.backend() {
        Backend::Postgres => {
            "UPDATE projections SET live_generation = $2, building_generation = NULL,
                 switched_at = now() WHERE name = $1"
        }
        Backend::Sqlite => {
            "UPDATE projections SET live_generation = $2, building_generation = NULL,
                 switched_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE name = $1"
        }
    };
    for (name, generation) in building {
        generations::point_views(db, *name, *generation).await?;
        on!(
            db,
            sqlx::query(switched).bind(name.as_str()).bind(generation),
            execute
        )
        .context("switching generations")?;
    }
    Ok(replaced)
}

/// Logs what a committed switch did.
pub(crate) fn log_switch(building: &[(ProjectionName, i32)], replaced: &[(ProjectionName, i32)]) {
    for ((name, generation), (_, old)) in building.iter().zip(replaced) {
        tracing::info!(projection = %name, generation, replaced = old, "rebuilt projection is live");
    }
}
