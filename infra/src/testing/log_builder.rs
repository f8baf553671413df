//! A large, domain-valid event log built in memory and loaded in bulk straight into the event
//! store, for benchmarks of whatever reads the log (rebuilds, `verify`). Seeding a million
//! events through HTTP takes many minutes on two cores (NOTES); this takes seconds.
//!
//! Every event comes out of the domain's own `decide`/`apply` and the saga's command lists, in
//! the order command-api would write them: accounts are opened, each gets a large deposit, then
//! transfers move between them, each carried through reservation, an approving fraud decision,
//! confirmation and settlement. So the log passes `ledger verify` like one the services wrote.
//!
//! The loader writes the event table's own columns with one multi-row INSERT per chunk; the
//! columns with defaults (event id, time, inserting transaction, position) are filled by the
//! database as for any append. When the log's layout changes, this is the one place to adapt.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use domain::{
    Account, AccountCommand, AccountId, Amount, Currency, CustomerId, FraudDecision, FraudOutcome,
    Transaction, TransactionCommand, TransactionId, TransactionKind, TransactionRequest,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{DatabaseContext, Result};

/// Events per INSERT: one statement of this many rows is a few megabytes of parameters, well
/// under PostgreSQL's limits, and large enough that the round trips do not matter.
const INSERT_CHUNK: usize = 5_000;

/// What each account is funded with before the transfers, in minor units (10,000,000.00):
/// far more than the transfers below can take out of any account (see [`TRANSFER_MINOR_MAX`]).
const DEPOSIT_MINOR: i64 = 1_000_000_000;

/// The largest transfer, in minor units (100.00). A million-event log holds about 110,000
/// transfers; spread over even a few hundred accounts no account sends more than a few
/// thousand, far below [`DEPOSIT_MINOR`], so the domain never refuses one.
const TRANSFER_MINOR_MAX: usize = 10_000;

/// One event row as the event store holds it (the columns without defaults).
pub struct Row {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: &'static str,
    pub payload: Value,
}

/// Generates a domain-valid log: every event comes out of the domain's `decide`.
pub struct LogBuilder {
    /// The events, in the order they are inserted.
    pub rows: Vec<Row>,
    /// Every account's state and last sequence, to decide its next command.
    accounts: HashMap<AccountId, (Account, i64)>,
    /// The metadata every event carries.
    pub metadata: Value,
    /// The clock of the generated events: a day ago, ten microseconds per step.
    at: DateTime<Utc>,
}

impl Default for LogBuilder {
    fn default() -> Self {
        LogBuilder::new()
    }
}

impl LogBuilder {
    pub fn new() -> Self {
        LogBuilder {
            rows: Vec::new(),
            accounts: HashMap::new(),
            metadata: json!({"correlation_id": "bench", "actor": "bench"}),
            at: Utc::now() - TimeDelta::days(1),
        }
    }

    fn tick(&mut self) -> DateTime<Utc> {
        self.at += TimeDelta::microseconds(10);
        self.at
    }

    /// Decides `command` on account `id` and records its events.
    ///
    /// # Panics
    /// When the domain refuses the command: the generator only issues commands it has made
    /// valid (funded accounts, bounded amounts), so a refusal is a bug in the generator.
    pub fn account(&mut self, id: AccountId, command: AccountCommand) {
        let (state, sequence) = self
            .accounts
            .remove(&id)
            .map_or((None, 0), |(account, sequence)| (Some(account), sequence));
        let events = Account::decide(state.as_ref(), &command)
            .unwrap_or_else(|error| panic!("the generator issued a refused command: {error}"));
        let mut state = state;
        let mut sequence = sequence;
        for event in events {
            state = Some(
                Account::apply(state, &event)
                    .unwrap_or_else(|error| panic!("a decided event does not apply: {error}")),
            );
            sequence += 1;
            self.rows.push(Row {
                aggregate_type: "account",
                aggregate_id: id.to_string(),
                sequence,
                event_type: event.event_type(),
                payload: serde_json::to_value(&event)
                    .expect("events serialise: they have no maps with non-string keys"),
            });
        }
        if let Some(state) = state {
            self.accounts.insert(id, (state, sequence));
        }
    }

    fn transaction_step(
        &mut self,
        id: TransactionId,
        state: &mut Option<Transaction>,
        sequence: &mut i64,
        command: TransactionCommand,
    ) {
        let events = Transaction::decide(state.as_ref(), &command)
            .unwrap_or_else(|error| panic!("the generator issued a refused command: {error}"));
        for event in events {
            *state = Some(
                Transaction::apply(state.take(), &event)
                    .unwrap_or_else(|error| panic!("a decided event does not apply: {error}")),
            );
            *sequence += 1;
            self.rows.push(Row {
                aggregate_type: "transaction",
                aggregate_id: id.to_string(),
                sequence: *sequence,
                event_type: event.event_type(),
                payload: serde_json::to_value(&event)
                    .expect("events serialise: they have no maps with non-string keys"),
            });
        }
    }

