//! `GET /api/v1/accounts[/{id}[/balance|/history]]`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use domain::{Currency, format_minor};
use infra::auth::Caller;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{AppState, Reader, WantedPosition, page_and_filters, paged, path_id};
use crate::error::{Error, Result};
use crate::model::accounts::AccountRecord;
use crate::model::timestamp;

/// Formats minor units in the row's currency (a stored code is always a known one; an unknown
/// one would be a corrupt row).
pub fn money(minor: i64, currency: &str) -> Result<String> {
    let currency = Currency::from_code(currency).map_err(|error| Error::CorruptRow {
        table: "accounts",
        problem: error.to_string(),
    })?;
    Ok(format_minor(minor, currency))
}

/// `balance − held`, checked: the operands come from the database, and a corrupt row must be an
/// error, not a wrapped number.
fn available(record: &AccountRecord) -> Result<i64> {
    record
        .balance_minor
        .checked_sub(record.held_minor)
        .ok_or_else(|| Error::CorruptRow {
            table: "accounts",
            problem: format!("balance - held of account {} overflows", record.id),
        })
}

fn view(record: &AccountRecord) -> Result<Value> {
    let currency = record.currency.as_str();
    Ok(json!({
        "id": record.id,
        "owner_id": record.owner_id,
        "currency": currency,
        "name": record.name,
        "balance": money(record.balance_minor, currency)?,
        "available": money(available(record)?, currency)?,
        "held": money(record.held_minor, currency)?,
        "pending_credits": money(record.pending_credits_minor, currency)?,
        // Freezing and closing accounts come later (SPEC §9); every account is active.
        "status": "active",
        "version": record.version,
        "created_at": timestamp(record.created_at),
        "updated_at": timestamp(record.updated_at),
    }))
}

/// The account `id` if the caller may see it; 404 otherwise, whether it is missing or not theirs.
async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<AccountRecord> {
    let reader = Reader::of(caller)?;
    let id = path_id(id, "account")?;
    let record = state.models.account(id).await?;
    record
        .filter(|record| reader.may_see(&[record.owner_id]))
        .ok_or_else(|| Error::NotFound(format!("no account {id}")))
}

pub async fn one(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    Path(id): Path<String>,
) -> Result<(HeaderMap, Json<Value>)> {
    Reader::of(&caller)?;
    let headers = state.positions.reach(&wanted).await?;
    let record = visible(&state, &caller, &id).await?;
    Ok((headers, Json(view(&record)?)))
}

pub async fn balance(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    Path(id): Path<String>,
) -> Result<(HeaderMap, Json<Value>)> {
    Reader::of(&caller)?;
    let headers = state.positions.reach(&wanted).await?;
    let record = visible(&state, &caller, &id).await?;
    let currency = record.currency.as_str();
    Ok((
        headers,
        Json(json!({
            "account_id": record.id,
            "currency": currency,
            "balance": money(record.balance_minor, currency)?,
            "available": money(available(&record)?, currency)?,
        })),
    ))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    query: Query<HashMap<String, String>>,
) -> Result<(HeaderMap, Json<Value>)> {
    let reader = Reader::of(&caller)?;
    let (page, filters) = page_and_filters(query, &["owner_id"])?;
    let owner = filters
        .get("owner_id")
        .map(|text| {
            Uuid::parse_str(text)
                .map_err(|_| Error::bad_request("invalid_owner_id", "owner_id must be a UUID"))
        })
        .transpose()?;
    let owner = match (reader, owner) {
        (Reader::Everything, owner) => owner,
        (Reader::Owner(me), None) => Some(me),
        (Reader::Owner(me), Some(owner)) if owner == me => Some(me),
        (Reader::Owner(_), Some(_)) => {
            return Err(Error::Forbidden(
                "customers list their own accounts only".to_owned(),
            ));
        }
    };
    let headers = state.positions.reach(&wanted).await?;
    let items = state
        .models
        .accounts(owner, page.query())
        .await?
        .iter()
        .map(|record| Ok((record.created_position, view(record)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((headers, Json(paged(items, page.size))))
}

pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    Path(id): Path<String>,
    query: Query<HashMap<String, String>>,
) -> Result<(HeaderMap, Json<Value>)> {
    Reader::of(&caller)?;
    let (page, _) = page_and_filters(query, &[])?;
    let headers = state.positions.reach(&wanted).await?;
    let account = visible(&state, &caller, &id).await?;
    let items = state
        .models
        .history(account.id, page.query())
        .await?
        .iter()
        .map(|record| {
            let currency = record.currency.as_str();
            let item = json!({
                "transaction_id": record.transaction_id,
                "type": record.kind,
                "amount": money(record.amount_minor, currency)?,
                "balance_after": record
                    .balance_after_minor
                    .map(|minor| money(minor, currency))
                    .transpose()?,
                "status": record.status,
                "created_at": timestamp(record.created_at),
            });
            Ok((record.created_position, item))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((headers, Json(paged(items, page.size))))
}
