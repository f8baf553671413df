//! Generations of each projection: the live one the views point at, and the one a rebuild
//! fills beside it. The switch is one transaction that flips `live_generation` and re-points
//! the views, under the projection row's lock, which every batch of the live runner also takes:
//! a batch applies wholly to the old generation or wholly to the new one, and a query sees the
//! old model until the switch commits and the new one after.
//!
//! The same bookkeeping runs on PostgreSQL and SQLite ([`Db`]); where the SQL differs (row
//! locks, the clock) it says so. On SQLite there is one writer, and every write transaction
//! takes the database's write lock at its start (`BEGIN IMMEDIATE`), which serialises batches
//! and the switch as the row locks do on PostgreSQL.

use infra::error::DatabaseContext;
use infra::log::LogPosition;
use sqlx::PgPool;

use crate::error::Result;
use crate::model::{Backend, Db, ProjectionName};

/// Runs `$query` (a sqlx query or query_as/scalar built on one statement) on `$db`'s connection
/// with `$method` (`execute`, `fetch_all`, …).
macro_rules! on {
    ($db:expr, $query:expr, execute) => {
        match $db {
            Db::Pg(connection) => $query.execute(&mut **connection).await.map(|_| ()),
            Db::Sqlite(connection) => $query.execute(&mut **connection).await.map(|_| ()),
        }
    };
    ($db:expr, $query:expr, $method:ident) => {
        match $db {
            Db::Pg(connection) => $query.$method(&mut **connection).await,
            Db::Sqlite(connection) => $query.$method(&mut **connection).await,
        }
    };
}
pub(crate) use on;

/// The SQL of "now" as the bookkeeping tables store it.
fn now(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "now()",
        Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
    }
}

/// Creates generation 1 of every projection that has none yet, with its views and checkpoint.
/// Safe when several instances start together (serialised by an advisory lock).
pub async fn ensure(pool: &PgPool) -> Result<()> {
    let mut transaction = pool
        .begin()
        .await
        .context("starting the generation setup")?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(infra::db::advisory_key("projector/generations"))
        .execute(&mut *transaction)
        .await
        .context("locking the generation setup")?;
    ensure_in(&mut Db::Pg(&mut transaction)).await?;
    transaction
        .commit()
        .await
        .context("committing the generation setup")?;
    Ok(())
}

/// [`ensure`]'s work, inside the caller's transaction (which serialises concurrent setups).
pub async fn ensure_in(db: &mut Db<'_>) -> Result<()> {
    for name in ProjectionName::ALL {
        let exists: Option<i32> = on!(
            db,
            sqlx::query_scalar("SELECT live_generation FROM projections WHERE name = $1")
                .bind(name.as_str()),
            fetch_optional
        )
        .context("reading a projection")?;
        if exists.is_some() {
            continue;
        }
        create_tables(db, name, 1).await?;
        point_views(db, name, 1).await?;
        on!(
            db,
            sqlx::query(
                "INSERT INTO projections (name, live_generation, next_generation) \
                 VALUES ($1, 1, 2)",
            )
            .bind(name.as_str()),
            execute
        )
        .context("registering a projection")?;
        tracing::info!(projection = %name, "projection created, generation 1");
    }
    Ok(())
}

/// Creates the tables of `generation` and its checkpoint at the start of the log.
pub async fn create_tables(db: &mut Db<'_>, name: ProjectionName, generation: i32) -> Result<()> {
    for table in name.tables() {
        for statement in table.create_statements(generation, db.backend()) {
            on!(db, sqlx::query(&statement), execute).context("creating a read-model table")?;
        }
    }
    let statement = format!(
        "INSERT INTO checkpoints (projection, generation) VALUES ($1, $2)
         ON CONFLICT (projection, generation) DO UPDATE
         SET tx_id = 0, position = 0, events_applied = 0, updated_at = {}",
        now(db.backend())
    );
    on!(
        db,
        sqlx::query(&statement).bind(name.as_str()).bind(generation),
        execute
    )
    .context("creating a checkpoint")?;
    Ok(())
}

/// Drops the tables and checkpoint of `generation`.
pub async fn drop_tables(db: &mut Db<'_>, name: ProjectionName, generation: i32) -> Result<()> {
    for table in name.tables() {
        let statement = format!("DROP TABLE IF EXISTS {}", table.table(generation));
        on!(db, sqlx::query(&statement), execute).context("dropping a read-model table")?;
    }
    on!(
        db,
        sqlx::query("DELETE FROM checkpoints WHERE projection = $1 AND generation = $2")
            .bind(name.as_str())
            .bind(generation),
        execute
    )
    .context("dropping a checkpoint")?;
    Ok(())
}

/// Points the views of `name` at `generation`.
pub async fn point_views(db: &mut Db<'_>, name: ProjectionName, generation: i32) -> Result<()> {
    // Dropped and created rather than replaced: CREATE OR REPLACE VIEW only accepts a shape
    // that extends the old one, and a new generation may have another shape.
    for table in name.tables() {
        let drop = format!("DROP VIEW IF EXISTS {}", table.name);
        on!(db, sqlx::query(&drop), execute).context("dropping a read-model view")?;
        let create = format!(
            "CREATE VIEW {} AS SELECT * FROM {}",
            table.name,
            table.table(generation)
        );
        on!(db, sqlx::query(&create), execute).context("pointing a read-model view")?;
    }
    Ok(())
}

