//! The gateway's HTTP surface. Its own routes: `/health`, the OpenAPI document, the identity
//! routes (public) and the roles route (admin). Every other request goes through the edge
//! ([`edge`]): the routing table names its upstream, the bearer token is verified (401) and the
//! table's roles checked (403) before it is forwarded. Before any of that, the path guard
//! ([`paths`]) refuses every path that could mean two things. `/metrics` is not here: it is
//! served on its own listener ([`metrics_router`], `METRICS_ADDR`).
//!
//! The services' gateway forwards through the reverse proxy ([`Upstreams::Proxy`]); `ledger
//! serve` mounts the same edge in front of the services' routers in its own process
//! ([`Upstreams::InProcess`], [`edge_router`]): one set of identity routes and one auth check in
//! both modes.

mod edge;
mod identity;
pub mod paths;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use infra::auth::{JwtSigner, JwtVerifier};
use infra::http::{
    HealthReport, HealthRounds, method_not_allowed, metrics_endpoint, not_found, service_layers,
};

use crate::clients::TrustedProxies;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::identity::Identities;
use crate::limiter::Clock;
use crate::limiter::LoginLimiter;
use crate::passwords::Passwords;
use crate::proxy::Proxy;
use crate::routes::{RoutingTable, Upstream};

/// How long `/health` waits for the database before calling it down.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The OpenAPI 3.1 document of the whole public API (SPEC §5), kept true by a test.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../openapi.json");

/// Where the edge sends the requests it routes to a service.
#[derive(Clone)]
pub enum Upstreams {
    /// Over HTTP to the services' addresses (the four-service mode).
    Proxy(Proxy),
    /// To a router in this process that serves every routed path (`ledger serve`); the routing
    /// table still decides which paths exist and which roles they need.
    InProcess(Router),
}

/// What every handler shares: one pointer, since axum clones the state for every request (a
/// struct of a dozen `Arc`s was 5 % of the gateway's CPU on a cached `GET`, in reference-count
/// traffic on cache lines every request shares).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The contents of [`AppState`].
pub struct Shared {
    pub identities: Arc<dyn Identities>,
    pub passwords: Passwords,
    pub limiter: Arc<LoginLimiter>,
    pub signer: Arc<JwtSigner>,
    pub verifier: Arc<JwtVerifier>,
    /// Lifetime of the access tokens the gateway mints.
    pub access_token_ttl_seconds: i64,
    /// Lifetime of a session (its refresh token).
    pub session_lifetime: Duration,
    pub trusted_proxies: Arc<TrustedProxies>,
    pub routes: Arc<RoutingTable>,
    pub upstreams: Upstreams,
    pub health: Arc<HealthCache>,
}

impl AppState {
    /// The state of `config`'s edge on `identities`, forwarding to `upstreams`. The login
    /// limiter reads `clock`; `passwords` bounds the hashing.
    pub fn new(
        config: &Config,
        identities: Arc<dyn Identities>,
        passwords: Passwords,
        clock: Clock,
        upstreams: Upstreams,
    ) -> Result<AppState> {
        Ok(AppState(Arc::new(Shared {
            identities,
            passwords,
            limiter: Arc::new(LoginLimiter::new(config.login_limits(), clock)),
            signer: Arc::new(JwtSigner::new(&config.token)?),
            verifier: Arc::new(JwtVerifier::new(&config.token)?),
            access_token_ttl_seconds: i64::try_from(config.access_token_ttl_seconds)
                .map_err(|_| Error::config("ACCESS_TOKEN_TTL_SECONDS is out of range"))?,
            session_lifetime: Duration::from_secs(config.jwt_ttl_seconds),
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            routes: Arc::new(config.gateway_routes.clone()),
            upstreams,
            health: Arc::new(HealthCache::default()),
        })))
    }
}

impl FromRef<AppState> for Arc<JwtVerifier> {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// The public listener's router: the edge with the gateway's own `/health`.
pub fn router(state: AppState) -> Router {
    let own = Router::new()
        .route("/health", get(health))
        .with_state(state.clone());
    edge_router(state, own)
}

/// The edge as a library: the identity routes, the OpenAPI document, `own` (routes the caller
/// serves without the edge's checks, e.g. its `/health`), and every other request resolved by
/// the routing table, authenticated and role-checked, then handed to `state.upstreams`. The
/// path guard and the shared service layers (correlation id, request log, timeouts, problem
/// fallbacks) wrap all of it.
pub fn edge_router(state: AppState, own: Router) -> Router {
    let routes = Router::new()
        .route("/api/v1/auth/register", post(identity::register))
        .route("/api/v1/auth/token", post(identity::token))
        .route("/api/v1/auth/refresh", post(identity::refresh))
        .route(
            "/api/v1/admin/users/{customer_id}/roles",
            put(identity::set_roles),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .fallback(edge::forward)
        .with_state(state)
        .merge(own)
        .method_not_allowed_fallback(method_not_allowed);
    service_layers(routes).layer(axum::middleware::from_fn(paths::refuse_ambiguous_paths))
}

/// The metrics listener's router (`METRICS_ADDR`): `/metrics` only.
pub fn metrics_router() -> Router {
    service_layers(
        Router::new()
            .route("/metrics", get(metrics_endpoint))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed),
    )
}

/// `GET /api/v1/openapi.json`.
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_DOCUMENT,
    )
}

/// The `/health` rounds: whether the database answered, and each upstream.
pub type HealthCache = HealthRounds<(bool, Vec<(Upstream, bool)>)>;

/// `GET /health`: the identities' store is required (identity and tokens need it); each
/// upstream the routing table uses is reported, and one that is down makes the gateway
/// `degraded`, not down (docs/decisions.md §13). Answered from the last round if it is younger
/// than [`infra::http::HEALTH_REUSED_FOR`]; concurrent callers share one round.
async fn health(State(state): State<AppState>) -> HealthReport {
    let (database, upstreams) = state.health.get(|| health_round(&state)).await;
    upstreams.iter().fold(
        HealthReport::default().required("database", database),
        |report, (upstream, up)| report.optional(upstream.name(), *up),
    )
}

async fn health_round(state: &AppState) -> (bool, Vec<(Upstream, bool)>) {
    let upstreams: Vec<_> = state.routes.upstreams().into_iter().collect();
    let database = state.identities.ping(HEALTH_CHECK_TIMEOUT);
    let checks = futures::future::join_all(upstreams.iter().map(|upstream| async {
        match &state.upstreams {
            Upstreams::Proxy(proxy) => proxy.healthy(*upstream).await,
            // In this process: up while the process is.
            Upstreams::InProcess(_) => true,
        }
    }));
    let (database, checks) = tokio::join!(database, checks);
    (database, upstreams.into_iter().zip(checks).collect())
}
