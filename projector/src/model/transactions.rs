//! The `transactions` projection: every transaction as its stream's events leave it (through
//! `domain::Transaction::apply`), with the owners of both accounts so that authorization is part
//! of the row. The owners come from `account_owners`, the projection's own table, filled from
//! `AccountOpened` (a projection never reads another projection's tables).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{AccountEvent, Transaction, TransactionEvent};
use infra::codec::DomainEvent;
use infra::log::LogPosition;
use lru::LruCache;
use serde_json::{Value, json};
use uuid::Uuid;

use super::row::projection_row;
use super::{Backend, Db, Decoded, Model, TableShape, first_transaction_sequences, unprojectable};
use crate::error::{Error, Result};

pub const TABLES: &[TableShape] = &[
    TableShape {
        name: "transactions",
        statements: |table, backend| {
            let columns = match backend {
                Backend::Postgres => TransactionRecord::column_definitions(),
                Backend::Sqlite => TransactionRecord::sqlite_column_definitions(),
            };
            let json = backend.folded_state_type();
            // A row is about 1.7 kB (most of it the folded state) and is updated two or three
            // times in its first second: leave room for one more version on its page.
            let storage = backend.table_storage(60);
            let mut statements = vec![format!(
                "CREATE TABLE {table} ({columns}, state {json} NOT NULL, PRIMARY KEY (id)){storage}"
            )];
            for (suffix, column) in [
                ("source", "source_account_id"),
                ("destination", "destination_account_id"),
                ("source_owner", "source_owner_id"),
                ("destination_owner", "destination_owner_id"),
            ] {
                statements.push(format!(
                    "CREATE INDEX {table}_by_{suffix} ON {table} ({column}, created_position DESC)"
                ));
            }
            statements.push(format!(
                "CREATE INDEX {table}_by_position ON {table} (created_position DESC)"
            ));
            statements
        },
    },
    TableShape {
        name: "account_owners",
        statements: |table, backend| {
            let columns = match backend {
                Backend::Postgres => OwnerRecord::column_definitions(),
                Backend::Sqlite => OwnerRecord::sqlite_column_definitions(),
            };
            vec![format!(
                "CREATE TABLE {table} ({columns}, PRIMARY KEY (account_id))"
            )]
        },
    },
];

projection_row! {
    /// A transaction row as stored (without the folded state it keeps for the next event).
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct TransactionRecord in "transactions" {
        pub id: Uuid => "uuid",
        pub kind: String => "text" fixed,
        pub status: String => "text",
        pub amount_minor: i64 => "bigint" fixed,
        pub currency: String => "text" fixed,
        pub source_account_id: Option<Uuid> => "uuid" fixed,
        pub destination_account_id: Option<Uuid> => "uuid" fixed,
        pub source_owner_id: Option<Uuid> => "uuid" fixed,
        pub destination_owner_id: Option<Uuid> => "uuid" fixed,
        pub description: Option<String> => "text" fixed,
        pub reason: Option<String> => "text",
        pub fraud: Option<Value> => "jsonb",
        pub initiated_by: Uuid => "uuid" fixed,
        pub version: i64 => "bigint",
        pub created_at: DateTime<Utc> => "timestamptz" fixed,
        pub updated_at: DateTime<Utc> => "timestamptz",
        pub created_position: i64 => "bigint" fixed,
    }
}

projection_row! {
    /// Who owns an account, as the transactions projection keeps it for its own rows.
    #[derive(Debug, Clone, PartialEq)]
    pub struct OwnerRecord in "account_owners" {
        pub account_id: Uuid => "uuid",
        pub owner_id: Uuid => "uuid",
    }
}

struct TransactionRow {
    record: TransactionRecord,
    state: Transaction,
}

#[derive(Default)]
pub struct TransactionsModel {
    rows: HashMap<Uuid, TransactionRow>,
    owners: HashMap<Uuid, Uuid>,
    dirty: HashSet<Uuid>,
    new_owners: HashSet<Uuid>,
}

impl TransactionsModel {
    /// The rows changed since loading, as the cache writes them through.
    pub fn changed(&self) -> impl Iterator<Item = &TransactionRecord> {
        self.dirty
            .iter()
            .filter_map(|id| self.rows.get(id).map(|row| &row.record))
    }
}

