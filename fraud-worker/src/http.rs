//! The fraud worker's HTTP surface: `GET /api/v1/fraud/rules` (admin, auditor; SPEC §5),
//! `/health` (the broker for real; Redis too, required while the velocity rule is on) and
//! `/metrics`. Everything else is a problem+json 404.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use infra::auth::{Caller, JwtVerifier, Role};
use infra::http::{BODY_BYTES_MAX, HealthReport, metrics_endpoint, not_found, observe_requests};
use infra::problem::Problem;
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;

use crate::consumer::BrokerLink;
use crate::rules::{RuleDescription, Rules};
use crate::velocity::VelocityCounter;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<Rules>,
    pub verifier: Arc<JwtVerifier>,
    pub broker: BrokerLink,
    /// The queue `/health` checks exists: the worker's input.
    pub queue: String,
    pub counter: VelocityCounter,
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/fraud/rules", get(list_rules))
        .route("/health", get(health))
        .route("/metrics", get(metrics_endpoint))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(observe_requests))
        .layer(CatchPanicLayer::custom(|_panic| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the server failed to handle the request; it has been logged",
            )
            .into_response()
        }))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}

#[derive(Debug, Serialize)]
struct RulesBody {
    rules: Vec<RuleDescription>,
}

/// `GET /api/v1/fraud/rules`: every rule, whether it is on, and its effective parameters.
async fn list_rules(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<RulesBody>, Problem> {
    caller.require_any(&[Role::Admin, Role::Auditor])?;
    Ok(Json(RulesBody {
        rules: state.rules.describe(),
    }))
}

/// `GET /health`: the broker is required; Redis is required while the velocity rule counts in
/// it, and merely reported otherwise.
async fn health(State(state): State<AppState>) -> HealthReport {
    let (broker, redis) = tokio::join!(state.broker.check(&state.queue), state.counter.ping());
    let report = HealthReport::default().required("broker", broker);
    if state.rules.velocity.enabled {
        report.required("redis", redis)
    } else {
        report.optional("redis", redis)
    }
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
