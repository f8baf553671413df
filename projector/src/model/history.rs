//! The `account_history` projection: one row per transaction touching a customer account, with
//! the signed amount from the account's side, the transaction's status, and the account's
//! posted balance right after the transaction settled on it (SPEC §5's history). World accounts
//! get no history: every deposit would be a row there, and nobody reads them as a statement.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use domain::{AccountEvent, TransactionEvent, TransactionStatus};
use infra::codec::DomainEvent;
use uuid::Uuid;

use super::row::projection_row;
use super::{Backend, Db, Decoded, Model, TableShape, first_transaction_sequences, unprojectable};
use crate::error::Result;

pub const TABLES: &[TableShape] = &[TableShape {
    name: "account_history",
    statements: |table, backend| {
        let columns = match backend {
            Backend::Postgres => HistoryRecord::column_definitions(),
            Backend::Sqlite => HistoryRecord::sqlite_column_definitions(),
        };
        vec![
            // Rows of about 130 bytes, each updated once or twice after its insert.
            format!(
                "CREATE TABLE {table} ({columns}, PRIMARY KEY (account_id, transaction_id)){}",
                backend.table_storage(80)
            ),
            format!(
                "CREATE INDEX {table}_by_account ON {table} (account_id, created_position DESC)"
            ),
            format!("CREATE INDEX {table}_by_transaction ON {table} (transaction_id)"),
        ]
    },
}];

projection_row! {
    /// One history row.
    #[derive(Debug, Clone, PartialEq)]
    pub struct HistoryRecord in "account_history" {
        pub account_id: Uuid => "uuid",
        pub transaction_id: Uuid => "uuid",
        pub kind: String => "text" fixed,
        /// Negative when the account pays, positive when it receives.
        pub amount_minor: i64 => "bigint" fixed,
        pub currency: String => "text" fixed,
        /// The account's posted balance once this transaction settled on it; `None` until then
        /// (and for ever, if it was rejected).
        pub balance_after_minor: Option<i64> => "bigint",
        pub status: String => "text",
        pub created_at: DateTime<Utc> => "timestamptz" fixed,
        pub created_position: i64 => "bigint" fixed,
    }
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

    async fn load(db: &mut Db<'_>, generation: i32, events: &[Decoded<'_>]) -> Result<Self> {
        // Not the rows of a transaction created in this batch: it has none yet.
        let first = first_transaction_sequences(events);
        let mut ids: Vec<Uuid> = events
            .iter()
            .filter_map(transaction_of)
            .filter(|id| first.get(id).is_none_or(|&sequence| sequence > 1))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut model = HistoryModel::default();
        if ids.is_empty() {
            return Ok(model);
        }
        let table = TABLES[0].table(generation);
        let rows = HistoryRecord::load_by_keys(db, &table, "transaction_id", &ids, None).await?;
        for (record, _) in rows {
            model.insert(record);
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

    async fn store(&mut self, db: &mut Db<'_>, generation: i32) -> Result<()> {
        let rows: Vec<(&HistoryRecord, Option<String>)> = self
            .dirty
            .drain()
            .filter_map(|key| self.rows.get(&key).map(|record| (record, None)))
            .collect();
        HistoryRecord::upsert(
            db,
            &TABLES[0].table(generation),
            "account_id, transaction_id",
            &rows,
            None,
        )
        .await
    }

    fn records(&self) -> BTreeMap<String, HistoryRecord> {
        self.rows
            .iter()
            .map(|((account, transaction), row)| (format!("{account}/{transaction}"), row.clone()))
            .collect()
    }

    async fn load_records(
        db: &mut Db<'_>,
        relation: &str,
    ) -> Result<BTreeMap<String, HistoryRecord>> {
        Ok(HistoryRecord::load_all(db, relation, None)
            .await?
            .into_iter()
            .map(|(record, _)| {
                (
                    format!("{}/{}", record.account_id, record.transaction_id),
                    record,
                )
            })
            .collect())
    }
}
