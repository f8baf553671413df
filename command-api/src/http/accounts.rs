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

use super::{AppState, command_headers, reject_control};
use crate::error::{Error, Result};
use crate::metadata;
use crate::store::Executed;
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
    reject_control("name", "invalid_name", body.name.as_deref())?;
    let account_id = AccountId(Uuid::now_v7());
    let command = AccountCommand::Open {
        account_id,
        owner_id: CustomerId(owner),
        currency,
        name: body.name,
        at: Utc::now(),
    };
    // The account id is new, so is the command: nothing to recognise a retry by.
    let metadata =
        metadata::for_request(&correlation.0, caller.subject, format!("open/{account_id}"));
    let stream = account_id.to_string();
    let executed = state
        .accounts
        .execute_new(&stream, command, &metadata)
        .await?;
    let (account, version, position) = match executed {
        Executed::Appended {
            state: account,
            version,
            position,
            ..
        } => (account, version, position),
        Executed::Refused(AccountError::InvalidName) => {
            return Err(Error::bad_request(
                "invalid_name",
                AccountError::InvalidName.to_string(),
            ));
        }
        Executed::Refused(other) => {
            return Err(Error::Store {
                context: "opening an account",
                message: other.to_string(),
            });
        }
        Executed::Unchanged { .. } => {
            return Err(Error::Store {
                context: "opening an account",
                message: format!("account {account_id} already existed"),
            });
        }
    };
    let account = account.0.as_ref().expect("an opened account has state");
    tracing::debug!(account_id = %account_id, currency = %currency, "account opened");
    Ok((
        StatusCode::CREATED,
        command_headers(&format!("/api/v1/accounts/{account_id}"), position),
        axum::Json(AccountView::new(account, version)),
    )
        .into_response())
}