impl TransactionsModel {
    /// [`Model::load`], taking what `memory` holds instead of reading it back. A transaction
    /// created in the batch has no row yet and is not read at all
    /// ([`first_transaction_sequences`]).
    pub async fn load_remembering(
        db: &mut Db<'_>,
        generation: i32,
        events: &[Decoded<'_>],
        mut memory: Option<&mut Remembered>,
    ) -> Result<Self> {
        let mut accounts = Vec::new();
        for event in events {
            if let DomainEvent::Transaction(
                _,
                TransactionEvent::TransactionCreated { request, .. },
            ) = &event.event
            {
                accounts.extend(request.source_account_id.map(|id| id.0));
                accounts.extend(request.destination_account_id.map(|id| id.0));
            }
        }
        let mut model = TransactionsModel::default();
        let mut ids = Vec::new();
        // Each transaction's first event in the batch: its row must be at the version before it.
        for (id, sequence) in first_transaction_sequences(events) {
            if sequence <= 1 {
                continue;
            }
            match memory
                .as_deref_mut()
                .and_then(|memory| memory.rows.pop(&id))
            {
                // The row as this projector's last batch stored it, if that is the version
                // right before this event; anything else is read from the table.
                Some(row) if row.record.version == sequence - 1 => {
                    model.rows.insert(id, row);
                }
                _ => ids.push(id),
            }
        }
        if let Some(memory) = memory.as_deref_mut() {
            memory.hits += model.rows.len() as u64;
            metrics::counter!("projection_rows_remembered_total", "result" => "hit")
                .increment(model.rows.len() as u64);
            metrics::counter!("projection_rows_remembered_total", "result" => "miss")
                .increment(ids.len() as u64);
        }
        ids.sort_unstable();
        let table = TABLES[0].table(generation);
        let rows = TransactionRecord::load_by_keys(db, &table, "id", &ids, Some("state")).await?;
        for (record, state) in rows {
            let state = state.ok_or_else(|| corrupt("a transaction row without its state"))?;
            let state = serde_json::from_str::<Transaction>(&state).map_err(corrupt)?;
            model
                .rows
                .insert(record.id, TransactionRow { record, state });
        }
        accounts.sort_unstable();
        accounts.dedup();
        let mut unknown = Vec::with_capacity(accounts.len());
        for account in accounts {
            match memory
                .as_deref_mut()
                .and_then(|memory| memory.owners.get(&account))
            {
                Some(owner) => {
                    model.owners.insert(account, *owner);
                }
                None => unknown.push(account),
            }
        }
        let table = TABLES[1].table(generation);
        let owners = OwnerRecord::load_by_keys(db, &table, "account_id", &unknown, None).await?;
        model.owners.extend(
            owners
                .into_iter()
                .map(|(owner, _)| (owner.account_id, owner.owner_id)),
        );
        Ok(model)
    }

    /// Keeps in `memory` what this batch stored that a later batch may need: the transactions
    /// not completed yet (a completed one takes no more events) and the owners it knows.
    pub fn remember(&self, memory: &mut Remembered) {
        for id in &self.dirty {
            let Some(row) = self.rows.get(id) else {
                continue;
            };
            if row.state.completed {
                memory.rows.pop(id);
            } else {
                memory.rows.put(
                    *id,
                    TransactionRow {
                        record: row.record.clone(),
                        state: row.state.clone(),
                    },
                );
            }
        }
        for (account, owner) in &self.owners {
            memory.owners.put(*account, *owner);
        }
    }
}

/// What the live projector remembers of the transactions projection between its batches: the
/// rows still in flight and the owners of accounts, as its last committed batch left them in
/// one generation at one checkpoint. It is used only while the projection's locked checkpoint
/// is that one: then nobody else has changed those rows (a projection's rows move with its
/// checkpoint, under its lock), so the next batch need not read them back. Anything else (a
/// batch that did not commit, a rebuild's switch, another instance's batch, a restart) shows
/// as another checkpoint or generation, and the memory is dropped (decision 70).
pub struct TransactionMemory {
    kept: std::sync::Mutex<Option<Remembered>>,
    /// Rows taken from the memory instead of the table, since this memory was made.
    hits: std::sync::atomic::AtomicU64,
}

/// The memory of one generation at one checkpoint (see [`TransactionMemory`]).
pub struct Remembered {
    generation: i32,
    checkpoint: LogPosition,
    rows: LruCache<Uuid, TransactionRow>,
    owners: LruCache<Uuid, Uuid>,
    /// Rows taken from this memory by the batch that holds it.
    hits: u64,
}

/// Transactions in flight the memory keeps at most (about 2 kB each): beyond that, the oldest
/// are read back from the table when their next event comes.
pub const REMEMBERED_ROWS: usize = 32_768;
/// Owners of accounts the memory keeps at most.
pub const REMEMBERED_OWNERS: usize = 65_536;

impl Default for TransactionMemory {
    fn default() -> Self {
        TransactionMemory {
            kept: std::sync::Mutex::new(None),
            hits: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl TransactionMemory {
    /// What is remembered of `generation` at `checkpoint`, taken out (so a batch that fails
    /// leaves nothing behind); empty if the memory is of another generation or checkpoint.
    pub fn take(&self, generation: i32, checkpoint: LogPosition) -> Remembered {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match kept {
            Some(kept) if kept.generation == generation && kept.checkpoint == checkpoint => kept,
            _ => Remembered {
                generation,
                checkpoint,
                rows: LruCache::new(nonzero(REMEMBERED_ROWS)),
                owners: LruCache::new(nonzero(REMEMBERED_OWNERS)),
                hits: 0,
            },
        }
    }

    /// How many transactions are remembered now.
    pub fn remembered(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map_or(0, |kept| kept.rows.len())
    }

    /// How many rows batches have taken from this memory instead of the table.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Puts back `remembered` as of `checkpoint`, where the batch that changed it moved the
    /// projection's checkpoint. If that batch does not commit, the projection's checkpoint stays
    /// where it was and the next [`TransactionMemory::take`] drops this.
    pub fn keep(&self, mut remembered: Remembered, checkpoint: LogPosition) {
        remembered.checkpoint = checkpoint;
        self.hits.fetch_add(
            std::mem::take(&mut remembered.hits),
            std::sync::atomic::Ordering::Relaxed,
        );
        *self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(remembered);
    }
}

fn nonzero(capacity: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN)
}

fn record_of(
    transaction: &Transaction,
    version: i64,
    created_position: i64,
    owners: &HashMap<Uuid, Uuid>,
) -> TransactionRecord {
    let request = &transaction.request;
    let source = request.source_account_id.map(|id| id.0);
    let destination = request.destination_account_id.map(|id| id.0);
    TransactionRecord {
        id: transaction.id.0,
        kind: request.kind.as_str().to_owned(),
        status: transaction.status().as_str().to_owned(),
        amount_minor: request.amount.minor(),
        currency: request.currency.code().to_owned(),
        source_account_id: source,
        destination_account_id: destination,
        source_owner_id: source.and_then(|id| owners.get(&id).copied()),
        destination_owner_id: destination.and_then(|id| owners.get(&id).copied()),
        description: request.description.clone(),
        reason: transaction
            .rejection_reason()
            .map(|reason| reason.as_str().to_owned()),
        fraud: transaction
            .fraud
            .as_ref()
            .map(|decision| json!({ "outcome": decision.outcome, "rule": decision.rule })),
        initiated_by: transaction.initiated_by.0,
        version,
        created_at: transaction.created_at.trunc_subsecs(6),
        updated_at: transaction.updated_at.trunc_subsecs(6),
        created_position,
    }
}

impl Model for TransactionsModel {
    type Record = TransactionRecord;

    async fn load(db: &mut Db<'_>, generation: i32, events: &[Decoded<'_>]) -> Result<Self> {
        TransactionsModel::load_remembering(db, generation, events, None).await
    }

    fn fold(&mut self, event: &Decoded<'_>) -> Result<()> {
        match &event.event {
            DomainEvent::Account(id, AccountEvent::AccountOpened { owner_id, .. }) => {
                self.owners.insert(id.0, owner_id.0);
                self.new_owners.insert(id.0);
            }
            DomainEvent::Account(..) => {}
            DomainEvent::Transaction(id, payload) => {
                let existing = self.rows.remove(&id.0);
                let (state, created_position, owners) = match existing {
                    // The owners were resolved when the transaction was created; a later batch
                    // does not load them again.
                    Some(row) => (
                        Some(row.state),
                        row.record.created_position,
                        Some((row.record.source_owner_id, row.record.destination_owner_id)),
                    ),
                    None => (None, event.ordinal, None),
                };
                let transaction = Transaction::apply(state, payload)
                    .map_err(|violation| unprojectable(event.log, violation.to_string()))?;
                let mut record = record_of(
                    &transaction,
                    event.sequence(),
                    created_position,
                    &self.owners,
                );
                if let Some((source, destination)) = owners {
                    record.source_owner_id = source;
                    record.destination_owner_id = destination;
                }
                self.rows.insert(
                    id.0,
                    TransactionRow {
                        record,
                        state: transaction,
                    },
                );
                self.dirty.insert(id.0);
            }
        }
        Ok(())
    }

    async fn store(&mut self, db: &mut Db<'_>, generation: i32) -> Result<()> {
        let owners: Vec<OwnerRecord> = self
            .new_owners
            .drain()
            .filter_map(|account_id| {
                self.owners.get(&account_id).map(|owner_id| OwnerRecord {
                    account_id,
                    owner_id: *owner_id,
                })
            })
            .collect();
        let owners: Vec<(&OwnerRecord, Option<String>)> =
            owners.iter().map(|owner| (owner, None)).collect();
        OwnerRecord::upsert(
            db,
            &TABLES[1].table(generation),
            "account_id",
            &owners,
            None,
        )
        .await?;
        let mut rows = Vec::with_capacity(self.dirty.len());
        for id in &self.dirty {
            let Some(row) = self.rows.get(id) else {
                continue;
            };
            let state = serde_json::to_string(&row.state).map_err(|error| {
                Error::Job(format!("cannot serialise transaction {id}: {error}"))
            })?;
            rows.push((&row.record, Some(state)));
        }
        TransactionRecord::upsert(db, &TABLES[0].table(generation), "id", &rows, Some("state"))
            .await
    }

    fn hidden(&self) -> BTreeMap<String, String> {
        let states = self.rows.iter().filter_map(|(id, row)| {
            let state = serde_json::to_value(&row.state).ok()?;
            Some((format!("state {id}"), state.to_string()))
        });
        let owners = self
            .owners
            .iter()
            .map(|(account, owner)| (format!("owner {account}"), owner.to_string()));
        states.chain(owners).collect()
    }

    async fn load_hidden(db: &mut Db<'_>, generation: i32) -> Result<BTreeMap<String, String>> {
        let table = TABLES[0].table(generation);
        let states = TransactionRecord::load_all(db, &table, Some("state")).await?;
        let table = TABLES[1].table(generation);
        let owners = OwnerRecord::load_all(db, &table, None).await?;
        let mut hidden = BTreeMap::new();
        for (record, state) in states {
            let state = state.ok_or_else(|| corrupt("a transaction row without its state"))?;
            // Canonical JSON, whatever the database kept of its spacing.
            let state: Value = serde_json::from_str(&state).map_err(corrupt)?;
            hidden.insert(format!("state {}", record.id), state.to_string());
        }
        for (owner, _) in owners {
            hidden.insert(
                format!("owner {}", owner.account_id),
                owner.owner_id.to_string(),
            );
        }
        Ok(hidden)
    }

    fn records(&self) -> BTreeMap<String, TransactionRecord> {
        self.rows
            .iter()
            .map(|(id, row)| (id.to_string(), row.record.clone()))
            .collect()
    }

    async fn load_records(
        db: &mut Db<'_>,
        relation: &str,
    ) -> Result<BTreeMap<String, TransactionRecord>> {
        Ok(TransactionRecord::load_all(db, relation, None)
            .await?
            .into_iter()
            .map(|(record, _)| (record.id.to_string(), record))
            .collect())
    }
}

fn corrupt(error: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "transactions",
        problem: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upsert_updates_what_a_transaction_changes_and_leaves_its_fixed_columns() {
        // The indexes hold only fixed columns: an upsert that named them would make SQLite
        // rewrite five index entries per stored transaction.
        let (columns, updates) = TransactionRecord::upsert_columns("id", Some("state"));
        assert_eq!(columns.len(), TransactionRecord::NAMES.len() + 1);
        let updated: Vec<&str> = updates
            .split(", ")
            .map(|update| update.split(" = ").next().unwrap_or_default())
            .collect();
        assert_eq!(
            updated,
            [
                "status",
                "reason",
                "fraud",
                "version",
                "updated_at",
                "state"
            ]
        );
    }
}
