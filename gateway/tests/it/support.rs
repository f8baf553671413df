//! Helpers shared by the integration tests: a harness that starts the gateway on one scratch
//! database and cleans everything up, an echoing upstream, and raw HTTP for requests a client
//! library will not send. (The tests with the real services behind the gateway are in
//! `system-tests/tests/edge`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use gateway::limiter::{Clock, ManualClock};
use gateway::testing::{TestApp, TestOptions, admin_url, spawn_app};
use infra::db::ScratchDatabase;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use uuid::Uuid;

/// A password that passes the rules.
pub const PASSWORD: &str = "correct horse battery staple";

/// What a test changes about the gateway it starts (upstream addresses among them).
#[derive(Default)]
pub struct Setup {
    pub gateway: TestOptions,
}

pub struct Harness {
    pub gateway: TestApp,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    options: TestOptions,
    database: Option<ScratchDatabase>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(Setup::default()).await
    }

    /// A scratch database and the gateway on it with a manual clock for the login limiter.
    pub async fn start_with(setup: Setup) -> Harness {
        let database = ScratchDatabase::create(&admin_url())
            .await
            .expect("a scratch database");
        let mut options = setup.gateway;
        let clock = ManualClock::new();
        options.clock = Clock::Manual(clock.clone());
        let gateway = spawn_app(&database.url(), &options)
            .await
            .expect("the gateway starts");
        Harness {
            gateway,
            clock,
            client: reqwest::Client::new(),
            options,
            database: Some(database),
        }
    }

    /// Stops the gateway and starts it again on the same database with `change` applied to its
    /// options (the ensured admin, the upstreams).
    pub async fn restart_gateway(&mut self, change: impl FnOnce(&mut TestOptions)) {
        self.gateway.stop().await;
        change(&mut self.options);
        let url = self.database.as_ref().expect("the database is alive").url();
        self.gateway = spawn_app(&url, &self.options)
            .await
            .expect("the gateway restarts");
    }

    pub fn database(&self) -> Option<&ScratchDatabase> {
        self.database.as_ref()
    }

    /// Drops the scratch database now (the test proves what happens without it).
    pub async fn drop_database(&mut self) {
        if let Some(database) = self.database.take() {
            database
                .drop_database()
                .await
                .expect("the scratch database drops");
        }
    }

    /// Stops the gateway and drops the scratch database.
    pub async fn finish(mut self) {
        self.gateway.stop().await;
        if let Some(database) = self.database.take() {
            database
                .drop_database()
                .await
                .expect("the scratch database drops");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.address)
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the gateway answers")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the gateway answers")
    }

    /// Registers `username` with [`PASSWORD`] and returns the customer id.
    pub async fn register(&self, username: &str) -> Uuid {
        let response = self
            .post_json(
                "/api/v1/auth/register",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("JSON");
        Uuid::parse_str(body["customer_id"].as_str().expect("an id")).expect("a UUID")
    }

    pub async fn login(&self, username: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": username, "password": password}),
        )
        .await
    }

    /// A token from the gateway for `username` and `password`.
    pub async fn token(&self, username: &str, password: &str) -> String {
        let response = self.login(username, password).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "logging in as {username}"
        );
        let body: Value = response.json().await.expect("JSON");
        body["access_token"].as_str().expect("a token").to_owned()
    }
}

impl Drop for Harness {
    /// A test that failed before `finish` still drops its database, on a thread with a runtime
    /// of its own (the test's runtime is unwinding).
    fn drop(&mut self) {
        let Some(database) = self.database.take() else {
            return;
        };
        infra::tasks::block_on_own_runtime(async move {
            let _ = database.drop_database().await;
        });
    }
}

pub fn unique_username(stem: &str) -> String {
    format!("{stem}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Asserts a problem+json answer with `status` and `code`; returns its body.
pub async fn assert_problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "expected {status} {code}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("a JSON problem");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    body
}

/// An upstream that answers every request with what it received: method, path and query,
/// headers and body length, plus the response headers the gateway must pass back and two it
/// must drop. `/health` answers 200; paths under `/api/v1/slow` never answer.
pub struct EchoUpstream {
    pub url: String,
    /// Requests received, `/health` excepted.
    pub requests: Arc<AtomicUsize>,
    /// `/health` requests received.
    pub health_checks: Arc<AtomicUsize>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl EchoUpstream {
    pub async fn start() -> EchoUpstream {
        let requests = Arc::new(AtomicUsize::new(0));
        let health_checks = Arc::new(AtomicUsize::new(0));
        let (counter, health) = (requests.clone(), health_checks.clone());
        let router = axum::Router::new().fallback(move |request: Request| {
            let (counter, health) = (counter.clone(), health.clone());
            async move { echo(request, counter, health).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let (shutdown, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        EchoUpstream {
            url,
            requests,
            health_checks,
            shutdown: Some(shutdown),
        }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

async fn echo(request: Request, counter: Arc<AtomicUsize>, health: Arc<AtomicUsize>) -> Response {
    let path = request.uri().path().to_owned();
    if path == "/health" {
        health.fetch_add(1, Ordering::SeqCst);
        return axum::Json(json!({"status": "ok", "checks": {}})).into_response();
    }
    counter.fetch_add(1, Ordering::SeqCst);
    if path.starts_with("/api/v1/slow") {
        std::future::pending::<()>().await;
    }
    let method = request.method().to_string();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or("<binary>").to_owned(),
            )
        })
        .collect();
    let mut body = request.into_body().into_data_stream();
    let mut body_bytes = 0_usize;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(chunk) => body_bytes += chunk.len(),
            Err(_) => break,
        }
    }
    let mut response = axum::Json(json!({
        "method": method,
        "path_and_query": path_and_query,
        "headers": headers,
        "body_bytes": body_bytes,
    }))
    .into_response();
    for (name, value) in [
        ("x-cache", "HIT"),
        ("location", "/api/v1/transactions/echo"),
        ("x-ledger-position", "7.3"),
        ("idempotent-replayed", "true"),
        ("proxy-authenticate", "Basic realm=\"upstream\""),
        ("keep-alive", "timeout=5"),
    ] {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

/// Sends `head` (request line and headers, ending in a blank line) and then `body_chunks`
/// over a raw connection, ignoring write failures once the server has answered, and returns
/// the status code and the raw response head.
pub async fn raw_request(address: &str, head: &str, body_chunks: &[Vec<u8>]) -> (u16, String) {
    let host = address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .expect("connects");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("writes the head");
    for chunk in body_chunks {
        if stream.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer))
            .await
            .expect("the server answers within 10 s")
            .expect("reads");
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, text)
}
