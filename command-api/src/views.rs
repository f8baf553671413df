//! The JSON shapes of accounts and transactions as SPEC §5 shows them. Command responses use
//! them so that a client sees the same shape from a POST as from the later GET.

use chrono::{DateTime, SecondsFormat, Utc};
use domain::{Account, Transaction, format_minor};
use serde::Serialize;
use serde_json::{Value, json};

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An account as `GET /api/v1/accounts/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct AccountView {
    pub id: String,
    pub owner_id: String,
    pub currency: String,
    pub name: Option<String>,
    pub balance: String,
    pub available: String,
    pub held: String,
    pub pending_credits: String,
    pub status: &'static str,
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
}

impl AccountView {
    pub fn new(account: &Account, version: u64) -> Self {
        let money = |minor| format_minor(minor, account.currency);
        AccountView {
            id: account.id.to_string(),
            owner_id: account.owner_id.to_string(),
            currency: account.currency.code().to_owned(),
            name: account.name.clone(),
            balance: money(account.balance_minor),
            available: money(account.available_minor()),
            held: money(account.held_minor),
            pending_credits: money(account.pending_credits_minor),
            // Freezing and closing accounts come later (SPEC §9); every account is active.
            status: "active",
            version,
            created_at: timestamp(account.opened_at),
            updated_at: timestamp(account.updated_at),
        }
    }
}

/// A transaction as `GET /api/v1/transactions/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct TransactionView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub amount: String,
    pub currency: String,
    pub source_account_id: Option<String>,
    pub destination_account_id: Option<String>,
    pub description: Option<String>,
    pub reason: Option<&'static str>,
    pub fraud: Option<Value>,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
}

impl TransactionView {
    pub fn new(transaction: &Transaction, version: u64) -> Self {
        let request = &transaction.request;
        TransactionView {
            id: transaction.id.to_string(),
            kind: request.kind.as_str(),
            status: transaction.status().as_str(),
            amount: request.amount.format(request.currency),
            currency: request.currency.code().to_owned(),
            source_account_id: request.source_account_id.map(|id| id.to_string()),
            destination_account_id: request.destination_account_id.map(|id| id.to_string()),
            description: request.description.clone(),
            reason: transaction.rejection_reason().map(|reason| reason.as_str()),
            fraud: transaction
                .fraud
                .as_ref()
                .map(|decision| json!({ "outcome": decision.outcome, "rule": decision.rule })),
            created_at: timestamp(transaction.created_at),
            updated_at: timestamp(transaction.updated_at),
            version,
        }
    }
}
