//! `ledger replay`: folds the log through the domain, in commit order, up to a position or a
//! time, and prints the events of the selected scope with the state each one leaves behind.
//! The whole log up to that point is audited as it is folded (SPEC §8): a stored event that
//! breaks an invariant is printed as a violation and the replay goes on.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use clap::Args;
use domain::audit::Audit;
use domain::{Account, AccountId, Transaction, TransactionId, format_minor};
use infra::eventlog::RecordedEvent as LogEvent;
use infra::log::LogPosition;
use infra::replay::DomainEvent;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Databases;
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    databases: Databases,
    /// Only this transaction: its own events and the account events it caused.
    #[arg(long, conflicts_with = "account")]
    transaction: Option<Uuid>,
    /// Only this account's events.
    #[arg(long)]
    account: Option<Uuid>,
    /// Stop at a log position (as in X-Ledger-Position) or a time
    /// (RFC 3339, e.g. 2026-11-21T12:00:00Z): the log is replayed in its order up to the first
    /// event recorded after that time, so the state shown is a prefix of the log.
    #[arg(long, value_parser = parse_as_of)]
    as_of: Option<AsOf>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum AsOf {
    Position(LogPosition),
    Time(DateTime<Utc>),
}

fn parse_as_of(text: &str) -> std::result::Result<AsOf, String> {
    if let Ok(position) = text.parse::<LogPosition>() {
        return Ok(AsOf::Position(position));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|at| AsOf::Time(at.with_timezone(&Utc)))
        .map_err(|_| {
            format!(
                "{text:?} is neither a log position (as in X-Ledger-Position) nor an RFC 3339 time"
            )
        })
}

struct Replay {
    args_transaction: Option<Uuid>,
    args_account: Option<Uuid>,
    as_of_time: Option<DateTime<Utc>>,
    json: bool,
    audit: Audit,
    unreadable: Vec<domain::audit::Violation>,
    accounts: HashMap<AccountId, Account>,
    transactions: HashMap<TransactionId, Transaction>,
    past_as_of: bool,
    folded: u64,
    printed: u64,
    problems: u64,
}

pub async fn run(args: ReplayArgs) -> Result<bool> {
    let until = match args.as_of {
        Some(AsOf::Position(position)) => Some(position),
        _ => None,
    };
    let mut replay = Replay {
        args_transaction: args.transaction,
        args_account: args.account,
        as_of_time: match args.as_of {
            Some(AsOf::Time(at)) => Some(at),
            _ => None,
        },
        json: args.json,
        audit: Audit::new(),
        unreadable: Vec::new(),
        accounts: HashMap::new(),
        transactions: HashMap::new(),
        past_as_of: false,
        folded: 0,
        printed: 0,
        problems: 0,
    };
    let progress = crate::bar(
        0,
        "replay [{elapsed_precise}] {spinner} {pos} events ({per_sec})",
    );
    let mut each_batch = |events: &[infra::eventlog::RecordedEvent]| {
        for event in events {
            replay.event(event);
        }
        progress.inc(events.len() as u64);
    };
    let read = if let Some(data) = &args.databases.data {
        let log = crate::open_embedded_log(data).await?;
        infra::replay::for_each_committed_in(&log, until, &mut each_batch).await
    } else {
        args.databases.postgres_log_only("replay")?;
        let pool = args.databases.events_pool().await?;
        infra::replay::for_each_committed(
            &pool,
            &args.databases.events_table,
            until,
            &mut each_batch,
        )
        .await
    };
    progress.finish_and_clear();
    read?;
    if replay.printed == 0 && (args.transaction.is_some() || args.account.is_some()) {
        return Err(Error::Usage(
            "no event of that transaction or account in the replayed log".to_owned(),
        ));
    }
    Ok(replay.finish())
}

impl Replay {
    fn selected(&self, decoded: &DomainEvent) -> bool {
        match (self.args_transaction, self.args_account, decoded) {
            (None, None, _) => true,
            (Some(wanted), _, DomainEvent::Transaction(id, _)) => id.0 == wanted,
            (Some(wanted), _, DomainEvent::Account(_, payload)) => {
                payload.transaction_id().is_some_and(|id| id.0 == wanted)
            }
            (None, Some(wanted), DomainEvent::Account(id, _)) => id.0 == wanted,
            (None, Some(_), DomainEvent::Transaction(..)) => false,
        }
    }

