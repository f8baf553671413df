//! `GET /health` of the gateway (SPEC §5, docs/decisions.md §13): the database is required,
//! each upstream of the routing table is reported by name and makes the gateway `degraded`
//! (still 200) when it is down.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{EchoUpstream, Harness, Setup};

#[tokio::test]
async fn health_is_ok_with_every_upstream_up_and_degraded_with_one_down() {
    // Proves the aggregation: all up → 200 ok naming each check; the fraud worker down (a
    // closed port) → 200 degraded with that check down.
    let echo = EchoUpstream::start().await;
    let mut setup = Setup::default();
    setup.gateway.command_api_url = Some(echo.url.clone());
    setup.gateway.query_api_url = Some(echo.url.clone());
    setup.gateway.fraud_worker_url = Some(echo.url.clone());
    let mut harness = Harness::start_with(setup).await;
    let response = harness.get("/health", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(
        body,
        json!({"status": "ok", "checks": {"database": "ok", "command-api": "ok",
                                          "projector": "ok", "fraud-worker": "ok"}})
    );
    harness
        .restart_gateway(|options| options.fraud_worker_url = None)
        .await;
    let response = harness.get("/health", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"]["fraud-worker"], "down");
    assert_eq!(body["checks"]["command-api"], "ok");
    harness.finish().await;
}

#[tokio::test]
async fn health_is_503_without_the_database() {
    // Proves the database is required: once the gateway's database is gone, /health is 503.
    let mut harness = Harness::start().await;
    assert!(harness.database().is_some());
    harness.drop_database().await;
    let response = harness.get("/health", None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["checks"]["database"], "down");
    harness.finish().await;
}