    /// Carries one transaction the whole way: created, reserved, approved, confirmed, settled.
    ///
    /// # Panics
    /// As [`LogBuilder::account`], when the domain refuses a step.
    pub fn transaction(&mut self, request: TransactionRequest) {
        let id = TransactionId(Uuid::new_v4());
        let mut state: Option<Transaction> = None;
        let mut sequence = 0;
        let at = self.tick();
        let create = TransactionCommand::Create {
            transaction_id: id,
            request,
            initiated_by: CustomerId(Uuid::new_v4()),
            at,
        };
        self.transaction_step(id, &mut state, &mut sequence, create);
        let created = state.clone().expect("a created transaction has state");
        let at = self.tick();
        for (account, command) in domain::saga::reservation_commands(&created, at) {
            self.account(account, command);
        }
        let at = self.tick();
        let reserved = TransactionCommand::RecordReservation { at };
        self.transaction_step(id, &mut state, &mut sequence, reserved);
        let at = self.tick();
        let approved = TransactionCommand::RecordFraudDecision {
            decision: FraudDecision {
                outcome: FraudOutcome::Approved,
                rule: None,
                details: json!({}).into(),
            },
            at,
        };
        self.transaction_step(id, &mut state, &mut sequence, approved);
        let at = self.tick();
        let confirm = TransactionCommand::Confirm { at };
        self.transaction_step(id, &mut state, &mut sequence, confirm);
        let confirmed = state.clone().expect("a confirmed transaction has state");
        let at = self.tick();
        for (account, command) in domain::saga::settlement_commands(&confirmed, at) {
            self.account(account, command);
        }
        let at = self.tick();
        let complete = TransactionCommand::CompleteSettlement { at };
        self.transaction_step(id, &mut state, &mut sequence, complete);
    }
}

/// Builds at least `events` events: `accounts` accounts (at least two), a large deposit into
/// each, then transfers between them.
///
/// # Panics
/// With fewer than two accounts, or when the domain refuses a generated command (a bug here).
pub fn build_log(events: usize, accounts: usize) -> LogBuilder {
    assert!(accounts >= 2, "transfers need two accounts");
    let mut builder = LogBuilder::new();
    let currency = Currency::from_code("USD").expect("USD is an ISO 4217 currency");
    let ids: Vec<AccountId> = (0..accounts).map(|_| AccountId(Uuid::new_v4())).collect();
    for id in &ids {
        let at = builder.tick();
        let open = AccountCommand::Open {
            account_id: *id,
            owner_id: CustomerId(Uuid::new_v4()),
            currency,
            name: None,
            at,
        };
        builder.account(*id, open);
    }
    let deposit = Amount::from_minor(DEPOSIT_MINOR).expect("the deposit is a valid amount");
    for id in &ids {
        let request = TransactionRequest::new(
            TransactionKind::Deposit,
            deposit,
            currency,
            None,
            Some(*id),
            None,
        )
        .expect("a deposit into an open account is a valid request");
        builder.transaction(request);
    }
    let mut n: usize = 0;
    while builder.rows.len() < events {
        n += 1;
        let source = ids[n % accounts];
        let destination = ids[(n * 7 + 1) % accounts];
        if source == destination {
            continue;
        }
        let minor = i64::try_from(n % TRANSFER_MINOR_MAX + 1)
            .expect("the amount is below TRANSFER_MINOR_MAX");
        let amount = Amount::from_minor(minor).expect("a positive amount is valid");
        let request = TransactionRequest::new(
            TransactionKind::Transfer,
            amount,
            currency,
            Some(source),
            Some(destination),
            None,
        )
        .expect("a transfer between two distinct accounts is a valid request");
        builder.transaction(request);
    }
    builder
}

/// Inserts the builder's events into `events_table` (schema-qualified, e.g.
/// `command_api.events`; a trusted name, spliced into the SQL) in chunks of [`INSERT_CHUNK`].
pub async fn insert_log(pool: &PgPool, events_table: &str, builder: &LogBuilder) -> Result<()> {
    let statement = format!(
        "INSERT INTO {events_table}
             (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                              $6::jsonb[], $7::jsonb[])"
    );
    for chunk in builder.rows.chunks(INSERT_CHUNK) {
        let types: Vec<&str> = chunk.iter().map(|row| row.aggregate_type).collect();
        let ids: Vec<&str> = chunk.iter().map(|row| row.aggregate_id.as_str()).collect();
        let sequences: Vec<i64> = chunk.iter().map(|row| row.sequence).collect();
        let event_types: Vec<&str> = chunk.iter().map(|row| row.event_type).collect();
        let versions: Vec<&str> = chunk.iter().map(|_| "1").collect();
        let payloads: Vec<&Value> = chunk.iter().map(|row| &row.payload).collect();
        let metadata: Vec<&Value> = chunk.iter().map(|_| &builder.metadata).collect();
        sqlx::query(&statement)
            .bind(types)
            .bind(ids)
            .bind(sequences)
            .bind(event_types)
            .bind(versions)
            .bind(payloads)
            .bind(metadata)
            .execute(pool)
            .await
            .context("inserting generated events")?;
    }
    Ok(())
}
