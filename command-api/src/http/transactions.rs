//! `POST /api/v1/transactions`: accept a deposit, withdrawal or transfer (SPEC §5).
//!
//! The request only appends `TransactionCreated`; the saga does the rest from the log. The
//! transaction id is derived from the caller and the `Idempotency-Key`, so the stream's first
//! event is the idempotency lock: the same key and body again is a replay (200, no new event),
//! another body under the same key is refused (422), and of concurrent identical requests one
//! appends and the others replay.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use domain::{
    Account, AccountId, Amount, Currency, CustomerId, Transaction, TransactionCommand,
    TransactionError, TransactionId, TransactionKind, TransactionRequest,
};
use infra::auth::{Caller, Role};
use infra::http::{ApiJson, CorrelationId};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{AppState, command_headers, reject_nul};
use crate::error::{Error, Result};
use crate::metadata;
use crate::store::Executed;
use crate::views::TransactionView;

/// Longest accepted idempotency key, in bytes (Stripe's bound).
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The body, flat and strict: `amount` stays raw JSON text so that a JSON number is parsed from
/// its digits, never through a float (NOTES).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTransactionBody {
    #[serde(rename = "type")]
    kind: String,
    amount: Box<RawValue>,
    currency: String,
    #[serde(default)]
    source_account_id: Option<Uuid>,
    #[serde(default)]
    destination_account_id: Option<Uuid>,
    #[serde(default)]
    description: Option<String>,
}

pub async fn create_transaction(
    State(state): State<AppState>,
    caller: Caller,
    Extension(correlation): Extension<CorrelationId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateTransactionBody>,
) -> Result<Response> {
    caller
        .require_any(&[Role::Customer, Role::Operator, Role::Admin])
        .map_err(|problem| Error::Forbidden(problem.detail))?;
    let key = idempotency_key(&headers)?;
    let request = parse_request(body)?;
    let reach = reach(&caller, request.kind, state.customer_top_ups)?;
    let transaction_id = TransactionId::from_idempotency_key(CustomerId(caller.subject), key);
    let stream = transaction_id.to_string();

    if let Err(refused) = check_accounts(&state, reach, CustomerId(caller.subject), &request).await
    {
        // A key seen before is answered from its stream whatever the accounts say now: the
        // first request was checked when it was accepted.
        let (existing, version) = state.transactions.load_fresh(&stream).await?;
        return match existing.0 {
            Some(transaction) => replay(&state, &transaction, version, &request).await,
            None => Err(refused),
        };
    }
    // The command id names the request (its transaction and body), so a retry of a request
    // whose answer was lost appends the same event ids and is recognised as a replay.
    let metadata = metadata::for_request(
        &correlation.0,
        caller.subject,
        format!("create/{transaction_id}/{}", request.fingerprint()),
    );
    let command = TransactionCommand::Create {
        transaction_id,
        request: request.clone(),
        initiated_by: CustomerId(caller.subject),
        at: Utc::now(),
    };
    // Assumed new: a key seen before makes the append conflict, and the stream is read then.
    let executed = state
        .transactions
        .execute_new(&stream, command, &metadata)
        .await?;
    let (transaction, version, position) = match executed {
        Executed::Appended {
            state: transaction,
            version,
            position,
            replayed: false,
        } => (transaction, version, position),
        Executed::Appended {
            state: transaction,
            version,
            replayed: true,
            ..
        }
        | Executed::Unchanged {
            state: transaction,
            version,
        } => {
            let transaction = transaction
                .0
                .expect("a stream that exists has a transaction");
            return replay(&state, &transaction, version, &request).await;
        }
        Executed::Refused(refusal) => return Err(refusal_to_error(refusal)),
    };
    let transaction = transaction
        .0
        .as_ref()
        .expect("a created transaction has state");
    tracing::debug!(
        transaction_id = %transaction_id,
        kind = request.kind.as_str(),
        "transaction accepted"
    );
    Ok((
        StatusCode::ACCEPTED,
        command_headers(&location(transaction_id), position),
        axum::Json(TransactionView::new(transaction, version)),
    )
        .into_response())
}

