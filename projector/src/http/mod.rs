//! The query API of SPEC §5: every GET on accounts and transactions, served from the read
//! models (and the Redis cache for one transaction), with the ownership rules (someone else's
//! account or transaction is a 404), keyset pagination with opaque cursors, and read-your-writes
//! through `X-Ledger-Position`.

mod accounts;
mod audit;
pub mod positions;
pub mod trail;
mod transactions;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{FromRef, FromRequestParts, Query, State};
use axum::http::HeaderName;
use axum::http::request::Parts;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use infra::auth::{Caller, JwtVerifier, Role};
use infra::http::{HealthReport, method_not_allowed, metrics_endpoint, not_found, service_layers};
use infra::log::LogPosition;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::store::{PageQuery, ReadModels};

/// The read-your-writes header (SPEC §5).
pub const POSITION_HEADER: HeaderName = HeaderName::from_static("x-ledger-position");

pub use positions::{POSITION_WAIT, Positions};

/// Page size when the caller names none, and the largest allowed.
const PAGE_SIZE_DEFAULT: i64 = 20;
const PAGE_SIZE_MAX: i64 = 100;

#[derive(Clone)]
pub struct AppState {
    /// The read models (PostgreSQL schema `projector`, or the embedded mode's SQLite).
    pub models: Arc<dyn ReadModels>,
    /// The event log, for the audit trail of a transaction.
    pub trail: Arc<dyn trail::EventTrail>,
    pub cache: Option<Arc<Cache>>,
    pub verifier: Arc<JwtVerifier>,
    /// One flag per projection runner: false while its last batch failed.
    pub runners_healthy: Vec<Arc<AtomicBool>>,
    /// Read-your-writes waits, bounded and on connections of their own.
    pub positions: Arc<Positions>,
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// The queries of SPEC §5, without `/health`, `/metrics`, fallbacks or layers: what
/// `ledger serve` mounts beside the other services' routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/accounts", get(accounts::list))
        .route("/api/v1/accounts/{id}", get(accounts::one))
        .route("/api/v1/accounts/{id}/balance", get(accounts::balance))
        .route("/api/v1/accounts/{id}/history", get(accounts::history))
        .route("/api/v1/transactions", get(transactions::list))
        .route("/api/v1/transactions/{id}", get(transactions::one))
        .route(
            "/api/v1/transactions/{id}/events",
            get(transactions::events),
        )
}

pub fn router(state: AppState) -> Router {
    let routes = routes()
        .route("/health", get(health))
        .route("/metrics", get(metrics_endpoint))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    service_layers(routes).with_state(state)
}

async fn health(State(state): State<AppState>) -> HealthReport {
    let read_models = state.models.ping().await;
    let event_log = state.trail.ping().await;
    let projections = state
        .runners_healthy
        .iter()
        .all(|flag| flag.load(Ordering::Relaxed));
    let report = HealthReport::default()
        .required("database", read_models)
        .required("event_log", event_log)
        .optional("projections", projections);
    match &state.cache {
        Some(cache) => report.optional("cache", cache.ping().await),
        None => report,
    }
}

/// Who may read what: customers their own, admins and auditors everything, operators (the
/// payment rail) every account and transaction, to see the outcomes of what they posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Everything,
    Owner(Uuid),
}

impl Reader {
    /// Accounts, balances, histories and transactions.
    pub fn of(caller: &Caller) -> Result<Reader> {
        if caller.has_any(&[Role::Admin, Role::Auditor, Role::Operator]) {
            Ok(Reader::Everything)
        } else if caller.has(Role::Customer) {
            Ok(Reader::Owner(caller.subject))
        } else {
            Err(Error::Forbidden(
                "reading needs the customer, operator, admin or auditor role".to_owned(),
            ))
        }
    }

    /// A transaction's audit trail (its events): admins and auditors all of it, a customer
    /// party its own side (`audit::customer_view`); an operator sees outcomes through the
    /// transaction itself, not the trail.
    pub fn of_audit_trail(caller: &Caller) -> Result<Reader> {
        if caller.has_any(&[Role::Admin, Role::Auditor]) {
            Ok(Reader::Everything)
        } else if caller.has(Role::Customer) {
            Ok(Reader::Owner(caller.subject))
        } else {
            Err(Error::Forbidden(
                "the audit trail is for the parties, admins and auditors".to_owned(),
            ))
        }
    }

