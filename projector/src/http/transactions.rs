//! `GET /api/v1/transactions[/{id}[/events]]`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use infra::auth::Caller;
use serde_json::{Value, json};
use uuid::Uuid;

use super::accounts::money;
use super::{AppState, Reader, WantedPosition, audit, page_and_filters, paged, path_id};
use crate::cache::Lookup;
use crate::error::{Error, Result};
use crate::model::timestamp;
use crate::model::transactions::TransactionRecord;
use crate::store::TransactionScope;

const CACHE_HEADER: HeaderName = HeaderName::from_static("x-cache");

/// A transaction as SPEC §5 shows it (the same shape command-api answers a POST with).
pub fn view(record: &TransactionRecord) -> Result<Value> {
    Ok(json!({
        "id": record.id,
        "type": record.kind,
        "status": record.status,
        "amount": money(record.amount_minor, &record.currency)?,
        "currency": record.currency,
        "source_account_id": record.source_account_id,
        "destination_account_id": record.destination_account_id,
        "description": record.description,
        "reason": record.reason,
        "fraud": record.fraud,
        "created_at": timestamp(record.created_at),
        "updated_at": timestamp(record.updated_at),
        "version": record.version,
    }))
}

async fn from_database(state: &AppState, id: Uuid) -> Result<Option<TransactionRecord>> {
    state.models.transaction(id).await
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("no transaction {id}"))
}

fn visible(reader: Reader, record: &TransactionRecord) -> bool {
    reader.may_see(&[record.source_owner_id, record.destination_owner_id])
}

pub async fn one(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    Path(id): Path<String>,
) -> Result<(HeaderMap, Json<Value>)> {
    let reader = Reader::of(&caller)?;
    let id = path_id(&id, "transaction")?;
    let mut headers = state.positions.reach(&wanted).await?;
    let lookup = match &state.cache {
        Some(cache) => cache.get(id).await,
        None => Lookup::Unavailable,
    };
    let (record, hit) = match lookup {
        Lookup::Hit(record) => (*record, true),
        Lookup::Miss => {
            let record = from_database(&state, id)
                .await?
                .ok_or_else(|| not_found(id))?;
            if let Some(cache) = &state.cache {
                cache.refill(&record).await;
            }
            (record, false)
        }
        Lookup::Unavailable => {
            let record = from_database(&state, id)
                .await?
                .ok_or_else(|| not_found(id))?;
            (record, false)
        }
    };
    metrics::counter!("cache_lookups_total", "result" => if hit { "hit" } else { "miss" })
        .increment(1);
    // Authorization on a hit too: the cached row carries both owners.
    if !visible(reader, &record) {
        return Err(not_found(id));
    }
    headers.insert(
        CACHE_HEADER,
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    Ok((headers, Json(view(&record)?)))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    query: Query<HashMap<String, String>>,
) -> Result<(HeaderMap, Json<Value>)> {
    let reader = Reader::of(&caller)?;
    let (page, filters) = page_and_filters(query, &["account_id", "status"])?;
    let status = filters
        .get("status")
        .map(|text| {
            let upper = text.to_ascii_uppercase();
            ["PENDING", "CONFIRMED", "REJECTED"]
                .contains(&upper.as_str())
                .then_some(upper)
                .ok_or_else(|| {
                    Error::bad_request(
                        "invalid_status",
                        "status must be PENDING, CONFIRMED or REJECTED",
                    )
                })
        })
        .transpose()?;
    let account = filters
        .get("account_id")
        .map(|text| {
            Uuid::parse_str(text)
                .map_err(|_| Error::bad_request("invalid_account_id", "account_id must be a UUID"))
        })
        .transpose()?;
    let headers = state.positions.reach(&wanted).await?;
    if let (Some(account), Reader::Owner(me)) = (account, reader) {
        let owner = state
            .models
            .account(account)
            .await?
            .and_then(|record| record.owner_id);
        if owner != Some(me) {
            return Err(Error::NotFound(format!("no account {account}")));
        }
    }
    let scope = match (account, reader) {
        (Some(account), _) => TransactionScope::Account(account),
        (None, Reader::Owner(me)) => TransactionScope::Owner(me),
        (None, Reader::Everything) => TransactionScope::All,
    };
    let items = state
        .models
        .transactions(scope, status.as_deref(), page.query())
        .await?
        .iter()
        .map(|record| Ok((record.created_position, view(record)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((headers, Json(paged(items, page.size))))
}

/// The audit trail: every event of the transaction's stream, as stored for admins and
/// auditors, and reduced to the caller's own side for a customer party (`super::audit`).
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    wanted: WantedPosition,
    Path(id): Path<String>,
) -> Result<(HeaderMap, Json<Value>)> {
    let reader = Reader::of_audit_trail(&caller)?;
    let id = path_id(&id, "transaction")?;
    let headers = state.positions.reach(&wanted).await?;
    let record = from_database(&state, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    if !visible(reader, &record) {
        return Err(not_found(id));
    }
    let items: Vec<Value> = state
        .trail
        .transaction_events(id)
        .await?
        .into_iter()
        .map(|event| {
            let (payload, metadata) = match reader {
                Reader::Everything => (event.payload, event.metadata),
                Reader::Owner(me) => audit::customer_view(
                    me,
                    &record,
                    &event.event_type,
                    &event.payload,
                    &event.metadata,
                ),
            };
            json!({
                "sequence": event.sequence,
                "type": event.event_type,
                "event_version": event.event_version,
                "event_id": event.event_id,
                "recorded_at": timestamp(event.recorded_at),
                "payload": payload,
                "metadata": metadata,
            })
        })
        .collect();
    Ok((
        headers,
        Json(json!({ "transaction_id": id, "items": items })),
    ))
}
