//! The fraud worker's HTTP surface: `GET /api/v1/fraud/rules` (admin, auditor; SPEC §5),
//! `/health` (the broker for real; Redis too, required while the velocity rule is on) and
//! `/metrics`. Everything else is a problem+json 404.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{FromRef, State};
use axum::routing::get;
use infra::auth::{Caller, JwtVerifier, Role};
use infra::http::{HealthReport, method_not_allowed, metrics_endpoint, not_found, service_layers};
use infra::problem::Problem;
use serde::Serialize;

use crate::rules::{RuleDescription, Rules};
use crate::velocity::VelocityCounters;
use infra::bus::rabbit::BrokerLink;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub rules: Arc<Rules>,
    pub verifier: Arc<JwtVerifier>,
    pub broker: BrokerLink,
    /// The queue `/health` checks exists: the worker's input.
    pub queue: String,
    pub counter: Arc<dyn VelocityCounters>,
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// What the rules' route needs: the rules and the token verifier.
#[derive(Clone)]
pub struct RulesState {
    pub rules: Arc<Rules>,
    pub verifier: Arc<JwtVerifier>,
}

impl FromRef<RulesState> for Arc<JwtVerifier> {
    fn from_ref(state: &RulesState) -> Self {
        state.verifier.clone()
    }
}

impl FromRef<AppState> for RulesState {
    fn from_ref(state: &AppState) -> Self {
        RulesState {
            rules: state.rules.clone(),
            verifier: state.verifier.clone(),
        }
    }
}

/// `GET /api/v1/fraud/rules` alone, without `/health`, `/metrics`, fallbacks or layers: what
/// `ledger serve` mounts beside the other services' routes.
pub fn rules_routes() -> Router<RulesState> {
    Router::new().route("/api/v1/fraud/rules", get(list_rules))
}

pub fn router(state: AppState) -> Router {
    let rules = rules_routes().with_state(RulesState::from_ref(&state));
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_endpoint))
        .with_state(state)
        .merge(rules)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    service_layers(routes)
}

#[derive(Debug, Serialize)]
struct RulesBody {
    rules: Vec<RuleDescription>,
}

/// `GET /api/v1/fraud/rules`: every rule, whether it is on, and its effective parameters.
async fn list_rules(
    caller: Caller,
    State(state): State<RulesState>,
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
