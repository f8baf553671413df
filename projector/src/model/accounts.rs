//! The `accounts` projection: every customer account as its stream's events leave it (through
//! `domain::Account::apply`), and one world account per currency whose balance accrues the
//! world legs of confirmed transactions (world accounts have no stream, SPEC §3).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{Account, AccountId, TransactionEvent};
use infra::error::DatabaseContext;
use infra::replay::DomainEvent;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{Decoded, Model, TableShape, unprojectable};
use crate::error::{Error, Result};

pub const TABLES: &[TableShape] = &[TableShape {
    name: "accounts",
    ddl: "CREATE TABLE {t} (
        id                    uuid        PRIMARY KEY,
        owner_id              uuid,
        kind                  text        NOT NULL,
        currency              text        NOT NULL,
        name                  text,
        balance_minor         bigint      NOT NULL,
        held_minor            bigint      NOT NULL,
        pending_credits_minor bigint      NOT NULL,
        version               bigint      NOT NULL,
        created_at            timestamptz NOT NULL,
        updated_at            timestamptz NOT NULL,
        created_position      bigint      NOT NULL,
        state                 jsonb
    );
    CREATE INDEX {t}_by_owner ON {t} (owner_id, created_position DESC);
    CREATE INDEX {t}_by_position ON {t} (created_position DESC)",
}];

/// An account row as stored (without the folded state it keeps for the next event).
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRecord {
    pub id: Uuid,
    /// `None` for world accounts.
    pub owner_id: Option<Uuid>,
    /// `customer` or `world`.
    pub kind: String,
    pub currency: String,
    pub name: Option<String>,
    pub balance_minor: i64,
    pub held_minor: i64,
    pub pending_credits_minor: i64,
    /// The stream's version; for a world account, the number of legs it received.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The log position of the account's first event: the keyset of `GET /accounts`.
    pub created_position: i64,
}

struct AccountRow {
    record: AccountRecord,
    state: Option<Account>,
}

#[derive(Default)]
pub struct AccountsModel {
    rows: HashMap<Uuid, AccountRow>,
    dirty: HashSet<Uuid>,
}

fn record_of(account: &Account, version: i64, created_position: i64) -> AccountRecord {
    AccountRecord {
        id: account.id.0,
        owner_id: Some(account.owner_id.0),
        kind: "customer".to_owned(),
        currency: account.currency.code().to_owned(),
        name: account.name.clone(),
        balance_minor: account.balance_minor,
        held_minor: account.held_minor,
        pending_credits_minor: account.pending_credits_minor,
        version,
        created_at: account.opened_at.trunc_subsecs(6),
        updated_at: account.updated_at.trunc_subsecs(6),
        created_position,
    }
}

/// The accounts an event changes.
fn touched(event: &Decoded<'_>, into: &mut Vec<Uuid>) {
    match &event.event {
        DomainEvent::Account(id, _) => into.push(id.0),
        DomainEvent::Transaction(_, TransactionEvent::TransactionConfirmed { legs, .. }) => {
            into.extend(legs.iter().map(|leg| leg.account_id.0));
        }
        DomainEvent::Transaction(..) => {}
    }
}

impl Model for AccountsModel {
    type Record = AccountRecord;

