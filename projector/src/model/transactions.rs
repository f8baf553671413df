//! The `transactions` projection: every transaction as its stream's events leave it (through
//! `domain::Transaction::apply`), with the owners of both accounts so that authorization is part
//! of the row. The owners come from `account_owners`, the projection's own table, filled from
//! `AccountOpened` (a projection never reads another projection's tables).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{AccountEvent, Transaction, TransactionEvent};
use infra::error::DatabaseContext;
use infra::replay::DomainEvent;
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{Decoded, Model, TableShape, unprojectable};
use crate::error::{Error, Result};

pub const TABLES: &[TableShape] = &[
    TableShape {
        name: "transactions",
        ddl: "CREATE TABLE {t} (
            id                     uuid        PRIMARY KEY,
            kind                   text        NOT NULL,
            status                 text        NOT NULL,
            amount_minor           bigint      NOT NULL,
            currency               text        NOT NULL,
            source_account_id      uuid,
            destination_account_id uuid,
            source_owner_id        uuid,
            destination_owner_id   uuid,
            description            text,
            reason                 text,
            fraud                  jsonb,
            initiated_by           uuid        NOT NULL,
            version                bigint      NOT NULL,
            created_at             timestamptz NOT NULL,
            updated_at             timestamptz NOT NULL,
            created_position       bigint      NOT NULL,
            state                  jsonb       NOT NULL
        );
        CREATE INDEX {t}_by_position ON {t} (created_position DESC);
        CREATE INDEX {t}_by_source ON {t} (source_account_id, created_position DESC);
        CREATE INDEX {t}_by_destination ON {t} (destination_account_id, created_position DESC);
        CREATE INDEX {t}_by_source_owner ON {t} (source_owner_id, created_position DESC);
        CREATE INDEX {t}_by_destination_owner ON {t} (destination_owner_id, created_position DESC)",
    },
    TableShape {
        name: "account_owners",
        ddl: "CREATE TABLE {t} (account_id uuid PRIMARY KEY, owner_id uuid NOT NULL)",
    },
];

