//! The read models in PostgreSQL (schema `projector`): row locks on `projections` serialise
//! batches with a switch, advisory locks keep one rebuild per projection, and `verify` reads one
//! REPEATABLE READ snapshot.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use infra::error::DatabaseContext;
use infra::log::LogPosition;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::{
    EventSource, PageQuery, ReadModels, RebuildLock, StoredModels, TransactionScope, queries,
};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::generations::{self, Checkpoint};
use crate::model::accounts::AccountRecord;
use crate::model::history::HistoryRecord;
use crate::model::transactions::{TransactionMemory, TransactionRecord};
use crate::model::{Backend, Db, DecodedBatch, ProjectionName};

/// How long `ping` waits.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The read models on `pool` (already migrated and set up: `startup::connect_read_models`).
#[derive(Clone)]
pub struct PgReadModels {
    pool: PgPool,
}

impl PgReadModels {
    pub fn new(pool: PgPool) -> Self {
        PgReadModels { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One of the query side's reads, through [`infra::db::replanning`]: a rebuild that switches
    /// a projection's views to a generation of another shape changes the type of what they
    /// return, which PostgreSQL refuses to the statements pooled connections prepared before
    /// (decision 74).
    async fn read<T, F, Fut>(&self, read: F) -> Result<T>
    where
        F: FnMut(sqlx::pool::PoolConnection<sqlx::Postgres>) -> Fut,
        Fut: std::future::Future<Output = (sqlx::pool::PoolConnection<sqlx::Postgres>, Result<T>)>,
    {
        infra::db::replanning(&self.pool, "the read models", read).await
    }

    async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        Ok(self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?)
    }
}

/// A rebuild's advisory locks, on a session of their own: closed (and so released) when
/// dropped, even if the rebuild fails.
struct PgRebuildLock(PgConnection);

#[async_trait]
impl RebuildLock for PgRebuildLock {
    async fn release(self: Box<Self>) {
        let mut connection = self.0;
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut connection)
            .await;
        let _ = connection.close().await;
    }
}

#[async_trait]
impl ReadModels for PgReadModels {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn ping(&self) -> bool {
        infra::db::ping(&self.pool, PING_TIMEOUT).await
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn live_checkpoints(&self) -> Result<Vec<(ProjectionName, i32, LogPosition)>> {
        let mut connection = self.connection().await?;
        generations::live_checkpoints(&mut Db::Pg(&mut connection)).await
    }

    async fn apply_live(
        &self,
        source: &dyn EventSource,
        read_from: LogPosition,
        batch_size: usize,
        cache: Option<&Cache>,
        memory: Option<&TransactionMemory>,
    ) -> Result<Option<DecodedBatch>> {
        // One read and one decode for all projections, then each projection in a transaction
        // of its own, all at once (decision 58): a batch takes as long as its slowest
        // projection, not as all of them in a row. Each moves its own checkpoint with its rows,
        // under its own row lock, so each is applied exactly once and a switch still sees a
        // batch wholly before or wholly after it. Nothing is locked before the read: an empty
        // one is the idle case (decision 60).
        let Some(batch) = crate::runner::read_batch(source, read_from, batch_size).await? else {
            return Ok(None);
        };
        let outcomes = futures::future::join_all(ProjectionName::ALL.iter().map(|name| {
            let batch = &batch;
            async move {
                let started = Instant::now();
                let mut connection = self
                    .pool
                    .acquire()
                    .await
                    .context("starting a projection batch")?;
                // The wait for a connection alone, not its BEGIN's round trip.
                metrics::histogram!("db_pool_acquire_seconds", "pool" => "projector")
                    .record(started.elapsed().as_secs_f64());
                let mut transaction = connection
                    .begin()
                    .await
                    .context("starting a projection batch")?;
                crate::runner::live_projection(
                    &mut Db::Pg(&mut transaction),
                    *name,
                    read_from,
                    batch,
                    cache,
                    memory,
                )
                .await?;
                transaction
                    .commit()
                    .await
                    .context("committing a projection batch")?;
                metrics::histogram!("projection_apply_seconds", "projection" => name.as_str())
                    .record(started.elapsed().as_secs_f64());
                Ok::<_, Error>(())
            }
        }))
        .await;
        // Every projection ran to its end: one that cannot fold the batch keeps nothing of it,
        // and the others keep what they committed (the next batch is read from the lowest
        // checkpoint again, so they get at most one batch ahead of it).
        outcomes.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(Some(batch))
    }

