//! The read models in SQLite, for the embedded mode (`ledger serve`): in the data directory's
//! database file beside the event log, with one writer and a separate pool of readers
//! (`infra::sqlite` pools: WAL, `synchronous=FULL`).
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`, taking the database's write lock at
//! once: a live batch, a rebuild batch and a switch are serialised as PostgreSQL's row locks
//! serialise them, and a transaction never has to upgrade a read lock (which could fail with
//! `SQLITE_BUSY` mid-batch). Readers see the last committed state (WAL snapshots), so `verify`
//! reads its rows and checkpoints in one read transaction.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use infra::error::DatabaseContext;
use infra::log::LogPosition;
use infra::sqlite::Migration;
use sqlx::SqlitePool;
use tokio::sync::{Mutex, OwnedMutexGuard};
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

/// The projector's migrations in SQLite, recorded as component `projector`.
pub const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "projections and checkpoints",
    sql: include_str!("../../migrations/sqlite/0001_projections.sql"),
}];

/// How long `ping` waits.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The read models in a SQLite database: `writer` (one connection) for every write, `readers`
/// for the queries.
#[derive(Clone)]
pub struct SqliteReadModels {
    writer: SqlitePool,
    readers: SqlitePool,
    /// One rebuild at a time in this process. (Another process's rebuild of the same file is
    /// caught by the switch: a generation no longer being built is not switched.)
    rebuilding: Arc<Mutex<()>>,
}

impl SqliteReadModels {
    /// Opens the read models in the database of `writer` (a pool of one connection) and
    /// `readers` (a pool on the same file): migrates it and creates generation 1 of every
    /// projection that has none.
    pub async fn open(writer: SqlitePool, readers: SqlitePool) -> Result<Self> {
        infra::sqlite::migrate(&writer, "projector", SQLITE_MIGRATIONS).await?;
        let models = SqliteReadModels {
            writer,
            readers,
            rebuilding: Arc::new(Mutex::new(())),
        };
        let mut transaction = models.begin_write("starting the generation setup").await?;
        generations::ensure_in(&mut Db::Sqlite(&mut transaction)).await?;
        transaction
            .commit()
            .await
            .context("committing the generation setup")?;
        Ok(models)
    }

    /// Opens the read models in the file at `path` (created if missing): a writer of one
    /// connection and `readers` connections for the queries.
    pub async fn open_file(path: &Path, readers: u32) -> Result<Self> {
        let writer = infra::sqlite::pool(infra::sqlite::writer_options(path, true), 1).await?;
        let readers = infra::sqlite::pool(infra::sqlite::options(path, false), readers).await?;
        Self::open(writer, readers).await
    }

    /// Opens read models that `ledger serve` (or a rebuild) already set up, for jobs that only
    /// read them (`ledger verify --data DIR`, beside a live `serve`): it checks rather than
    /// creates, and every connection of `pool` should be read-only
    /// (`SqliteConnectOptions::read_only`), so that nothing it runs can write.
    pub async fn open_read_only(pool: SqlitePool) -> Result<Self> {
        let not_set_up = |what: String| {
            Error::Job(format!(
                "the read models are not set up ({what}); start `ledger serve` once, or run \
                 `ledger rebuild`"
            ))
        };
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM ledger_migrations WHERE component = 'projector'",
        )
        .fetch_all(&pool)
        .await
        .map_err(|_| not_set_up("no migrations were applied".to_owned()))?;
        if let Some(missing) = SQLITE_MIGRATIONS
            .iter()
            .find(|migration| !applied.contains(&migration.version))
        {
            return Err(not_set_up(format!(
                "migration {} ({}) is not applied",
                missing.version, missing.description
            )));
        }
        let registered: Vec<String> = sqlx::query_scalar("SELECT name FROM projections")
            .fetch_all(&pool)
            .await
            .context("reading the projections")?;
        if let Some(missing) = ProjectionName::ALL
            .into_iter()
            .find(|name| !registered.iter().any(|known| known == name.as_str()))
        {
            return Err(not_set_up(format!(
                "projection {missing} has no generation"
            )));
        }
        Ok(SqliteReadModels {
            writer: pool.clone(),
            readers: pool,
            rebuilding: Arc::new(Mutex::new(())),
        })
    }

    /// The pool of the writer (tests, the CLI).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    async fn begin_write(
        &self,
        context: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self
            .writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context(context)?)
    }

    async fn reader(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Sqlite>> {
        Ok(self
            .readers
            .acquire()
            .await
            .context("acquiring a connection")?)
    }
}

struct SqliteRebuildLock(#[allow(dead_code)] OwnedMutexGuard<()>);

#[async_trait]
impl RebuildLock for SqliteRebuildLock {
    async fn release(self: Box<Self>) {}
}

#[async_trait]
impl ReadModels for SqliteReadModels {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn ping(&self) -> bool {
        infra::sqlite::ping(&self.readers, PING_TIMEOUT).await
    }

    async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }

    async fn live_checkpoints(&self) -> Result<Vec<(ProjectionName, i32, LogPosition)>> {
        let mut connection = self.reader().await?;
        generations::live_checkpoints(&mut Db::Sqlite(&mut connection)).await
    }

    async fn apply_live(
        &self,
        source: &dyn EventSource,
        read_from: LogPosition,
        batch_size: usize,
        cache: Option<&Cache>,
        memory: Option<&TransactionMemory>,
    ) -> Result<Option<DecodedBatch>> {
        // Look before taking the file's one writer: an idle projector must not hold it. The
        // locked batch reads the checkpoints again, so a stale look costs one empty batch.
        if source.read_after(read_from, 1).await?.is_empty() {
            return Ok(None);
        }
        let mut transaction = self.begin_write("starting a projection batch").await?;
        let batch = crate::runner::live_batch(
            &mut Db::Sqlite(&mut transaction),
            source,
            batch_size,
            cache,
            memory,
        )
        .await?;
        if batch.is_some() {
            transaction
                .commit()
                .await
                .context("committing a projection batch")?;
        } else {
            // Here, before the writer goes back to its pool, rather than on its way back.
            transaction
                .rollback()
                .await
                .context("ending an empty projection batch")?;
        }
        Ok(batch)
    }

    async fn lock_rebuilds(&self, names: &[ProjectionName]) -> Result<Box<dyn RebuildLock>> {
        let guard = self.rebuilding.clone().try_lock_owned().map_err(|_| {
            let names: Vec<&str> = names.iter().map(|name| name.as_str()).collect();
            Error::Job(format!(
                "another rebuild is running (of {}); wait for it or stop it",
                names.join(", ")
            ))
        })?;
        Ok(Box::new(SqliteRebuildLock(guard)))
    }

    async fn prepare_generation(&self, name: ProjectionName, restart: bool) -> Result<i32> {
        let mut transaction = self.begin_write("starting a rebuild").await?;
        let generation =
            crate::rebuild::prepare_in(&mut Db::Sqlite(&mut transaction), name, restart).await?;
        transaction.commit().await.context("starting a rebuild")?;
        Ok(generation)
    }

    async fn checkpoint(&self, name: ProjectionName, generation: i32) -> Result<Checkpoint> {
        let mut connection = self.reader().await?;
        generations::checkpoint(&mut Db::Sqlite(&mut connection), name, generation).await
    }

    async fn apply_building(
        &self,
        building: &[(ProjectionName, i32)],
        batch: &DecodedBatch,
    ) -> Result<usize> {
        let mut transaction = self.begin_write("starting a rebuild batch").await?;
        let applied =
            crate::rebuild::building_batch(&mut Db::Sqlite(&mut transaction), building, batch)
                .await?;
        transaction
            .commit()
            .await
            .context("committing a rebuild batch")?;
        Ok(applied)
    }

    async fn switch(
        &self,
        building: &[(ProjectionName, i32)],
        source: &dyn EventSource,
        batch_size: usize,
    ) -> Result<Vec<(ProjectionName, i32)>> {
        let mut transaction = self.begin_write("starting the switch").await?;
        let replaced = crate::rebuild::switch_in(
            &mut Db::Sqlite(&mut transaction),
            source,
            building,
            batch_size,
        )
        .await?;
        transaction
            .commit()
            .await
            .context("committing the switch")?;
        crate::rebuild::log_switch(building, &replaced);
        Ok(replaced)
    }

    async fn drop_generations(&self, generations: &[(ProjectionName, i32)]) -> Result<()> {
        let mut transaction = self.begin_write("starting the clean-up").await?;
        for (name, generation) in generations {
            generations::drop_tables(&mut Db::Sqlite(&mut transaction), *name, *generation).await?;
        }
        transaction
            .commit()
            .await
            .context("committing the clean-up")?;
        Ok(())
    }

    async fn stored(&self) -> Result<StoredModels> {
        // A read transaction: every read in it sees one WAL snapshot.
        let mut snapshot = self
            .readers
            .begin()
            .await
            .context("starting the read-model snapshot")?;
        let stored = crate::verify::load_stored(&mut Db::Sqlite(&mut snapshot)).await?;
        snapshot
            .commit()
            .await
            .context("ending the read-model snapshot")?;
        Ok(stored)
    }

    async fn live_rows(&self, name: ProjectionName) -> Result<Vec<String>> {
        let mut connection = self.reader().await?;
        queries::live_rows(&mut Db::Sqlite(&mut connection), name).await
    }

    async fn account(&self, id: Uuid) -> Result<Option<AccountRecord>> {
        let mut connection = self.reader().await?;
        queries::account(&mut Db::Sqlite(&mut connection), id).await
    }

    async fn accounts(&self, owner: Option<Uuid>, page: PageQuery) -> Result<Vec<AccountRecord>> {
        let mut connection = self.reader().await?;
        queries::accounts(&mut Db::Sqlite(&mut connection), owner, page).await
    }

    async fn history(&self, account: Uuid, page: PageQuery) -> Result<Vec<HistoryRecord>> {
        let mut connection = self.reader().await?;
        queries::history(&mut Db::Sqlite(&mut connection), account, page).await
    }

    async fn transaction(&self, id: Uuid) -> Result<Option<TransactionRecord>> {
        let mut connection = self.reader().await?;
        queries::transaction(&mut Db::Sqlite(&mut connection), id).await
    }

    async fn transactions(
        &self,
        scope: TransactionScope,
        status: Option<&str>,
        page: PageQuery,
    ) -> Result<Vec<TransactionRecord>> {
        let mut connection = self.reader().await?;
        queries::transactions(&mut Db::Sqlite(&mut connection), scope, status, page).await
    }
}