/// A transaction row as stored (without the folded state it keeps for the next event).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransactionRecord {
    pub id: Uuid,
    pub kind: String,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub source_account_id: Option<Uuid>,
    pub destination_account_id: Option<Uuid>,
    pub source_owner_id: Option<Uuid>,
    pub destination_owner_id: Option<Uuid>,
    pub description: Option<String>,
    pub reason: Option<String>,
    pub fraud: Option<Value>,
    pub initiated_by: Uuid,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub created_position: i64,
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

    async fn load(
        connection: &mut PgConnection,
        generation: i32,
        events: &[Decoded<'_>],
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let mut accounts = Vec::new();
        for event in events {
            match &event.event {
                DomainEvent::Transaction(id, payload) => {
                    ids.push(id.0);
                    if let TransactionEvent::TransactionCreated { request, .. } = payload {
                        accounts.extend(request.source_account_id.map(|id| id.0));
                        accounts.extend(request.destination_account_id.map(|id| id.0));
                    }
                }
                DomainEvent::Account(..) => {}
            }
        }
        ids.sort_unstable();
        ids.dedup();
        accounts.sort_unstable();
        accounts.dedup();
        let mut model = TransactionsModel::default();
        if !ids.is_empty() {
            let table = TABLES[0].table(generation);
            let rows = sqlx::query(&format!(
                "SELECT {COLUMNS}, state FROM {table} WHERE id = ANY($1)"
            ))
            .bind(&ids)
            .fetch_all(&mut *connection)
            .await
            .context("loading transaction rows")?;
            for row in rows {
                let record = decode(&row)?;
                let state: Value = row.try_get("state").map_err(corrupt)?;
                let state = serde_json::from_value::<Transaction>(state).map_err(corrupt)?;
                model
                    .rows
                    .insert(record.id, TransactionRow { record, state });
            }
        }
        if !accounts.is_empty() {
            let table = TABLES[1].table(generation);
            let owners: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
                "SELECT account_id, owner_id FROM {table} WHERE account_id = ANY($1)"
            ))
            .bind(&accounts)
            .fetch_all(&mut *connection)
            .await
            .context("loading account owners")?;
            model.owners.extend(owners);
        }
        Ok(model)
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
                    event.log.sequence,
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

    async fn store(&mut self, connection: &mut PgConnection, generation: i32) -> Result<()> {
        if !self.new_owners.is_empty() {
            let (accounts, owners): (Vec<Uuid>, Vec<Uuid>) = self
                .new_owners
                .drain()
                .filter_map(|id| self.owners.get(&id).map(|owner| (id, *owner)))
                .unzip();
            let table = TABLES[1].table(generation);
            sqlx::query(&format!(
                "INSERT INTO {table} (account_id, owner_id)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[])
                 ON CONFLICT (account_id) DO UPDATE SET owner_id = EXCLUDED.owner_id"
            ))
            .bind(accounts)
            .bind(owners)
            .execute(&mut *connection)
            .await
            .context("storing account owners")?;
        }
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut columns = Columns::default();
        for id in &self.dirty {
            let Some(row) = self.rows.get(id) else {
                continue;
            };
            let state = serde_json::to_value(&row.state).map_err(|error| {
                Error::Job(format!("cannot serialise transaction {id}: {error}"))
            })?;
            columns.push(&row.record, state);
        }
        let table = TABLES[0].table(generation);
        sqlx::query(&format!(
            "INSERT INTO {table} ({COLUMNS}, state)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                 $6::uuid[], $7::uuid[], $8::uuid[], $9::uuid[], $10::text[], $11::text[],
                 $12::jsonb[], $13::uuid[], $14::bigint[], $15::timestamptz[],
                 $16::timestamptz[], $17::bigint[], $18::jsonb[])
             ON CONFLICT (id) DO UPDATE SET
                 kind = EXCLUDED.kind, status = EXCLUDED.status,
                 amount_minor = EXCLUDED.amount_minor, currency = EXCLUDED.currency,
                 source_account_id = EXCLUDED.source_account_id,
                 destination_account_id = EXCLUDED.destination_account_id,
                 source_owner_id = EXCLUDED.source_owner_id,
                 destination_owner_id = EXCLUDED.destination_owner_id,
                 description = EXCLUDED.description, reason = EXCLUDED.reason,
                 fraud = EXCLUDED.fraud, initiated_by = EXCLUDED.initiated_by,
                 version = EXCLUDED.version, created_at = EXCLUDED.created_at,
                 updated_at = EXCLUDED.updated_at, created_position = EXCLUDED.created_position,
                 state = EXCLUDED.state"
        ))
        .bind(columns.id)
        .bind(columns.kind)
        .bind(columns.status)
        .bind(columns.amount_minor)
        .bind(columns.currency)
        .bind(columns.source_account_id)
        .bind(columns.destination_account_id)
        .bind(columns.source_owner_id)
        .bind(columns.destination_owner_id)
        .bind(columns.description)
        .bind(columns.reason)
        .bind(columns.fraud)
        .bind(columns.initiated_by)
        .bind(columns.version)
        .bind(columns.created_at)
        .bind(columns.updated_at)
        .bind(columns.created_position)
        .bind(columns.state)
        .execute(connection)
        .await
        .context("storing transaction rows")?;
        Ok(())
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

    async fn load_hidden(
        connection: &mut PgConnection,
        generation: i32,
    ) -> Result<BTreeMap<String, String>> {
        let table = TABLES[0].table(generation);
        let states: Vec<(Uuid, Value)> = sqlx::query_as(&format!("SELECT id, state FROM {table}"))
            .fetch_all(&mut *connection)
            .await
            .context("reading transaction states")?;
        let table = TABLES[1].table(generation);
        let owners: Vec<(Uuid, Uuid)> =
            sqlx::query_as(&format!("SELECT account_id, owner_id FROM {table}"))
                .fetch_all(&mut *connection)
                .await
                .context("reading account owners")?;
        let states = states
            .into_iter()
            .map(|(id, state)| (format!("state {id}"), state.to_string()));
        let owners = owners
            .into_iter()
            .map(|(account, owner)| (format!("owner {account}"), owner.to_string()));
        Ok(states.chain(owners).collect())
    }

    fn records(&self) -> BTreeMap<String, TransactionRecord> {
        self.rows
            .iter()
            .map(|(id, row)| (id.to_string(), row.record.clone()))
            .collect()
    }

    async fn load_records(
        connection: &mut PgConnection,
        relation: &str,
    ) -> Result<BTreeMap<String, TransactionRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM {relation}"))
            .fetch_all(connection)
            .await
            .context("reading transaction rows")?;
        rows.iter()
            .map(|row| decode(row).map(|record| (record.id.to_string(), record)))
            .collect()
    }
}