    async fn load(
        connection: &mut PgConnection,
        generation: i32,
        events: &[Decoded<'_>],
    ) -> Result<Self> {
        let mut ids = Vec::new();
        for event in events {
            touched(event, &mut ids);
        }
        ids.sort_unstable();
        ids.dedup();
        let table = TABLES[0].table(generation);
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, state FROM {table} WHERE id = ANY($1)"
        ))
        .bind(&ids)
        .fetch_all(connection)
        .await
        .context("loading account rows")?;
        let mut model = AccountsModel::default();
        for row in rows {
            let record = decode(&row)?;
            let state: Option<serde_json::Value> = row.try_get("state").map_err(corrupt)?;
            let state = state
                .map(serde_json::from_value::<Account>)
                .transpose()
                .map_err(corrupt)?;
            model.rows.insert(record.id, AccountRow { record, state });
        }
        Ok(model)
    }

    fn fold(&mut self, event: &Decoded<'_>) -> Result<()> {
        match &event.event {
            DomainEvent::Account(id, payload) => {
                let existing = self.rows.remove(&id.0);
                let (state, created_position) = match existing {
                    Some(row) => (row.state, row.record.created_position),
                    None => (None, event.ordinal),
                };
                let account = Account::apply(state, payload)
                    .map_err(|violation| unprojectable(event.log, violation.to_string()))?;
                let record = record_of(&account, event.log.sequence, created_position);
                self.rows.insert(
                    id.0,
                    AccountRow {
                        record,
                        state: Some(account),
                    },
                );
                self.dirty.insert(id.0);
            }
            DomainEvent::Transaction(_, TransactionEvent::TransactionConfirmed { legs, at }) => {
                for leg in legs {
                    if leg.account_id != AccountId::world(leg.currency) {
                        continue;
                    }
                    let at = at.trunc_subsecs(6);
                    let row = self
                        .rows
                        .entry(leg.account_id.0)
                        .or_insert_with(|| AccountRow {
                            record: AccountRecord {
                                id: leg.account_id.0,
                                owner_id: None,
                                kind: "world".to_owned(),
                                currency: leg.currency.code().to_owned(),
                                name: None,
                                balance_minor: 0,
                                held_minor: 0,
                                pending_credits_minor: 0,
                                version: 0,
                                created_at: at,
                                updated_at: at,
                                created_position: event.ordinal,
                            },
                            state: None,
                        });
                    row.record.balance_minor = row
                        .record
                        .balance_minor
                        .checked_add(leg.amount_minor)
                        .ok_or_else(|| unprojectable(event.log, "world balance overflows"))?;
                    row.record.version += 1;
                    row.record.updated_at = at;
                    self.dirty.insert(leg.account_id.0);
                }
            }
            DomainEvent::Transaction(..) => {}
        }
        Ok(())
    }

    async fn store(&mut self, connection: &mut PgConnection, generation: i32) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut columns = Columns::default();
        for id in self.dirty.drain() {
            let Some(row) = self.rows.get(&id) else {
                continue;
            };
            let state = row
                .state
                .as_ref()
                .map(serde_json::to_value)
                .transpose()
                .map_err(|error| Error::Job(format!("cannot serialise account {id}: {error}")))?;
            columns.push(&row.record, state);
        }
        let table = TABLES[0].table(generation);
        sqlx::query(&format!(
            "INSERT INTO {table} ({COLUMNS}, state)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                 $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::timestamptz[],
                 $11::timestamptz[], $12::bigint[], $13::jsonb[])
             ON CONFLICT (id) DO UPDATE SET
                 owner_id = EXCLUDED.owner_id, kind = EXCLUDED.kind, currency = EXCLUDED.currency,
                 name = EXCLUDED.name, balance_minor = EXCLUDED.balance_minor,
                 held_minor = EXCLUDED.held_minor,
                 pending_credits_minor = EXCLUDED.pending_credits_minor,
                 version = EXCLUDED.version, created_at = EXCLUDED.created_at,
                 updated_at = EXCLUDED.updated_at, created_position = EXCLUDED.created_position,
                 state = EXCLUDED.state"
        ))
        .bind(columns.id)
        .bind(columns.owner_id)
        .bind(columns.kind)
        .bind(columns.currency)
        .bind(columns.name)
        .bind(columns.balance_minor)
        .bind(columns.held_minor)
        .bind(columns.pending_credits_minor)
        .bind(columns.version)
        .bind(columns.created_at)
        .bind(columns.updated_at)
        .bind(columns.created_position)
        .bind(columns.state)
        .execute(connection)
        .await
        .context("storing account rows")?;
        Ok(())
    }

    fn hidden(&self) -> BTreeMap<String, String> {
        self.rows
            .iter()
            .filter_map(|(id, row)| {
                let state = serde_json::to_value(row.state.as_ref()?).ok()?;
                Some((format!("state {id}"), state.to_string()))
            })
            .collect()
    }

    async fn load_hidden(
        connection: &mut PgConnection,
        generation: i32,
    ) -> Result<BTreeMap<String, String>> {
        let table = TABLES[0].table(generation);
        let rows: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(&format!(
            "SELECT id, state FROM {table} WHERE state IS NOT NULL"
        ))
        .fetch_all(connection)
        .await
        .context("reading account states")?;
        Ok(rows
            .into_iter()
            .map(|(id, state)| (format!("state {id}"), state.to_string()))
            .collect())
    }

    fn records(&self) -> BTreeMap<String, AccountRecord> {
        self.rows
            .iter()
            .map(|(id, row)| (id.to_string(), row.record.clone()))
            .collect()
    }

    async fn load_records(
        connection: &mut PgConnection,
        relation: &str,
    ) -> Result<BTreeMap<String, AccountRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM {relation}"))
            .fetch_all(connection)
            .await
            .context("reading account rows")?;
        rows.iter()
            .map(|row| decode(row).map(|record| (record.id.to_string(), record)))
            .collect()
    }
}