    fn event(&mut self, event: &LogEvent) {
        if self.past_as_of || self.as_of_time.is_some_and(|at| event.recorded_at > at) {
            // A prefix of the log: once one event is past the time, so is the rest.
            self.past_as_of = true;
            return;
        }
        self.folded += 1;
        infra::replay::audit_event(&mut self.audit, event, &mut self.unreadable);
        let decoded = match infra::replay::decode(event) {
            Ok(decoded) => decoded,
            Err(problem) => {
                self.problem(event, &format!("unreadable event: {problem}"));
                return;
            }
        };
        let state = match &decoded {
            DomainEvent::Account(id, payload) => {
                let before = self.accounts.get(id).cloned();
                match Account::apply(before, payload) {
                    Ok(account) => {
                        let state = account_state(&account);
                        self.accounts.insert(*id, account);
                        state
                    }
                    Err(violation) => {
                        self.problem(event, &violation.to_string());
                        return;
                    }
                }
            }
            DomainEvent::Transaction(id, payload) => {
                let before = self.transactions.get(id).cloned();
                match Transaction::apply(before, payload) {
                    Ok(transaction) => {
                        let state = transaction_state(&transaction);
                        self.transactions.insert(*id, transaction);
                        state
                    }
                    Err(violation) => {
                        self.problem(event, &violation.to_string());
                        return;
                    }
                }
            }
        };
        if !self.selected(&decoded) {
            return;
        }
        self.printed += 1;
        if self.json {
            println!(
                "{}",
                json!({
                    "position": event.position.to_string(),
                    "recorded_at": event.recorded_at,
                    "stream": event.stream.to_string(),
                    "sequence": event.sequence,
                    "type": event.event_type,
                    "event_version": event.event_version,
                    "correlation_id": event.metadata.correlation_id,
                    "payload": serde_json::from_str::<serde_json::Value>(&event.payload)
                        .unwrap_or_else(|_| serde_json::Value::String(event.payload.clone())),
                    "state_after": state,
                })
            );
        } else {
            println!(
                "{:>14} {} {} #{} {:<20} {}",
                event.position.to_string(),
                event
                    .recorded_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                event.stream,
                event.sequence,
                event.event_type,
                summary(&state),
            );
        }
    }

    fn problem(&mut self, event: &LogEvent, problem: &str) {
        self.problems += 1;
        if self.json {
            println!(
                "{}",
                json!({
                    "violation": problem,
                    "position": event.position.to_string(),
                    "stream": event.stream.to_string(),
                    "sequence": event.sequence,
                })
            );
        } else {
            println!(
                "VIOLATION at {} {} #{}: {problem}",
                event.position, event.stream, event.sequence
            );
        }
    }

    /// Prints the summary and the whole-log findings; true when nothing was wrong.
    fn finish(self) -> bool {
        let mut report = self.audit.finish();
        report.violations.extend(self.unreadable);
        // Violations already printed per event are in the audit too; print the global ones
        // (conservation, legs never applied) that no single event shows.
        let global: Vec<_> = report
            .violations
            .iter()
            .filter(|violation| violation.sequence.is_none())
            .collect();
        let clean = report.violations.is_empty() && self.problems == 0;
        if self.json {
            println!(
                "{}",
                json!({
                    "summary": {
                        "events_folded": self.folded,
                        "events_shown": self.printed,
                        "violations": report.violations.iter().map(|violation| json!({
                            "stream": violation.stream,
                            "sequence": violation.sequence,
                            "problem": violation.problem,
                        })).collect::<Vec<_>>(),
                        "in_flight": report.in_flight.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "transactions_confirmed": report.transactions_confirmed,
                        "transactions_rejected": report.transactions_rejected,
                    }
                })
            );
        } else {
            for violation in global {
                println!("VIOLATION {}: {}", violation.stream, violation.problem);
            }
            println!(
                "replayed {} events ({} shown): {} confirmed, {} rejected, {} in flight, {} violations",
                self.folded,
                self.printed,
                report.transactions_confirmed,
                report.transactions_rejected,
                report.in_flight.len(),
                report.violations.len(),
            );
        }
        clean
    }
}

fn account_state(account: &Account) -> Value {
    let money = |minor| format_minor(minor, account.currency);
    json!({
        "balance": money(account.balance_minor),
        "held": money(account.held_minor),
        "available": money(account.available_minor()),
        "pending_credits": money(account.pending_credits_minor),
        "currency": account.currency.code(),
    })
}

fn transaction_state(transaction: &Transaction) -> Value {
    let request = &transaction.request;
    json!({
        "status": transaction.status().as_str(),
        "type": request.kind.as_str(),
        "amount": request.amount.format(request.currency),
        "currency": request.currency.code(),
        "reason": transaction.rejection_reason().map(|reason| reason.as_str()),
        "settled": transaction.completed,
    })
}

fn summary(state: &Value) -> String {
    match state.as_object() {
        Some(fields) => fields
            .iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(key, value)| match value.as_str() {
                Some(text) => format!("{key}={text}"),
                None => format!("{key}={value}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => state.to_string(),
    }
}