/// The stored columns, in the order of [`decode`] and the UNNEST of `store`.
pub const COLUMNS: &str = "id, kind, status, amount_minor, currency, source_account_id, \
     destination_account_id, source_owner_id, destination_owner_id, description, reason, fraud, \
     initiated_by, version, created_at, updated_at, created_position";

fn corrupt(error: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "transactions",
        problem: error.to_string(),
    }
}

/// Reads a row selected with [`COLUMNS`].
pub fn decode(row: &sqlx::postgres::PgRow) -> Result<TransactionRecord> {
    Ok(TransactionRecord {
        id: row.try_get("id").map_err(corrupt)?,
        kind: row.try_get("kind").map_err(corrupt)?,
        status: row.try_get("status").map_err(corrupt)?,
        amount_minor: row.try_get("amount_minor").map_err(corrupt)?,
        currency: row.try_get("currency").map_err(corrupt)?,
        source_account_id: row.try_get("source_account_id").map_err(corrupt)?,
        destination_account_id: row.try_get("destination_account_id").map_err(corrupt)?,
        source_owner_id: row.try_get("source_owner_id").map_err(corrupt)?,
        destination_owner_id: row.try_get("destination_owner_id").map_err(corrupt)?,
        description: row.try_get("description").map_err(corrupt)?,
        reason: row.try_get("reason").map_err(corrupt)?,
        fraud: row.try_get("fraud").map_err(corrupt)?,
        initiated_by: row.try_get("initiated_by").map_err(corrupt)?,
        version: row.try_get("version").map_err(corrupt)?,
        created_at: row.try_get("created_at").map_err(corrupt)?,
        updated_at: row.try_get("updated_at").map_err(corrupt)?,
        created_position: row.try_get("created_position").map_err(corrupt)?,
    })
}

#[derive(Default)]
struct Columns {
    id: Vec<Uuid>,
    kind: Vec<String>,
    status: Vec<String>,
    amount_minor: Vec<i64>,
    currency: Vec<String>,
    source_account_id: Vec<Option<Uuid>>,
    destination_account_id: Vec<Option<Uuid>>,
    source_owner_id: Vec<Option<Uuid>>,
    destination_owner_id: Vec<Option<Uuid>>,
    description: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    fraud: Vec<Option<Value>>,
    initiated_by: Vec<Uuid>,
    version: Vec<i64>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    created_position: Vec<i64>,
    state: Vec<Value>,
}

impl Columns {
    fn push(&mut self, record: &TransactionRecord, state: Value) {
        self.id.push(record.id);
        self.kind.push(record.kind.clone());
        self.status.push(record.status.clone());
        self.amount_minor.push(record.amount_minor);
        self.currency.push(record.currency.clone());
        self.source_account_id.push(record.source_account_id);
        self.destination_account_id
            .push(record.destination_account_id);
        self.source_owner_id.push(record.source_owner_id);
        self.destination_owner_id.push(record.destination_owner_id);
        self.description.push(record.description.clone());
        self.reason.push(record.reason.clone());
        self.fraud.push(record.fraud.clone());
        self.initiated_by.push(record.initiated_by);
        self.version.push(record.version);
        self.created_at.push(record.created_at);
        self.updated_at.push(record.updated_at);
        self.created_position.push(record.created_position);
        self.state.push(state);
    }
}
