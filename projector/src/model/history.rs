//! The `account_history` projection: one row per transaction touching a customer account, with
//! the signed amount from the account's side, the transaction's status, and the account's
//! posted balance right after the transaction settled on it (SPEC §5's history). World accounts
//! get no history: every deposit would be a row there, and nobody reads them as a statement.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{AccountEvent, TransactionEvent, TransactionStatus};
use infra::error::DatabaseContext;
use infra::replay::DomainEvent;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{Decoded, Model, TableShape, unprojectable};
use crate::error::{Error, Result};

pub const TABLES: &[TableShape] = &[TableShape {
    name: "account_history",
    ddl: "CREATE TABLE {t} (
        account_id          uuid        NOT NULL,
        transaction_id      uuid        NOT NULL,
        kind                text        NOT NULL,
        amount_minor        bigint      NOT NULL,
        currency            text        NOT NULL,
        balance_after_minor bigint,
        status              text        NOT NULL,
        created_at          timestamptz NOT NULL,
        created_position    bigint      NOT NULL,
        PRIMARY KEY (account_id, transaction_id)
    );
    CREATE INDEX {t}_by_account ON {t} (account_id, created_position DESC);
    CREATE INDEX {t}_by_transaction ON {t} (transaction_id)",
}];

/// One history row.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRecord {
    pub account_id: Uuid,
    pub transaction_id: Uuid,
    pub kind: String,
    /// Negative when the account pays, positive when it receives.
    pub amount_minor: i64,
    pub currency: String,
    /// The account's posted balance once this transaction settled on it; `None` until then
    /// (and for ever, if it was rejected).
    pub balance_after_minor: Option<i64>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub created_position: i64,
}

#[derive(Default)]
pub struct HistoryModel {
    rows: HashMap<(Uuid, Uuid), HistoryRecord>,
    /// The accounts each transaction touches.
    accounts_of: HashMap<Uuid, Vec<Uuid>>,
    dirty: HashSet<(Uuid, Uuid)>,
}

impl HistoryModel {
    fn insert(&mut self, record: HistoryRecord) {
        let key = (record.account_id, record.transaction_id);
        let accounts = self.accounts_of.entry(record.transaction_id).or_default();
        if !accounts.contains(&record.account_id) {
            accounts.push(record.account_id);
        }
        self.rows.insert(key, record);
    }
}

/// The transaction an event is about, if any.
fn transaction_of(event: &Decoded<'_>) -> Option<Uuid> {
    match &event.event {
        DomainEvent::Transaction(id, _) => Some(id.0),
        DomainEvent::Account(_, payload) => payload.transaction_id().map(|id| id.0),
    }
}

impl Model for HistoryModel {
    type Record = HistoryRecord;