    async fn lock_rebuilds(&self, names: &[ProjectionName]) -> Result<Box<dyn RebuildLock>> {
        // The locks live on a connection of their own, closed (and so released) when dropped.
        let mut lock = self.connection().await?.detach();
        for name in names {
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
        Ok(Box::new(PgRebuildLock(lock)))
    }

    async fn prepare_generation(&self, name: ProjectionName, restart: bool) -> Result<i32> {
        let mut transaction = self.pool.begin().await.context("starting a rebuild")?;
        let generation =
            crate::rebuild::prepare_in(&mut Db::Pg(&mut transaction), name, restart).await?;
        transaction.commit().await.context("starting a rebuild")?;
        Ok(generation)
    }

    async fn checkpoint(&self, name: ProjectionName, generation: i32) -> Result<Checkpoint> {
        let mut connection = self.connection().await?;
        generations::checkpoint(&mut Db::Pg(&mut connection), name, generation).await
    }

    async fn apply_building(
        &self,
        building: &[(ProjectionName, i32)],
        batch: &DecodedBatch,
    ) -> Result<usize> {
        // Each projection in a transaction of its own, all at once: a generation being built
        // has its own checkpoint, so they need not commit together (a killed rebuild resumes
        // each from its own), and the database works on all of them while one is folded here.
        let applied = futures::future::try_join_all(building.iter().map(|target| async move {
            let mut transaction = self
                .pool
                .begin()
                .await
                .context("starting a rebuild batch")?;
            let applied = crate::rebuild::building_batch(
                &mut Db::Pg(&mut transaction),
                std::slice::from_ref(target),
                batch,
            )
            .await?;
            transaction
                .commit()
                .await
                .context("committing a rebuild batch")?;
            Ok::<_, Error>(applied)
        }))
        .await?;
        Ok(applied.into_iter().sum())
    }

    async fn switch(
        &self,
        building: &[(ProjectionName, i32)],
        source: &dyn EventSource,
        batch_size: usize,
    ) -> Result<Vec<(ProjectionName, i32)>> {
        let mut transaction = self.pool.begin().await.context("starting the switch")?;
        let replaced =
            crate::rebuild::switch_in(&mut Db::Pg(&mut transaction), source, building, batch_size)
                .await?;
        transaction
            .commit()
            .await
            .context("committing the switch")?;
        crate::rebuild::log_switch(building, &replaced);
        Ok(replaced)
    }

    async fn drop_generations(&self, generations: &[(ProjectionName, i32)]) -> Result<()> {
        let mut transaction = self.pool.begin().await.context("starting the clean-up")?;
        for (name, generation) in generations {
            generations::drop_tables(&mut Db::Pg(&mut transaction), *name, *generation).await?;
        }
        transaction
            .commit()
            .await
            .context("committing the clean-up")?;
        Ok(())
    }

    async fn stored(&self) -> Result<StoredModels> {
        let mut snapshot = self
            .pool
            .begin()
            .await
            .context("starting the read-model snapshot")?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *snapshot)
            .await
            .context("starting the read-model snapshot")?;
        let stored = crate::verify::load_stored(&mut Db::Pg(&mut snapshot)).await?;
        snapshot
            .commit()
            .await
            .context("ending the read-model snapshot")?;
        Ok(stored)
    }

    async fn live_rows(&self, name: ProjectionName) -> Result<Vec<String>> {
        self.read(|mut connection| async move {
            let rows = queries::live_rows(&mut Db::Pg(&mut connection), name).await;
            (connection, rows)
        })
        .await
    }

    async fn account(&self, id: Uuid) -> Result<Option<AccountRecord>> {
        self.read(|mut connection| async move {
            let row = queries::account(&mut Db::Pg(&mut connection), id).await;
            (connection, row)
        })
        .await
    }

    async fn accounts(&self, owner: Option<Uuid>, page: PageQuery) -> Result<Vec<AccountRecord>> {
        self.read(|mut connection| async move {
            let rows = queries::accounts(&mut Db::Pg(&mut connection), owner, page).await;
            (connection, rows)
        })
        .await
    }

    async fn history(&self, account: Uuid, page: PageQuery) -> Result<Vec<HistoryRecord>> {
        self.read(|mut connection| async move {
            let rows = queries::history(&mut Db::Pg(&mut connection), account, page).await;
            (connection, rows)
        })
        .await
    }

    async fn transaction(&self, id: Uuid) -> Result<Option<TransactionRecord>> {
        self.read(|mut connection| async move {
            let row = queries::transaction(&mut Db::Pg(&mut connection), id).await;
            (connection, row)
        })
        .await
    }

    async fn transactions(
        &self,
        scope: TransactionScope,
        status: Option<&str>,
        page: PageQuery,
    ) -> Result<Vec<TransactionRecord>> {
        self.read(|mut connection| async move {
            let rows =
                queries::transactions(&mut Db::Pg(&mut connection), scope, status, page).await;
            (connection, rows)
        })
        .await
    }
}
