//! The `accounts` projection: every customer account as its stream's events leave it (through
//! `domain::Account::apply`), and one world account per currency whose balance accrues the
//! world legs of confirmed transactions (world accounts have no stream, SPEC §3).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{Account, TransactionEvent};
use infra::codec::DomainEvent;
use uuid::Uuid;

use super::row::projection_row;
use super::{Backend, Db, Decoded, Model, TableShape, unprojectable};
use crate::error::{Error, Result};

pub const TABLES: &[TableShape] = &[TableShape {
    name: "accounts",
    statements: |table, backend| {
        let columns = match backend {
            Backend::Postgres => AccountRecord::column_definitions(),
            Backend::Sqlite => AccountRecord::sqlite_column_definitions(),
        };
        let json = backend.folded_state_type();
        vec![
            // Few rows, each updated by almost every batch.
            format!(
                "CREATE TABLE {table} ({columns}, state {json}, PRIMARY KEY (id)){}",
                backend.table_storage(80)
            ),
            format!("CREATE INDEX {table}_by_owner ON {table} (owner_id, created_position DESC)"),
            format!("CREATE INDEX {table}_by_position ON {table} (created_position DESC)"),
        ]
    },
}];

projection_row! {
    /// An account row as stored (without the folded state it keeps for the next event).
    #[derive(Debug, Clone, PartialEq)]
    pub struct AccountRecord in "accounts" {
        pub id: Uuid => "uuid",
        /// `None` for world accounts.
        pub owner_id: Option<Uuid> => "uuid" fixed,
        /// `customer` or `world`.
        pub kind: String => "text" fixed,
        pub currency: String => "text" fixed,
        pub name: Option<String> => "text",
        pub balance_minor: i64 => "bigint",
        pub held_minor: i64 => "bigint",
        pub pending_credits_minor: i64 => "bigint",
        /// The stream's version; for a world account, the number of legs it received.
        pub version: i64 => "bigint",
        pub created_at: DateTime<Utc> => "timestamptz" fixed,
        pub updated_at: DateTime<Utc> => "timestamptz",
        /// The log ordinal of the account's first event: the keyset of `GET /accounts`.
        pub created_position: i64 => "bigint" fixed,
    }
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

/// The accounts an event changes: a customer account by its own stream's events, a world
/// account by the legs of confirmed transactions (a customer account's leg settles through its
/// own stream, so the fold skips it, and reading its row would be wasted).
fn touched(event: &Decoded<'_>, into: &mut Vec<Uuid>) {
    match &event.event {
        DomainEvent::Account(id, _) => into.push(id.0),
        DomainEvent::Transaction(_, TransactionEvent::TransactionConfirmed { legs, .. }) => {
            into.extend(
                legs.iter()
                    .filter(|leg| leg.is_world())
                    .map(|leg| leg.account_id.0),
            );
        }
        DomainEvent::Transaction(..) => {}
    }
}

impl Model for AccountsModel {
    type Record = AccountRecord;

    async fn load(db: &mut Db<'_>, generation: i32, events: &[Decoded<'_>]) -> Result<Self> {
        let mut ids = Vec::new();
        for event in events {
            touched(event, &mut ids);
        }
        ids.sort_unstable();
        ids.dedup();
        let mut model = AccountsModel::default();
        if ids.is_empty() {
            return Ok(model);
        }
        let table = TABLES[0].table(generation);
        let rows = AccountRecord::load_by_keys(db, &table, "id", &ids, Some("state")).await?;
        for (record, state) in rows {
            let state = state
                .map(|state| serde_json::from_str::<Account>(&state))
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
                let record = record_of(&account, event.sequence(), created_position);
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
                for leg in legs.iter().filter(|leg| leg.is_world()) {
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

    async fn store(&mut self, db: &mut Db<'_>, generation: i32) -> Result<()> {
        let mut rows = Vec::with_capacity(self.dirty.len());
        for id in self.dirty.drain() {
            let Some(row) = self.rows.get(&id) else {
                continue;
            };
            let state = row
                .state
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|error| Error::Job(format!("cannot serialise account {id}: {error}")))?;
            rows.push((&row.record, state));
        }
        AccountRecord::upsert(db, &TABLES[0].table(generation), "id", &rows, Some("state")).await
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

    async fn load_hidden(db: &mut Db<'_>, generation: i32) -> Result<BTreeMap<String, String>> {
        let table = TABLES[0].table(generation);
        let rows = AccountRecord::load_all(db, &table, Some("state")).await?;
        rows.into_iter()
            .filter_map(|(record, state)| Some((record.id, state?)))
            .map(|(id, state)| {
                // Canonical JSON, whatever the database kept of its spacing.
                let state: serde_json::Value = serde_json::from_str(&state).map_err(corrupt)?;
                Ok((format!("state {id}"), state.to_string()))
            })
            .collect()
    }

    fn records(&self) -> BTreeMap<String, AccountRecord> {
        self.rows
            .iter()
            .map(|(id, row)| (id.to_string(), row.record.clone()))
            .collect()
    }

    async fn load_records(
        db: &mut Db<'_>,
        relation: &str,
    ) -> Result<BTreeMap<String, AccountRecord>> {
        Ok(AccountRecord::load_all(db, relation, None)
            .await?
            .into_iter()
            .map(|(record, _)| (record.id.to_string(), record))
            .collect())
    }
}

fn corrupt(error: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "accounts",
        problem: error.to_string(),
    }
}
