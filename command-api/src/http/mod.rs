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
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/api/v1/accounts", post(accounts::open_account))
        .route(
            "/api/v1/transactions",
            post(transactions::create_transaction),
        )
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
