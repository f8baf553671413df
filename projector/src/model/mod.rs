//! The read models: what each projection stores, and how an event changes it.
//!
//! Each projection is a [`Model`]: a set of rows keyed in memory, folded event by event with
//! pure code, loaded from and stored to its generation's tables in batches. The live runner
//! loads only the rows a batch touches, folds, and writes back the rows that changed, with the
//! checkpoint, in one transaction. `ledger verify` folds the whole log into an empty model in
//! memory with the same code and compares every row with the tables; the account and
//! transaction rows themselves are derived from the domain's own `apply`, so they are the
//! replayed state, not a second implementation of it.

pub mod accounts;
pub mod history;
pub(crate) mod row;
pub mod transactions;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;

use infra::codec::DomainEvent;
use infra::eventlog::RecordedEvent;
use sqlx::PgConnection;

use crate::error::{Error, Result};

/// The projections this service maintains, each with its own generation, checkpoint and runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectionName {
    /// Customer and world accounts with their balances.
    Accounts,
    /// Transactions with their status, for `GET /transactions[/{id}]` and the cache.
    Transactions,
    /// One row per transaction touching a customer account, with the balance after it.
    AccountHistory,
}

impl ProjectionName {
    pub const ALL: [ProjectionName; 3] = [
        ProjectionName::Accounts,
        ProjectionName::Transactions,
        ProjectionName::AccountHistory,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionName::Accounts => "accounts",
            ProjectionName::Transactions => "transactions",
            ProjectionName::AccountHistory => "account_history",
        }
    }

    /// The tables of this projection, in creation order.
    pub fn tables(self) -> &'static [TableShape] {
        match self {
            ProjectionName::Accounts => accounts::TABLES,
            ProjectionName::Transactions => transactions::TABLES,
            ProjectionName::AccountHistory => history::TABLES,
        }
    }
}

impl fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProjectionName {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        ProjectionName::ALL
            .into_iter()
            .find(|name| name.as_str() == text)
            .ok_or_else(|| {
                Error::Job(format!(
                    "unknown projection {text:?}; the projections are {}",
                    ProjectionName::ALL.map(ProjectionName::as_str).join(", ")
                ))
            })
    }
}

/// One table of a projection: its view name, and the statements creating it under a given
/// table name (`<name>_g<N>`), generated from its row's declaration.
#[derive(Debug)]
pub struct TableShape {
    pub name: &'static str,
    pub statements: fn(&str) -> Vec<String>,
}

impl TableShape {
    /// The table of generation `generation`.
    pub fn table(&self, generation: i32) -> String {
        format!("{}_g{generation}", self.name)
    }

    /// The statements creating generation `generation` of this table.
    pub fn create_statements(&self, generation: i32) -> Vec<String> {
        (self.statements)(&self.table(generation))
    }
}

/// An event as a model folds it: where it is in the log, and what it says.
#[derive(Clone, Copy)]
pub struct Decoded<'a> {
    pub log: &'a RecordedEvent,
    pub event: &'a DomainEvent,
    /// The event's ordinal in the log's order, from 1: the order every projection applies
    /// events in. Rows keep the ordinal of their first event as the key of their pages
    /// (`created_position`): a row projected later always sorts after every row projected before
    /// it, so a client paging newest first never misses one. (The log position alone does not
    /// have that property on PostgreSQL: a transaction can commit after a later insert.)
    pub ordinal: i64,
}

impl Decoded<'_> {
    /// The event's version in its stream, as rows store it.
    pub fn sequence(&self) -> i64 {
        i64::try_from(self.log.sequence).unwrap_or(i64::MAX)
    }
}

/// A batch of events decoded once, to be folded by every projection.
pub struct DecodedBatch {
    pub events: Vec<RecordedEvent>,
    pub decoded: Vec<DomainEvent>,
}

impl DecodedBatch {
    /// Decodes `events`, or names the first one that cannot be read.
    pub fn new(events: Vec<RecordedEvent>) -> Result<DecodedBatch> {
        let decoded = events
            .iter()
            .map(|event| {
                infra::codec::decode(event).map_err(|problem| unprojectable(event, problem))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodedBatch { events, decoded })
    }

    /// The events after `checkpoint`, numbered on from `applied` (how many the projection has
    /// applied before them).
    pub fn after(&self, checkpoint: infra::log::LogPosition, applied: i64) -> Vec<Decoded<'_>> {
        self.events
            .iter()
            .zip(&self.decoded)
            .filter(|(log, _)| log.position > checkpoint)
            .zip(applied.saturating_add(1)..)
            .map(|((log, event), ordinal)| Decoded {
                log,
                event,
                ordinal,
            })
            .collect()
    }

    pub fn last_position(&self) -> Option<infra::log::LogPosition> {
        self.events.last().map(|event| event.position)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// The error of an event a model cannot fold.
pub fn unprojectable(log: &RecordedEvent, problem: impl Into<String>) -> Error {
    Error::Unprojectable {
        position: log.position.to_string(),
        stream: log.stream.to_string(),
        problem: problem.into(),
    }
}

/// A projection's rows in memory: loaded for a batch, or folded from the whole log.
pub trait Model: Default + Send + Sized {
    /// A row as it is stored, comparable field by field.
    type Record: PartialEq + fmt::Debug + Send;

    /// Loads from generation `generation` the rows that `events` may change.
    fn load(
        connection: &mut PgConnection,
        generation: i32,
        events: &[Decoded<'_>],
    ) -> impl Future<Output = Result<Self>> + Send;

    /// Applies one event. Pure: no IO.
    fn fold(&mut self, event: &Decoded<'_>) -> Result<()>;

    /// Writes the rows changed since loading to generation `generation`.
    fn store(
        &mut self,
        connection: &mut PgConnection,
        generation: i32,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Every row, keyed for comparison and reports (the key names the account or transaction).
    fn records(&self) -> BTreeMap<String, Self::Record>;

    /// What the model keeps beside its rows to fold later events (the folded domain states, the
    /// owners of accounts), keyed and rendered as canonical JSON. `ledger verify` compares it
    /// too: a wrong one would corrupt rows only when the next event arrives.
    fn hidden(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// The same, as stored in generation `generation`.
    fn load_hidden(
        _connection: &mut PgConnection,
        _generation: i32,
    ) -> impl Future<Output = Result<BTreeMap<String, String>>> + Send {
        async { Ok(BTreeMap::new()) }
    }

    /// Every row stored in `relation` (a generation's table, or the live view).
    fn load_records(
        connection: &mut PgConnection,
        relation: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, Self::Record>>> + Send;
}

/// Timestamps as the API shows them: RFC 3339 UTC with microseconds.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