/// The stored columns, in the order of [`decode`] and the UNNEST of `store`.
pub const COLUMNS: &str = "id, owner_id, kind, currency, name, balance_minor, held_minor, \
     pending_credits_minor, version, created_at, updated_at, created_position";

fn corrupt(error: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "accounts",
        problem: error.to_string(),
    }
}

/// Reads a row selected with [`COLUMNS`].
pub fn decode(row: &sqlx::postgres::PgRow) -> Result<AccountRecord> {
    Ok(AccountRecord {
        id: row.try_get("id").map_err(corrupt)?,
        owner_id: row.try_get("owner_id").map_err(corrupt)?,
        kind: row.try_get("kind").map_err(corrupt)?,
        currency: row.try_get("currency").map_err(corrupt)?,
        name: row.try_get("name").map_err(corrupt)?,
        balance_minor: row.try_get("balance_minor").map_err(corrupt)?,
        held_minor: row.try_get("held_minor").map_err(corrupt)?,
        pending_credits_minor: row.try_get("pending_credits_minor").map_err(corrupt)?,
        version: row.try_get("version").map_err(corrupt)?,
        created_at: row.try_get("created_at").map_err(corrupt)?,
        updated_at: row.try_get("updated_at").map_err(corrupt)?,
        created_position: row.try_get("created_position").map_err(corrupt)?,
    })
}

#[derive(Default)]
struct Columns {
    id: Vec<Uuid>,
    owner_id: Vec<Option<Uuid>>,
    kind: Vec<String>,
    currency: Vec<String>,
    name: Vec<Option<String>>,
    balance_minor: Vec<i64>,
    held_minor: Vec<i64>,
    pending_credits_minor: Vec<i64>,
    version: Vec<i64>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    created_position: Vec<i64>,
    state: Vec<Option<serde_json::Value>>,
}

impl Columns {
    fn push(&mut self, record: &AccountRecord, state: Option<serde_json::Value>) {
        self.id.push(record.id);
        self.owner_id.push(record.owner_id);
        self.kind.push(record.kind.clone());
        self.currency.push(record.currency.clone());
        self.name.push(record.name.clone());
        self.balance_minor.push(record.balance_minor);
        self.held_minor.push(record.held_minor);
        self.pending_credits_minor
            .push(record.pending_credits_minor);
        self.version.push(record.version);
        self.created_at.push(record.created_at);
        self.updated_at.push(record.updated_at);
        self.created_position.push(record.created_position);
        self.state.push(state);
    }
}