/// The answer to a repeated key: the transaction as it is now if the body is the same, 422
/// otherwise. Its position is the log's head: at least as far as the transaction's last event,
/// which is what a read after it needs to wait for.
async fn replay(
    state: &AppState,
    transaction: &Transaction,
    version: u64,
    request: &TransactionRequest,
) -> Result<Response> {
    if transaction.request_fingerprint != request.fingerprint() {
        return Err(refusal_to_error(TransactionError::IdempotencyKeyReused));
    }
    let position = state.transactions.log().head().await?;
    let mut headers = command_headers(&location(transaction.id), position);
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    tracing::debug!(transaction_id = %transaction.id, "idempotent replay");
    Ok((
        StatusCode::OK,
        headers,
        axum::Json(TransactionView::new(transaction, version)),
    )
        .into_response())
}

fn location(transaction_id: TransactionId) -> String {
    format!("/api/v1/transactions/{transaction_id}")
}

fn idempotency_key(headers: &HeaderMap) -> Result<&str> {
    let value = headers.get(IDEMPOTENCY_KEY_HEADER).ok_or_else(|| {
        Error::bad_request(
            "idempotency_key_required",
            "the Idempotency-Key header is required",
        )
    })?;
    value
        .to_str()
        .ok()
        .filter(|key| {
            (1..=IDEMPOTENCY_KEY_BYTES_MAX).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            Error::bad_request(
                "idempotency_key_required",
                format!(
                    "the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
                ),
            )
        })
}

/// Whose accounts a request may name where ownership matters: the source of a withdrawal or
/// transfer, the destination of a deposit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    AnyAccount,
    OwnAccounts,
}

/// Who may move money how (SPEC §5): admins anything; operators (the payment rail) deposits
/// and withdrawals on any account; customers withdrawals and transfers from their own accounts,
/// and deposits into them only where `CUSTOMER_TOP_UPS=enabled`, so that no customer can create
/// money in production.
fn reach(caller: &Caller, kind: TransactionKind, customer_top_ups: bool) -> Result<Reach> {
    if caller.has(Role::Admin) || (caller.has(Role::Operator) && kind != TransactionKind::Transfer)
    {
        return Ok(Reach::AnyAccount);
    }
    if caller.has(Role::Customer) {
        if kind != TransactionKind::Deposit || customer_top_ups {
            return Ok(Reach::OwnAccounts);
        }
        return Err(Error::TopUpsDisabled);
    }
    Err(Error::Forbidden(
        "operators post deposits and withdrawals only".to_owned(),
    ))
}

/// Parses the body into a domain request: every 400 (and the 422 for the same account on both
/// sides) is decided here, before any account is looked at.
fn parse_request(body: CreateTransactionBody) -> Result<TransactionRequest> {
    let kind = match body.kind.as_str() {
        "deposit" => TransactionKind::Deposit,
        "withdrawal" => TransactionKind::Withdrawal,
        "transfer" => TransactionKind::Transfer,
        _ => {
            return Err(Error::bad_request(
                "invalid_type",
                "type must be deposit, withdrawal or transfer",
            ));
        }
    };
    let currency = Currency::from_code(&body.currency)
        .map_err(|error| Error::bad_request("unknown_currency", error.to_string()))?;
    let amount = parse_amount(&body.amount, currency)?;
    reject_nul(
        "description",
        "invalid_description",
        body.description.as_deref(),
    )?;
    TransactionRequest::new(
        kind,
        amount,
        currency,
        body.source_account_id.map(AccountId),
        body.destination_account_id.map(AccountId),
        body.description,
    )
    .map_err(refusal_to_error)
}

/// An amount is a JSON string of decimal digits, or a JSON number read from its own text.
fn parse_amount(raw: &RawValue, currency: Currency) -> Result<Amount> {
    let text = raw.get().trim();
    let digits = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|_| {
            Error::bad_request("invalid_amount", "amount is not a valid JSON string")
        })?
    } else if text.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        text.to_owned()
    } else {
        return Err(Error::bad_request(
            "invalid_amount",
            "amount must be a decimal string such as \"125.50\"",
        ));
    };
    Amount::parse(&digits, currency)
        .map_err(|error| Error::bad_request("invalid_amount", error.to_string()))
}

