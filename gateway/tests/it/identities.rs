//! The identities seam (SPEC §10): the conformance suite against PostgreSQL and SQLite, the
//! start-up refusal on SQLite, and the edge mounted in front of a router in the same process
//! (`ledger serve`'s composition) on SQLite identities: register, log in, 401/403 at the edge,
//! routed requests reach the inner router with the edge's correlation id.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::get;
use gateway::http::{AppState, Upstreams, edge_router};
use gateway::identity::{Identities, PgIdentities, SqliteIdentities};
use gateway::limiter::Clock;
use gateway::passwords::Passwords;
use gateway::testing::{TestOptions, admin_url, test_config};
use http_body_util::BodyExt;
use infra::db::ScratchDatabase;
use secrecy::SecretString;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::PASSWORD;

/// A scratch database, dropped when the check is over.
pub struct Scratch(Option<ScratchDatabase>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(database) = self.0.take() {
            infra::tasks::block_on_own_runtime(async move {
                let _ = database.drop_database().await;
            });
        }
    }
}

async fn fresh_postgres_identities() -> (Arc<dyn Identities>, Scratch) {
    let database = ScratchDatabase::create(&admin_url())
        .await
        .expect("a scratch database");
    let pool = infra::db::connect(&database.url(), gateway::startup::SCHEMA, 4, "test")
        .await
        .expect("connects");
    gateway::startup::migrate(&pool).await.expect("migrates");
    (Arc::new(PgIdentities::new(pool)), Scratch(Some(database)))
}

async fn sqlite_identities(directory: &tempfile::TempDir) -> SqliteIdentities {
    let pool = infra::sqlite::pool(
        infra::sqlite::options(&directory.path().join("ledger.sqlite"), true),
        4,
    )
    .await
    .expect("opens");
    SqliteIdentities::open(pool).await.expect("migrates")
}

async fn fresh_sqlite_identities() -> (Arc<dyn Identities>, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let identities = sqlite_identities(&directory).await;
    (Arc::new(identities), directory)
}

mod postgres {
    use super::fresh_postgres_identities;
    gateway::identity_conformance!(fresh_postgres_identities);
}

mod sqlite {
    use super::fresh_sqlite_identities;
    gateway::identity_conformance!(fresh_sqlite_identities);
}

#[tokio::test]
async fn sqlite_identities_survive_a_reopen_and_refuse_a_squatted_admin_name() {
    // Proves the SQLite identities are durable across a restart (migrations run once, the user
    // is still there) and that the start-up refusal works on them: ADMIN_USERNAME naming a
    // registered customer stops the start, saying how to mark that user.
    let directory = tempfile::tempdir().expect("a temporary directory");
    let passwords = Passwords::with_bounds(1, 4).await.expect("hashing");
    let squatter = {
        let identities = sqlite_identities(&directory).await;
        let hash = passwords
            .hash(SecretString::from(PASSWORD.to_owned()))
            .await
            .expect("hashes");
        identities
            .register("root", &hash, None)
            .await
            .expect("registers")
    };
    let identities = sqlite_identities(&directory).await;
    let credentials = identities
        .credentials("root")
        .await
        .expect("reads")
        .expect("kept across the reopen");
    assert_eq!(credentials.customer_id, squatter.customer_id);
    let password = SecretString::from("another long password".to_owned());
    let error =
        gateway::startup::ensure_admin(&identities, &passwords, Some("root"), Some(&password))
            .await
            .expect_err("a squatted admin name stops the start");
    let message = error.to_string();
    assert!(
        message.contains(&squatter.customer_id.to_string())
            && message.contains("UPDATE users SET bootstrap_admin = 1"),
        "{message}"
    );
    gateway::startup::ensure_admin(&identities, &passwords, Some("admin"), Some(&password))
        .await
        .expect("a free name becomes the bootstrap admin");
}

/// What the inner router saw of each routed request.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
}

/// The router `ledger serve` would mount behind the edge, reduced to one echoing route.
fn inner_router(seen: Arc<Seen>) -> Router {
    Router::new().route(
        "/api/v1/accounts",
        get(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                seen.calls.fetch_add(1, Ordering::SeqCst);
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                axum::Json(json!({
                    "authorization": header("authorization"),
                    "correlation_id": header("x-correlation-id"),
                }))
            }
        }),
    )
}

async fn call(
    router: &Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .expect("a request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_mounts_in_front_of_an_in_process_router_on_sqlite_identities() {
    // Proves `ledger serve`'s composition: the gateway's identity routes and auth checks work as
    // a library on SQLite identities with no proxy and no PostgreSQL; a routed request reaches
    // the inner router only with a valid token and the table's roles, carrying the edge's
    // correlation id; unrouted paths are 404 without reaching it; the caller's own routes
    // (its `/health`) are served beside.
    let directory = tempfile::tempdir().expect("a temporary directory");
    let identities: Arc<dyn Identities> = Arc::new(sqlite_identities(&directory).await);
    let config =
        test_config("postgres://127.0.0.1:1/unused", &TestOptions::default()).expect("a config");
    let seen = Arc::new(Seen::default());
    let state = AppState::new(
        &config,
        identities,
        Passwords::with_bounds(1, 4).await.expect("hashing"),
        Clock::System,
        Upstreams::InProcess(inner_router(seen.clone())),
    )
    .expect("the edge's state");
    let own = Router::new().route("/health", get(|| async { "ok" }));
    let router = edge_router(state, own);

    let (status, _, body) = call(
        &router,
        Method::POST,
        "/api/v1/auth/register",
        None,
        Some(json!({"username": "ada", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, headers, body) = call(
        &router,
        Method::POST,
        "/api/v1/auth/token",
        None,
        Some(json!({"username": "ada", "password": PASSWORD})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let token = body["access_token"].as_str().expect("a token").to_owned();
    let refresh = body["refresh_token"].as_str().expect("a refresh token");
    let (status, _, body) = call(
        &router,
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, headers, _) = call(&router, Method::GET, "/api/v1/accounts", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0, "refused at the edge");

    let (status, headers, body) =
        call(&router, Method::GET, "/api/v1/accounts", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    assert_eq!(body["authorization"], format!("Bearer {token}"));
    assert_eq!(
        headers["x-correlation-id"].to_str().expect("text"),
        body["correlation_id"],
        "the inner router saw another correlation id than the edge answered with"
    );

    let (status, _, body) = call(
        &router,
        Method::GET,
        "/api/v1/fraud/reviews",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _, body) = call(
        &router,
        Method::PUT,
        &format!("/api/v1/admin/users/{}/roles", uuid::Uuid::new_v4()),
        Some(&token),
        Some(json!({"roles": ["admin"]})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _, body) = call(&router, Method::GET, "/nowhere", Some(&token), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        1,
        "only the routed GET got through"
    );

    let (status, _, _) = call(&router, Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);

    // A declared body over the limit is refused at the edge, as the proxy refuses it.
    let oversized = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/accounts")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header(
            "content-length",
            (infra::http::BODY_BYTES_MAX + 1).to_string(),
        )
        .body(Body::empty())
        .expect("a request");
    let response = router.clone().oneshot(oversized).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        seen.calls.load(Ordering::SeqCst),
        1,
        "refused before the inner router"
    );
}