    async fn load(
        connection: &mut PgConnection,
        generation: i32,
        events: &[Decoded<'_>],
    ) -> Result<Self> {
        let mut ids: Vec<Uuid> = events.iter().filter_map(transaction_of).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut model = HistoryModel::default();
        if ids.is_empty() {
            return Ok(model);
        }
        let table = TABLES[0].table(generation);
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {table} WHERE transaction_id = ANY($1)"
        ))
        .bind(&ids)
        .fetch_all(connection)
        .await
        .context("loading history rows")?;
        for row in &rows {
            model.insert(decode(row)?);
        }
        Ok(model)
    }

    fn fold(&mut self, event: &Decoded<'_>) -> Result<()> {
        match &event.event {
            DomainEvent::Transaction(
                id,
                TransactionEvent::TransactionCreated {
                    request,
                    created_at,
                    ..
                },
            ) => {
                let amount = request.amount.minor();
                let sides = [
                    (request.source_account_id, -amount),
                    (request.destination_account_id, amount),
                ];
                for (account, amount_minor) in sides {
                    let Some(account) = account else { continue };
                    let key = (account.0, id.0);
                    if self.rows.contains_key(&key) {
                        continue;
                    }
                    self.insert(HistoryRecord {
                        account_id: account.0,
                        transaction_id: id.0,
                        kind: request.kind.as_str().to_owned(),
                        amount_minor,
                        currency: request.currency.code().to_owned(),
                        balance_after_minor: None,
                        status: TransactionStatus::Pending.as_str().to_owned(),
                        created_at: created_at.trunc_subsecs(6),
                        created_position: event.ordinal,
                    });
                    self.dirty.insert(key);
                }
            }
            DomainEvent::Transaction(id, payload) => {
                let status = match payload {
                    TransactionEvent::TransactionConfirmed { .. } => TransactionStatus::Confirmed,
                    TransactionEvent::TransactionRejected { .. } => TransactionStatus::Rejected,
                    _ => return Ok(()),
                };
                let accounts = self.accounts_of.get(&id.0).cloned().unwrap_or_default();
                if accounts.is_empty() {
                    return Err(unprojectable(
                        event.log,
                        "the transaction ends but was never created",
                    ));
                }
                for account in accounts {
                    if let Some(row) = self.rows.get_mut(&(account, id.0)) {
                        row.status = status.as_str().to_owned();
                        self.dirty.insert((account, id.0));
                    }
                }
            }
            DomainEvent::Account(account, payload) => {
                let (transaction, balance_after) = match payload {
                    AccountEvent::HoldSettled {
                        transaction_id,
                        balance_after_minor,
                        ..
                    }
                    | AccountEvent::CreditPosted {
                        transaction_id,
                        balance_after_minor,
                        ..
                    } => (transaction_id.0, *balance_after_minor),
                    _ => return Ok(()),
                };
                let key = (account.0, transaction);
                let row = self.rows.get_mut(&key).ok_or_else(|| {
                    unprojectable(
                        event.log,
                        format!("settles transaction {transaction}, which names another account"),
                    )
                })?;
                row.balance_after_minor = Some(balance_after);
                self.dirty.insert(key);
            }
        }
        Ok(())
    }

    async fn store(&mut self, connection: &mut PgConnection, generation: i32) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut columns = Columns::default();
        for key in self.dirty.drain() {
            if let Some(record) = self.rows.get(&key) {
                columns.push(record);
            }
        }
        let table = TABLES[0].table(generation);
        sqlx::query(&format!(
            "INSERT INTO {table} ({COLUMNS})
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::text[],
                 $6::bigint[], $7::text[], $8::timestamptz[], $9::bigint[])
             ON CONFLICT (account_id, transaction_id) DO UPDATE SET
                 kind = EXCLUDED.kind, amount_minor = EXCLUDED.amount_minor,
                 currency = EXCLUDED.currency,
                 balance_after_minor = EXCLUDED.balance_after_minor,
                 status = EXCLUDED.status, created_at = EXCLUDED.created_at,
                 created_position = EXCLUDED.created_position"
        ))
        .bind(columns.account_id)
        .bind(columns.transaction_id)
        .bind(columns.kind)
        .bind(columns.amount_minor)
        .bind(columns.currency)
        .bind(columns.balance_after_minor)
        .bind(columns.status)
        .bind(columns.created_at)
        .bind(columns.created_position)
        .execute(connection)
        .await
        .context("storing history rows")?;
        Ok(())
    }

    fn records(&self) -> BTreeMap<String, HistoryRecord> {
        self.rows
            .iter()
            .map(|((account, transaction), row)| (format!("{account}/{transaction}"), row.clone()))
            .collect()
    }

    async fn load_records(
        connection: &mut PgConnection,
        relation: &str,
    ) -> Result<BTreeMap<String, HistoryRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM {relation}"))
            .fetch_all(connection)
            .await
            .context("reading history rows")?;
        rows.iter()
            .map(|row| {
                decode(row).map(|record| {
                    (
                        format!("{}/{}", record.account_id, record.transaction_id),
                        record,
                    )
                })
            })
            .collect()
    }
}

/// The stored columns, in the order of [`decode`] and the UNNEST of `store`.
pub const COLUMNS: &str = "account_id, transaction_id, kind, amount_minor, currency, \
     balance_after_minor, status, created_at, created_position";

fn corrupt(error: impl std::fmt::Display) -> Error {
    Error::CorruptRow {
        table: "account_history",
        problem: error.to_string(),
    }
}

/// Reads a row selected with [`COLUMNS`].
pub fn decode(row: &sqlx::postgres::PgRow) -> Result<HistoryRecord> {
    Ok(HistoryRecord {
        account_id: row.try_get("account_id").map_err(corrupt)?,
        transaction_id: row.try_get("transaction_id").map_err(corrupt)?,
        kind: row.try_get("kind").map_err(corrupt)?,
        amount_minor: row.try_get("amount_minor").map_err(corrupt)?,
        currency: row.try_get("currency").map_err(corrupt)?,
        balance_after_minor: row.try_get("balance_after_minor").map_err(corrupt)?,
        status: row.try_get("status").map_err(corrupt)?,
        created_at: row.try_get("created_at").map_err(corrupt)?,
        created_position: row.try_get("created_position").map_err(corrupt)?,
    })
}

#[derive(Default)]
struct Columns {
    account_id: Vec<Uuid>,
    transaction_id: Vec<Uuid>,
    kind: Vec<String>,
    amount_minor: Vec<i64>,
    currency: Vec<String>,
    balance_after_minor: Vec<Option<i64>>,
    status: Vec<String>,
    created_at: Vec<DateTime<Utc>>,
    created_position: Vec<i64>,
}

impl Columns {
    fn push(&mut self, record: &HistoryRecord) {
        self.account_id.push(record.account_id);
        self.transaction_id.push(record.transaction_id);
        self.kind.push(record.kind.clone());
        self.amount_minor.push(record.amount_minor);
        self.currency.push(record.currency.clone());
        self.balance_after_minor.push(record.balance_after_minor);
        self.status.push(record.status.clone());
        self.created_at.push(record.created_at);
        self.created_position.push(record.created_position);
    }
}
