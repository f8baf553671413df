//! The reverse proxy (SPEC §5, §6): requests reach the right upstream with their path, query
//! and end-to-end headers; hop-by-hop headers are dropped both ways; the correlation id is
//! forwarded; failures of the upstream become quick problem+json answers. (Through the real
//! command-api, projector and fraud worker: `system-tests/tests/edge/proxy.rs`.)

use std::time::{Duration, Instant};

use gateway::routes::RoutingTable;
use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{EchoUpstream, Harness, Setup, assert_problem, raw_request};

/// A table that sends `/api/v1/echo` and `/api/v1/slow` to the echo upstream (configured as
/// the fraud worker's address).
fn echo_setup(echo: &EchoUpstream) -> Setup {
    let mut setup = Setup::default();
    setup.gateway.fraud_worker_url = Some(echo.url.clone());
    setup.gateway.routes = RoutingTable::parse(
        "/api/v1/echo -> fraud-worker; /api/v1/slow -> fraud-worker; \
         /api/v1/fraud -> fraud-worker roles=admin,auditor",
    )
    .expect("a valid table");
    setup
}

#[tokio::test]
async fn requests_are_forwarded_unchanged_with_forwarding_headers_and_no_hop_by_hop_ones() {
    // Proves what crosses the proxy: method, path and query unchanged; Authorization,
    // Idempotency-Key, X-Ledger-Position and the client's correlation id up, with
    // X-Forwarded-For/-Proto added and Connection-named, Keep-Alive, TE and
    // Proxy-Authorization dropped; X-Cache, Location, X-Ledger-Position and
    // Idempotent-Replayed back, Proxy-Authenticate and Keep-Alive dropped.
    let echo = EchoUpstream::start().await;
    let harness = Harness::start_with(echo_setup(&echo)).await;
    let token = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    let response = harness
        .client
        .post(harness.url("/api/v1/echo/things?b=2&a=%20x&a=3"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "key-1")
        .header("X-Ledger-Position", "41.7")
        .header("X-Correlation-ID", "trace-me.1")
        .header("Connection", "x-hop-secret")
        .header("X-Hop-Secret", "do not forward")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Authorization", "Basic abc")
        .header("TE", "trailers")
        .json(&json!({"hello": "world"}))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["x-correlation-id"], "trace-me.1");
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(headers["location"], "/api/v1/transactions/echo");
    assert_eq!(headers["x-ledger-position"], "7.3");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert!(!headers.contains_key("proxy-authenticate"));
    assert!(!headers.contains_key("keep-alive"));
    let seen: Value = response.json().await.expect("the echo");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path_and_query"], "/api/v1/echo/things?b=2&a=%20x&a=3");
    assert_eq!(seen["body_bytes"], 17);
    let upstream = &seen["headers"];
    assert_eq!(upstream["authorization"], format!("Bearer {token}"));
    assert_eq!(upstream["idempotency-key"], "key-1");
    assert_eq!(upstream["x-ledger-position"], "41.7");
    assert_eq!(upstream["x-correlation-id"], "trace-me.1");
    assert_eq!(upstream["x-forwarded-for"], "127.0.0.1");
    assert_eq!(upstream["x-forwarded-proto"], "http");
    assert_eq!(upstream["content-type"], "application/json");
    for dropped in ["x-hop-secret", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            upstream.get(dropped).is_none(),
            "{dropped} reached the upstream: {upstream}"
        );
    }
    assert_eq!(echo.count(), 1);
    harness.finish().await;
}

#[tokio::test]
async fn a_down_upstream_answers_503_in_well_under_two_seconds() {
    // Proves "an upstream down → 502/503 problem+json quickly, never a hang": the fraud
    // worker's address is a closed port; the refused connection is answered at once.
    let harness = Harness::start().await;
    let admin = harness.gateway.token(Uuid::new_v4(), &[Role::Admin]);
    let started = Instant::now();
    let response = harness.get("/api/v1/fraud/rules", Some(&admin)).await;
    let elapsed = started.elapsed();
    assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_unavailable",
    )
    .await;
    assert!(elapsed < Duration::from_millis(1_000), "took {elapsed:?}");
    harness.finish().await;
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_a_504() {
    // Proves the overall upstream timeout (1 s here, 30 s by default): 504 problem+json.
    let echo = EchoUpstream::start().await;
    let mut setup = echo_setup(&echo);
    setup.gateway.upstream_timeout_seconds = 1;
    let harness = Harness::start_with(setup).await;
    let token = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    let response = harness.get("/api/v1/slow/thing", Some(&token)).await;
    assert_problem(response, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;
    harness.finish().await;
}

#[tokio::test]
async fn bodies_over_one_mebibyte_are_refused_with_413() {
    // Proves the body limit: a Content-Length over 1 MiB is refused before the upstream is
    // contacted (the echo upstream counts no request, and the body is never sent); a chunked
    // body that grows past 1 MiB is cut off and answered 413 too.
    let echo = EchoUpstream::start().await;
    let harness = Harness::start_with(echo_setup(&echo)).await;
    let token = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    let head = format!(
        "POST /api/v1/echo HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        1024 * 1024 + 1
    );
    let (status, response) = raw_request(&harness.gateway.address, &head, &[]).await;
    assert_eq!(status, 413, "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert_eq!(echo.count(), 0, "the upstream was never contacted");

    let head = format!(
        "POST /api/v1/echo HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk_bytes = 256 * 1024;
    let mut chunk = format!("{chunk_bytes:x}\r\n").into_bytes();
    chunk.extend(std::iter::repeat_n(b'x', chunk_bytes));
    chunk.extend_from_slice(b"\r\n");
    let chunks = vec![chunk; 6];
    let (status, response) = raw_request(&harness.gateway.address, &head, &chunks).await;
    assert_eq!(status, 413, "{response}");
    harness.finish().await;
}
