//! `ledger rebuild`: builds a fresh generation of a projection from the start of the log beside
//! the live one, in bounded batches (each its own transaction, with its own checkpoint, so a
//! killed rebuild resumes where it stopped), then switches atomically and drops the old tables.
//! Queries keep reading the old generation until the switch commits; the live runner keeps
//! following the log on the old generation until then, and on the new one after.

use std::time::{Duration, Instant};

use infra::error::DatabaseContext;
use infra::log::{LogPosition, LogReader};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::generations;
use crate::model::{Decoded, ProjectionName};
use crate::runner::apply;

#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// Events per batch (per transaction).
    pub batch_size: i64,
    /// Discard a half-built generation instead of resuming it.
    pub restart: bool,
}

/// Where a rebuild stands, for progress bars.
#[derive(Debug, Clone, Copy)]
pub enum RebuildProgress {
    /// Building `generation`, resumed from `resumed_at` (the start for a fresh one); the log's
    /// head is `head`.
    Started {
        generation: i32,
        resumed_at: LogPosition,
        head: LogPosition,
    },
    /// Applied events up to `position`, `events` in this run.
    Applied { position: LogPosition, events: u64 },
    /// Caught up; switching.
    Switching,
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: ProjectionName,
    pub generation: i32,
    pub replaced_generation: i32,
    pub events: u64,
    pub elapsed: Duration,
}

/// Rebuilds `name`. Fails at once if another rebuild of it is running.
pub async fn rebuild(
    pool: &PgPool,
    reader: &LogReader,
    name: ProjectionName,
    options: RebuildOptions,
    mut progress: impl FnMut(RebuildProgress),
) -> Result<RebuildReport> {
    let started = Instant::now();
    // The lock lives on a connection of its own, closed (and so released) when we return.
    let mut lock = pool
        .acquire()
        .await
        .context("acquiring a connection")?
        .detach();
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
    let generation = prepare(pool, name, options.restart).await?;
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let resumed_at = generations::checkpoint(&mut connection, name, generation)
        .await?
        .position;
    drop(connection);
    progress(RebuildProgress::Started {
        generation,
        resumed_at,
        head: reader.head().await?,
    });
    let mut events = 0u64;
    // Build in bounded batches until a batch comes back short: caught up, near enough.
    loop {
        let mut transaction = pool.begin().await.context("starting a rebuild batch")?;
        let applied = batch(
            &mut transaction,
            reader,
            name,
            generation,
            options.batch_size,
        )
        .await?;
        transaction
            .commit()
            .await
            .context("committing a rebuild batch")?;
        if let Some((position, count)) = applied {
            events += count as u64;
            progress(RebuildProgress::Applied { position, events });
        }
        if applied.is_none_or(|(_, count)| (count as i64) < options.batch_size) {
            break;
        }
    }
    progress(RebuildProgress::Switching);
    let replaced_generation = switch(pool, reader, name, generation, options.batch_size).await?;
    // One transaction: a crash drops all of the old generation or none of it (and the next
    // rebuild finds what is left).
    let mut transaction = pool.begin().await.context("starting the clean-up")?;
    generations::drop_tables(&mut transaction, name, replaced_generation).await?;
    transaction
        .commit()
        .await
        .context("committing the clean-up")?;
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut lock)
        .await
        .context("releasing the rebuild lock")?;
    let _ = lock.close().await;
    Ok(RebuildReport {
        projection: name,
        generation,
        replaced_generation,
        events,
        elapsed: started.elapsed(),
    })
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

/// Applies one batch to `generation` after its checkpoint; `None` when nothing is left.
async fn batch(
    connection: &mut PgConnection,
    reader: &LogReader,
    name: ProjectionName,
    generation: i32,
    batch_size: i64,
) -> Result<Option<(LogPosition, usize)>> {
    // Lock this generation's checkpoint row: a second rebuild cannot get here (advisory lock),
    // but the lock keeps the read-apply-advance sequence honest regardless.
    sqlx::query("SELECT 1 FROM checkpoints WHERE projection = $1 AND generation = $2 FOR UPDATE")
        .bind(name.as_str())
        .bind(generation)
        .execute(&mut *connection)
        .await
        .context("locking a rebuild checkpoint")?;
    let after = generations::checkpoint(connection, name, generation).await?;
    let events = reader.read_after(after.position, batch_size, None).await?;
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let position = last.position;
    let decoded = Decoded::batch(&events, after.events_applied)?;
    // No cache: the rebuilt rows are the ones the cache already holds.
    apply(connection, name, generation, &decoded, None).await?;
    generations::advance(connection, name, generation, position, events.len()).await?;
    Ok(Some((position, events.len())))
}

/// Catches up under the projection's lock and makes `generation` live; returns the replaced
/// generation.
async fn switch(
    pool: &PgPool,
    reader: &LogReader,
    name: ProjectionName,
    generation: i32,
    batch_size: i64,
) -> Result<i32> {
    let mut transaction = pool.begin().await.context("starting the switch")?;
    let (live, building): (i32, Option<i32>) = sqlx::query_as(
        "SELECT live_generation, building_generation FROM projections WHERE name = $1 FOR UPDATE",
    )
    .bind(name.as_str())
    .fetch_one(&mut *transaction)
    .await
    .context("locking the projection for the switch")?;
    if building != Some(generation) {
        return Err(Error::Job(format!(
            "generation {generation} of {name} is no longer being built (another rebuild \
             restarted it?); nothing was switched"
        )));
    }
    // The live runner waits on our lock now; apply what it has seen that we have not, so the
    // new generation starts exactly where the old one stands or later.
    while let Some((_, count)) =
        batch(&mut transaction, reader, name, generation, batch_size).await?
    {
        if (count as i64) < batch_size {
            break;
        }
    }
    generations::point_views(&mut transaction, name, generation).await?;
    sqlx::query(
        "UPDATE projections SET live_generation = $2, building_generation = NULL,
             switched_at = now() WHERE name = $1",
    )
    .bind(name.as_str())
    .bind(generation)
    .execute(&mut *transaction)
    .await
    .context("switching generations")?;
    transaction
        .commit()
        .await
        .context("committing the switch")?;
    tracing::info!(projection = %name, generation, replaced = live, "rebuilt projection is live");
    Ok(live)
}
