//! The read-model store seam: where the projections' rows, generations and checkpoints live.
//!
//! [`ReadModels`] is everything the runner, `ledger rebuild`, `ledger verify` and the query API
//! need of the store. [`PgReadModels`] keeps them in PostgreSQL (schema `projector`, the
//! server deployment); [`SqliteReadModels`] in the embedded mode's SQLite file (`ledger serve`).
//! Both run the same fold (`model`), the same bookkeeping (`generations`) and the same batch,
//! rebuild and verify steps, through [`Db`]: each implementation only opens its transactions
//! (and picks the SQL of its queries). Both pass [`conformance`].

#[cfg(feature = "testing")]
pub mod conformance;
pub mod postgres;
pub mod queries;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use infra::eventlog::{EventLog, LogFilter, RecordedEvent};
use infra::log::LogPosition;
use uuid::Uuid;

use crate::cache::Cache;
use crate::error::Result;
use crate::generations::Checkpoint;
use crate::model::accounts::AccountRecord;
use crate::model::history::HistoryRecord;
use crate::model::transactions::{TransactionMemory, TransactionRecord};
use crate::model::{Backend, DecodedBatch, ProjectionName};

pub use crate::model::Db;
pub use postgres::PgReadModels;
pub use sqlite::SqliteReadModels;

/// Where batches come from: the events after a position, in the log's order. The live runner
/// and a rebuild read the event log ([`LogSource`]); the read-model conformance suite feeds
/// events it built.
#[async_trait]
pub trait EventSource: Send + Sync {
    /// Up to `max` events after `after`.
    async fn read_after(&self, after: LogPosition, max: usize) -> Result<Vec<RecordedEvent>>;
}

/// The event log as an [`EventSource`]: every event, in commit order.
pub struct LogSource<'a>(pub &'a dyn EventLog);

#[async_trait]
impl EventSource for LogSource<'_> {
    async fn read_after(&self, after: LogPosition, max: usize) -> Result<Vec<RecordedEvent>> {
        Ok(self.0.read_all(after, max, LogFilter::ALL).await?)
    }
}

/// A page of a keyset-paginated list: rows strictly older than `before`, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    pub before: i64,
    pub limit: i64,
}

/// Which transactions a list shows (besides the page and the status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionScope {
    /// Every transaction (admins, auditors, operators).
    All,
    /// Those with this account on either side.
    Account(Uuid),
    /// Those with an account of this owner on either side.
    Owner(Uuid),
}

/// A projection's rows and hidden state as stored in one generation, keyed as
/// [`crate::model::Model::records`] keys them.
#[derive(Debug)]
pub struct Stored<R> {
    pub records: BTreeMap<String, R>,
    pub hidden: BTreeMap<String, String>,
}

/// Every live projection as stored, read in one snapshot with the checkpoints: what
/// `ledger verify` compares with the log.
#[derive(Debug)]
pub struct StoredModels {
    /// Each live generation with its checkpoint.
    pub checkpoints: Vec<(ProjectionName, i32, LogPosition)>,
    pub accounts: Stored<AccountRecord>,
    pub transactions: Stored<TransactionRecord>,
    pub history: Stored<HistoryRecord>,
}

/// Held while a rebuild of some projections runs; released when dropped or [`release`]d.
///
/// [`release`]: RebuildLock::release
#[async_trait]
pub trait RebuildLock: Send {
    async fn release(self: Box<Self>);
}

