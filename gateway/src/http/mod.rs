//! The gateway's HTTP surface. Its own routes: `/health`, `/metrics`, the OpenAPI document, the
//! two identity routes (public) and the roles route (admin). Every other request goes through
//! the edge ([`edge`]): the routing table names its upstream, the bearer token is verified
//! (401) and the table's roles checked (403) before it is forwarded.

mod edge;
mod identity;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use infra::auth::{JwtSigner, JwtVerifier};
use infra::http::{HealthReport, method_not_allowed, metrics_endpoint, service_layers};
use sqlx::PgPool;

use crate::identity::Users;
use crate::limiter::LoginLimiter;
use crate::passwords::Passwords;
use crate::proxy::Proxy;
use crate::routes::RoutingTable;

/// How long `/health` waits for the database before calling it down.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The OpenAPI 3.1 document of the whole public API (SPEC §5), kept true by a test.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../openapi.json");

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub users: Users,
    pub passwords: Passwords,
    pub limiter: Arc<LoginLimiter>,
    pub signer: Arc<JwtSigner>,
    pub verifier: Arc<JwtVerifier>,
    pub token_ttl_seconds: i64,
    pub routes: Arc<RoutingTable>,
    pub proxy: Proxy,
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/api/v1/auth/register", post(identity::register))
        .route("/api/v1/auth/token", post(identity::token))
        .route(
            "/api/v1/admin/users/{customer_id}/roles",
            put(identity::set_roles),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/health", get(health))
        .route("/metrics", get(metrics_endpoint))
        .fallback(edge::forward)
        .method_not_allowed_fallback(method_not_allowed);
    service_layers(routes).with_state(state)
}

/// `GET /api/v1/openapi.json`.
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_DOCUMENT,
    )
}

/// `GET /health`: the gateway's database is required (identity and tokens need it); each
/// upstream the routing table uses is reported, and one that is down makes the gateway
/// `degraded`, not down (docs/decisions.md §13).
async fn health(State(state): State<AppState>) -> HealthReport {
    let upstreams: Vec<_> = state.routes.upstreams().into_iter().collect();
    let database = infra::db::ping(&state.pool, HEALTH_CHECK_TIMEOUT);
    let checks = futures::future::join_all(
        upstreams
            .iter()
            .map(|upstream| state.proxy.healthy(*upstream)),
    );
    let (database, checks) = tokio::join!(database, checks);
    upstreams.iter().zip(checks).fold(
        HealthReport::default().required("database", database),
        |report, (upstream, up)| report.optional(upstream.name(), up),
    )
}