/// Locks every projection's row (in one order, so two lockers never deadlock) and returns each
/// live generation with its checkpoint, read after the locks are held. (SQLite: the caller's
/// `BEGIN IMMEDIATE` holds the database's write lock already.)
pub async fn lock_all_live(db: &mut Db<'_>) -> Result<Vec<(ProjectionName, i32, Checkpoint)>> {
    let statement = match db.backend() {
        Backend::Postgres => {
            "SELECT name, live_generation FROM projections ORDER BY name FOR UPDATE"
        }
        Backend::Sqlite => "SELECT name, live_generation FROM projections ORDER BY name",
    };
    let rows: Vec<(String, i32)> =
        on!(db, sqlx::query_as(statement), fetch_all).context("locking the projections")?;
    let mut live = Vec::with_capacity(rows.len());
    for (name, generation) in rows {
        let name: ProjectionName = name.parse()?;
        let position = checkpoint(db, name, generation).await?;
        live.push((name, generation, position));
    }
    Ok(live)
}

/// Locks `name`'s projection row (PostgreSQL; SQLite's write transaction already serialises)
/// and returns its live generation and checkpoint: one projection's share of a live batch.
pub async fn lock_live(db: &mut Db<'_>, name: ProjectionName) -> Result<(i32, Checkpoint)> {
    let lock = match db.backend() {
        Backend::Postgres => " FOR UPDATE OF p",
        Backend::Sqlite => "",
    };
    let statement = format!(
        "SELECT p.live_generation, c.tx_id, c.position, c.events_applied
         FROM projections p
         JOIN checkpoints c ON c.projection = p.name AND c.generation = p.live_generation
         WHERE p.name = $1{lock}"
    );
    let (generation, tx_id, position, events_applied): (i32, i64, i64, i64) = on!(
        db,
        sqlx::query_as(&statement).bind(name.as_str()),
        fetch_one
    )
    .context("locking a projection")?;
    Ok((
        generation,
        Checkpoint {
            position: LogPosition {
                commit: tx_id,
                index: position,
            },
            events_applied,
        },
    ))
}

/// Where a generation stands: the last event it applied, and how many it has applied (the
/// ordinal of that event in the log's order, since every generation starts at the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: LogPosition,
    pub events_applied: i64,
}

/// Where `generation` of `name` stands in the log.
pub async fn checkpoint(
    db: &mut Db<'_>,
    name: ProjectionName,
    generation: i32,
) -> Result<Checkpoint> {
    let (tx_id, position, events_applied): (i64, i64, i64) = on!(
        db,
        sqlx::query_as(
            "SELECT tx_id, position, events_applied FROM checkpoints
             WHERE projection = $1 AND generation = $2",
        )
        .bind(name.as_str())
        .bind(generation),
        fetch_one
    )
    .context("reading a checkpoint")?;
    Ok(Checkpoint {
        position: LogPosition {
            commit: tx_id,
            index: position,
        },
        events_applied,
    })
}

/// Moves the checkpoint of `generation` to `position` after `events` more events.
pub async fn advance(
    db: &mut Db<'_>,
    name: ProjectionName,
    generation: i32,
    position: LogPosition,
    events: usize,
) -> Result<()> {
    let statement = format!(
        "UPDATE checkpoints SET tx_id = $3, position = $4,
             events_applied = events_applied + $5, updated_at = {}
         WHERE projection = $1 AND generation = $2",
        now(db.backend())
    );
    on!(
        db,
        sqlx::query(&statement)
            .bind(name.as_str())
            .bind(generation)
            .bind(position.commit)
            .bind(position.index)
            .bind(i64::try_from(events).unwrap_or(i64::MAX)),
        execute
    )
    .context("moving a checkpoint")?;
    Ok(())
}

/// The live checkpoint of every projection: what a read reflects.
pub async fn live_checkpoints(db: &mut Db<'_>) -> Result<Vec<(ProjectionName, i32, LogPosition)>> {
    let rows: Vec<(String, i32, i64, i64)> = on!(
        db,
        sqlx::query_as(
            "SELECT p.name, p.live_generation, c.tx_id, c.position
             FROM projections p
             JOIN checkpoints c ON c.projection = p.name AND c.generation = p.live_generation",
        ),
        fetch_all
    )
    .context("reading the live checkpoints")?;
    rows.into_iter()
        .map(|(name, generation, tx_id, position)| {
            Ok((
                name.parse()?,
                generation,
                LogPosition {
                    commit: tx_id,
                    index: position,
                },
            ))
        })
        .collect()
}

/// The lowest live checkpoint: every projection has applied the log up to here.
pub async fn read_position(pool: &PgPool) -> Result<LogPosition> {
    let mut connection = pool.acquire().await.context("acquiring a connection")?;
    let checkpoints = live_checkpoints(&mut Db::Pg(&mut connection)).await?;
    Ok(lowest(&checkpoints))
}

/// The lowest of `checkpoints` (the start when there are none).
pub fn lowest(checkpoints: &[(ProjectionName, i32, LogPosition)]) -> LogPosition {
    checkpoints
        .iter()
        .map(|(_, _, position)| *position)
        .min()
        .unwrap_or(LogPosition::START)
}
