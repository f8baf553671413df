//! `POST /api/v1/accounts`: open a customer account (SPEC §5).

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::{AccountCommand, AccountError, AccountId, Currency, CustomerId};
use infra::auth::{Caller, Role};
use infra::http::{ApiJson, CorrelationId};
use serde::Deserialize;
use uuid::Uuid;

use super::{AppState, command_headers};
use crate::error::{Error, Result};
use crate::metadata::EventMetadata;
use crate::views::AccountView;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccountBody {
    currency: String,
    #[serde(default)]
    name: Option<String>,
    /// Admins open accounts for others; customers only for themselves.
    #[serde(default)]
    owner_id: Option<Uuid>,
}

pub async fn open_account(
    State(state): State<AppState>,
    caller: Caller,
    Extension(correlation): Extension<CorrelationId>,
    ApiJson(body): ApiJson<OpenAccountBody>,
) -> Result<Response> {
    caller
        .require_any(&[Role::Customer, Role::Admin])
        .map_err(|problem| Error::Forbidden(problem.detail))?;
    let owner = match body.owner_id {
        Some(owner) if owner != caller.subject && !caller.has(Role::Admin) => {
            return Err(Error::Forbidden(
                "only admins open accounts for another owner".to_owned(),
            ));
        }
        Some(owner) => owner,
        None => caller.subject,
    };
    let currency = Currency::from_code(&body.currency)
        .map_err(|error| Error::bad_request("unknown_currency", error.to_string()))?;
    let account_id = AccountId(Uuid::now_v7());
    let command = AccountCommand::Open {
        account_id,
        owner_id: CustomerId(owner),
        currency,
        name: body.name,
        at: Utc::now(),
    };
    let metadata = EventMetadata::for_request(&correlation.0, caller.subject);
    let stream = account_id.to_string();
    let executed = state
        .accounts
        .execute(&stream, command, &metadata.to_map())
        .await?
        .map_err(|refusal| match refusal {
            AccountError::InvalidName => Error::bad_request("invalid_name", refusal.to_string()),
            other => Error::Store {
                context: "opening an account",
                message: other.to_string(),
            },
        })?;
    let account = executed
        .aggregate
        .0
        .as_ref()
        .expect("an opened account has state");
    let position = state
        .accounts
        .position_of(&stream, executed.version)
        .await?;
    tracing::info!(account_id = %account_id, currency = %currency, "account opened");
    Ok((
        StatusCode::CREATED,
        command_headers(&format!("/api/v1/accounts/{account_id}"), position),
        axum::Json(AccountView::new(account, executed.version)),
    )
        .into_response())
}