#[async_trait]
pub trait ReadModels: Send + Sync + 'static {
    /// Which database this is.
    fn backend(&self) -> Backend;

    /// Whether the store answers (`/health`).
    async fn ping(&self) -> bool;

    /// Closes the store's connections.
    async fn close(&self);

    // --- checkpoints and the live projector

    /// Each projection's live generation and checkpoint: what a read reflects.
    async fn live_checkpoints(&self) -> Result<Vec<(ProjectionName, i32, LogPosition)>>;

    /// The lowest live checkpoint: every projection has applied the log up to here.
    async fn read_position(&self) -> Result<LogPosition> {
        Ok(crate::generations::lowest(&self.live_checkpoints().await?))
    }

    /// One batch of the live projector: reads up to `batch_size` events after `read_from` (the
    /// lowest live checkpoint as the caller read it with [`ReadModels::read_position`]) from
    /// `source`, and applies to every projection, under its lock, the events after its own
    /// checkpoint, writes changed transactions through to `cache` and moves the checkpoint,
    /// committing each projection's share with its checkpoint (all or nothing per projection; a
    /// store may commit the projections together, as SQLite does, or apart and concurrently, as
    /// PostgreSQL does: decision 58). A checkpoint that moved since `read_from` was read is
    /// honoured: nothing at or before it is applied again. Fails if any projection failed; the
    /// others keep what they committed. Returns the batch read, `None` if there was nothing to
    /// read, in which case no lock was taken (an idle projector must not burn transaction ids).
    async fn apply_live(
        &self,
        source: &dyn EventSource,
        read_from: LogPosition,
        batch_size: usize,
        cache: Option<&Cache>,
        memory: Option<&TransactionMemory>,
    ) -> Result<Option<DecodedBatch>>;

    // --- generations (`ledger rebuild`)

    /// Takes the rebuild lock of `names`, or fails at once if another rebuild holds one.
    async fn lock_rebuilds(&self, names: &[ProjectionName]) -> Result<Box<dyn RebuildLock>>;

    /// The generation of `name` to build: the half-built one (resumed), or a new empty one
    /// (also with `restart`, which drops the half-built one). Drops leftover generations.
    async fn prepare_generation(&self, name: ProjectionName, restart: bool) -> Result<i32>;

    /// Where `generation` of `name` stands.
    async fn checkpoint(&self, name: ProjectionName, generation: i32) -> Result<Checkpoint>;

    /// Applies `batch` to the `building` generations after their own checkpoints and moves
    /// them, in one transaction. Returns how many events were applied, all together.
    async fn apply_building(
        &self,
        building: &[(ProjectionName, i32)],
        batch: &DecodedBatch,
    ) -> Result<usize>;

    /// Catches the `building` generations up with `source` under the projections' locks and
    /// makes them live (views and `live_generation`) in the same transaction. Returns the
    /// replaced generations.
    async fn switch(
        &self,
        building: &[(ProjectionName, i32)],
        source: &dyn EventSource,
        batch_size: usize,
    ) -> Result<Vec<(ProjectionName, i32)>>;

    /// Drops the tables and checkpoints of `generations`, in one transaction.
    async fn drop_generations(&self, generations: &[(ProjectionName, i32)]) -> Result<()>;

    // --- `ledger verify`

    /// Every live projection's rows and hidden state with the checkpoints, from one snapshot.
    async fn stored(&self) -> Result<StoredModels>;

    /// Every row of a projection's live main table, rendered for comparison.
    async fn live_rows(&self, name: ProjectionName) -> Result<Vec<String>>;

    // --- the query API

    async fn account(&self, id: Uuid) -> Result<Option<AccountRecord>>;

    /// Accounts newest first, of one owner or all.
    async fn accounts(&self, owner: Option<Uuid>, page: PageQuery) -> Result<Vec<AccountRecord>>;

    /// An account's history newest first.
    async fn history(&self, account: Uuid, page: PageQuery) -> Result<Vec<HistoryRecord>>;

    async fn transaction(&self, id: Uuid) -> Result<Option<TransactionRecord>>;

    /// Transactions newest first, in `scope`, of one status (`PENDING`, …) or all.
    async fn transactions(
        &self,
        scope: TransactionScope,
        status: Option<&str>,
        page: PageQuery,
    ) -> Result<Vec<TransactionRecord>>;
}