    /// Whether a resource owned by `owners` is visible.
    pub fn may_see(self, owners: &[Option<Uuid>]) -> bool {
        match self {
            Reader::Everything => true,
            Reader::Owner(me) => owners.contains(&Some(me)),
        }
    }
}

/// Read-your-writes: the position the caller wants reflected, if it sent one.
pub struct WantedPosition(pub Option<LogPosition>);

impl<S: Send + Sync> FromRequestParts<S> for WantedPosition {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self> {
        let Some(value) = parts.headers.get(&POSITION_HEADER) else {
            return Ok(WantedPosition(None));
        };
        let text = value
            .to_str()
            .map_err(|_| Error::bad_request("invalid_position", "X-Ledger-Position is not text"))?;
        text.parse::<LogPosition>()
            .map(|position| WantedPosition(Some(position)))
            .map_err(|detail| Error::bad_request("invalid_position", detail))
    }
}

/// `page_size` and `cursor`, validated; other query parameters come back for the handler.
pub struct Page {
    pub size: i64,
    /// Rows strictly older than this position (`i64::MAX` on the first page).
    pub before: i64,
}

impl Page {
    /// The rows to read: one more than the page, to know whether there is a next one.
    pub fn query(&self) -> PageQuery {
        PageQuery {
            before: self.before,
            limit: self.size + 1,
        }
    }
}

const CURSOR_PREFIX: &str = "v1:";

pub fn cursor_for(position: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{position}"))
}

fn parse_cursor(text: &str) -> Result<i64> {
    let invalid = || {
        Error::bad_request(
            "invalid_cursor",
            "cursor is not one this API returned; pass next_cursor unchanged",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    text.strip_prefix(CURSOR_PREFIX)
        .and_then(|number| number.parse::<i64>().ok())
        .filter(|position| *position > 0)
        .ok_or_else(invalid)
}

/// Splits the query string into the page and the handler's own parameters, refusing any other.
pub fn page_and_filters(
    Query(mut query): Query<HashMap<String, String>>,
    allowed: &[&str],
) -> Result<(Page, HashMap<String, String>)> {
    let size = match query.remove("page_size") {
        None => PAGE_SIZE_DEFAULT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|size| (1..=PAGE_SIZE_MAX).contains(size))
            .ok_or_else(|| {
                Error::bad_request(
                    "invalid_page_size",
                    format!("page_size must be a whole number from 1 to {PAGE_SIZE_MAX}"),
                )
            })?,
    };
    let before = match query.remove("cursor") {
        None => i64::MAX,
        Some(text) => parse_cursor(&text)?,
    };
    if let Some(unknown) = query.keys().find(|key| !allowed.contains(&key.as_str())) {
        return Err(Error::bad_request(
            "unknown_parameter",
            format!("unknown query parameter {unknown:?}"),
        ));
    }
    Ok((Page { size, before }, query))
}

/// A page of items: `next_cursor` is null on the last page. `rows` holds up to `size + 1`
/// items with their positions; the extra one only says there is more.
pub fn paged(mut rows: Vec<(i64, Value)>, size: i64) -> Value {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let more = rows.len() > size;
    rows.truncate(size);
    let next_cursor = if more {
        rows.last().map(|(position, _)| cursor_for(*position))
    } else {
        None
    };
    json!({
        "items": rows.into_iter().map(|(_, item)| item).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })
}

/// An id from the path; anything that is not a UUID is simply not found.
pub fn path_id(text: &str, what: &str) -> Result<Uuid> {
    Uuid::parse_str(text).map_err(|_| Error::NotFound(format!("no {what} {text}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_forgeries_are_refused() {
        let cursor = cursor_for(4242);
        assert_eq!(parse_cursor(&cursor).expect("our own cursor"), 4242);
        for bad in ["", "abc", "djE6", "djE6LTE", "djI6NDI", "!!!!"] {
            assert!(parse_cursor(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
