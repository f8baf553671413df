//! The HTTP surface of command-api: the two command endpoints of SPEC §5, `/health` and
//! `/metrics`. Queries are the projector's.

mod accounts;
mod transactions;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::routing::{get, post};
use infra::auth::JwtVerifier;
use infra::eventlog::EventLog;
use infra::http::{HealthReport, method_not_allowed, metrics_endpoint, not_found, service_layers};
use infra::log::LogPosition;

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::store::AggregateStore;

/// The position header of read-your-writes (SPEC §5).
pub const POSITION_HEADER: HeaderName = HeaderName::from_static("x-ledger-position");

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub accounts: Arc<AggregateStore<AccountAggregate>>,
    pub transactions: Arc<AggregateStore<TransactionAggregate>>,
    pub log: Arc<dyn EventLog>,
    pub verifier: Arc<JwtVerifier>,
    /// Whether the decision consumer holds a live broker connection.
    pub broker_connected: Arc<AtomicBool>,
    /// `CUSTOMER_TOP_UPS=enabled`: customers may deposit into their own accounts (sandboxes).
    pub customer_top_ups: bool,
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// The command endpoints of SPEC §5, without `/health`, `/metrics`, fallbacks or layers: what
/// `ledger serve` mounts beside the other services' routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/accounts", post(accounts::open_account))
        .route(
            "/api/v1/transactions",
            post(transactions::create_transaction),
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
    let database = state.log.ping().await;
    let broker = state.broker_connected.load(Ordering::Relaxed);
    HealthReport::default()
        .required("database", database)
        .required("broker", broker)
}

/// Refuses U+0000 in a description: PostgreSQL cannot store it in `text` or `jsonb`, so it would
/// otherwise surface as a 500, and no description needs it (line breaks are fine).
fn reject_nul(
    field: &'static str,
    code: &'static str,
    text: Option<&str>,
) -> crate::error::Result<()> {
    if text.is_some_and(|text| text.contains('\0')) {
        return Err(crate::error::Error::bad_request(
            code,
            format!("{field} must not contain U+0000"),
        ));
    }
    Ok(())
}

/// Refuses control characters (U+0000–U+001F, U+007F–U+009F) in a name: a name is one line of
/// text, as the gateway's user names are; U+0000 would otherwise be a 500 (PostgreSQL cannot
/// store it), and the rest only garble statements and logs.
fn reject_control(
    field: &'static str,
    code: &'static str,
    text: Option<&str>,
) -> crate::error::Result<()> {
    if text.is_some_and(|text| text.chars().any(char::is_control)) {
        return Err(crate::error::Error::bad_request(
            code,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

/// Headers of a command response: where the resource lives and how far the log has to be read
/// to see it.
fn command_headers(location: &str, position: LogPosition) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(location) {
        headers.insert(axum::http::header::LOCATION, value);
    }
    if let Ok(value) = HeaderValue::from_str(&position.to_string()) {
        headers.insert(POSITION_HEADER, value);
    }
    headers
}