/// The accounts must exist, be in the transaction's currency, and, within [`Reach::OwnAccounts`],
/// belong to the caller where money leaves (or where a deposit tops up). Someone else's account
/// is a 404, as if it did not exist. A currency mismatch names only the transaction's currency:
/// the other account's is not the caller's business.
async fn check_accounts(
    state: &AppState,
    reach: Reach,
    owner: CustomerId,
    request: &TransactionRequest,
) -> Result<()> {
    let any_account = reach == Reach::AnyAccount;
    let sides = [
        (request.source_account_id, true),
        (
            request.destination_account_id,
            request.kind == TransactionKind::Deposit,
        ),
    ];
    for (account_id, must_own) in sides {
        let Some(account_id) = account_id else {
            continue;
        };
        let account = load_account(state, account_id).await?;
        let visible = account
            .as_ref()
            .filter(|account| any_account || !must_own || account.owner_id == owner);
        let Some(account) = visible else {
            return Err(Error::not_found(
                "account_not_found",
                format!("account {account_id} does not exist or is not yours"),
            ));
        };
        if account.currency != request.currency {
            return Err(Error::unprocessable(
                "currency_mismatch",
                format!(
                    "account {account_id} is not in {}, the transaction's currency",
                    request.currency
                ),
            ));
        }
    }
    Ok(())
}

/// An account as the cache holds it, or as the log does: who owns it and its currency never
/// change once it is opened, so a cached state answers both.
async fn load_account(state: &AppState, account_id: AccountId) -> Result<Option<Account>> {
    let (aggregate, _) = state.accounts.load(&account_id.to_string()).await?;
    Ok(aggregate.0)
}

fn refusal_to_error(refusal: TransactionError) -> Error {
    match refusal {
        TransactionError::SameAccount => Error::unprocessable("same_account", refusal.to_string()),
        TransactionError::IdempotencyKeyReused => {
            Error::unprocessable("idempotency_key_reused", refusal.to_string())
        }
        TransactionError::MissingSource
        | TransactionError::UnexpectedSource
        | TransactionError::MissingDestination
        | TransactionError::UnexpectedDestination
        | TransactionError::DescriptionTooLong => {
            Error::bad_request("invalid_request", refusal.to_string())
        }
        TransactionError::NotCreated | TransactionError::IllegalTransition { .. } => Error::Store {
            context: "creating a transaction",
            message: refusal.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("valid JSON in the test")
    }

    fn usd() -> Currency {
        Currency::from_code("USD").expect("known")
    }

    fn caller(roles: &[Role]) -> Caller {
        Caller {
            subject: Uuid::new_v4(),
            roles: roles.to_vec(),
            token_id: "test".to_owned(),
        }
    }

    #[test]
    fn only_operators_and_admins_create_money_unless_top_ups_are_enabled() {
        // Proves SPEC §5's table: who may post which kind on whose accounts.
        use TransactionKind::{Deposit, Transfer, Withdrawal};
        let customer = caller(&[Role::Customer]);
        let operator = caller(&[Role::Operator]);
        let admin = caller(&[Role::Admin]);
        let auditor = caller(&[Role::Auditor]);
        assert!(matches!(
            reach(&customer, Deposit, false),
            Err(Error::TopUpsDisabled)
        ));
        assert_eq!(
            reach(&customer, Deposit, true).ok(),
            Some(Reach::OwnAccounts)
        );
        for kind in [Withdrawal, Transfer] {
            assert_eq!(reach(&customer, kind, false).ok(), Some(Reach::OwnAccounts));
        }
        for kind in [Deposit, Withdrawal] {
            assert_eq!(reach(&operator, kind, false).ok(), Some(Reach::AnyAccount));
        }
        assert!(matches!(
            reach(&operator, Transfer, false),
            Err(Error::Forbidden(_))
        ));
        for kind in [Deposit, Withdrawal, Transfer] {
            assert_eq!(reach(&admin, kind, false).ok(), Some(Reach::AnyAccount));
            assert!(reach(&auditor, kind, true).is_err());
        }
    }

    #[test]
    fn amounts_are_read_from_their_text() {
        assert_eq!(
            parse_amount(&raw("\"125.50\""), usd())
                .map(Amount::minor)
                .ok(),
            Some(12550)
        );
        assert_eq!(
            parse_amount(&raw("125.50"), usd()).map(Amount::minor).ok(),
            Some(12550)
        );
        // A float would turn 0.1 + 0.2 style inputs into near values; the text is exact.
        assert_eq!(
            parse_amount(&raw("0.29"), usd()).map(Amount::minor).ok(),
            Some(29)
        );
        for bad in ["-1", "1e2", "true", "null", "{}", "\"\"", "1.001", "0"] {
            assert!(
                parse_amount(&raw(bad), usd()).is_err(),
                "{bad} must be refused"
            );
        }
    }
}
