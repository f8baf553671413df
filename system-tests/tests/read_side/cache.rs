//! The cache of `GET /api/v1/transactions/{id}` (SPEC §5) through the real services: written
//! through by the projector before each batch commits, refilled on a miss, authorized on a hit,
//! and optional. (The cache seam's conformance suite is in projector's own tests.)

use std::time::Duration;

use domain::FraudOutcome;
use infra::auth::Role;
use projector::testing::TestOptions;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::support::{Harness, RedisProxy, eventually};

/// A GET of one transaction: status, `X-Cache` and body.
async fn get_transaction(harness: &Harness, id: Uuid, token: &str) -> (StatusCode, String, Value) {
    let response = harness
        .get(&format!("/api/v1/transactions/{id}"), Some(token), None)
        .await;
    let status = response.status();
    let cache = response
        .headers()
        .get("x-cache")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, cache, body)
}

async fn projected_status(harness: &Harness, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM projector.transactions WHERE id = $1")
        .bind(id)
        .fetch_optional(&harness.projector.pool)
        .await
        .expect("reading the read model")
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_refilled_on_a_miss_and_never_behind_the_read_model() {
    // Proves the cache's contract: the projector writes each change through (a fresh
    // transaction is a hit at once), a miss refills the entry, a PENDING entry is replaced by
    // CONFIRMED no later than the read model changes, and a hit is authorized like a miss.
    let harness = Harness::start().await;
    let (_, token) = harness.customer();
    let (_, stranger) = harness.customer();
    let source = harness.open_account(&token, "USD").await;
    let destination = harness.open_account(&token, "USD").await;
    harness.fund(source, "100.00", "USD").await;
    let (transfer, position) = harness
        .transact(
            &token,
            serde_json::json!({"type": "transfer", "amount": "7.00", "currency": "USD",
                "source_account_id": source, "destination_account_id": destination}),
        )
        .await;
    let response = harness
        .get_at(
            &format!("/api/v1/transactions/{transfer}"),
            &token,
            &position,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["x-cache"],
        "HIT",
        "written through by the projector"
    );

    // The saga reserves the funds next, and the projector writes that through too; once it is
    // projected nothing writes this entry until the fraud decision, so the flush below is the
    // last word and the next read must miss.
    harness.wait_event(transfer, "FundsReserved").await;
    harness.caught_up().await;
    harness
        .projector
        .flush_cache()
        .await
        .expect("the cache flushes");
    let (status, cache, body) = get_transaction(&harness, transfer, &token).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "MISS"));
    assert_eq!(body["status"], "PENDING");
    let (status, cache, body) = get_transaction(&harness, transfer, &token).await;
    assert_eq!(
        (status, cache.as_str()),
        (StatusCode::OK, "HIT"),
        "refilled"
    );
    assert_eq!(body["status"], "PENDING");

    harness.decide(transfer, FraudOutcome::Approved).await;
    eventually(Duration::from_secs(10), || async {
        projected_status(&harness, transfer).await == "CONFIRMED"
    })
    .await;
    let (status, cache, body) = get_transaction(&harness, transfer, &token).await;
    assert_eq!((status, cache.as_str()), (StatusCode::OK, "HIT"));
    assert_eq!(
        body["status"], "CONFIRMED",
        "the cache hides the confirmation"
    );

    let (status, cache, _) = get_transaction(&harness, transfer, &stranger).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a cached row is shown to a stranger"
    );
    assert_eq!(cache, "");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_reads_come_from_postgres_and_health_is_degraded() {
    // Proves the cache is optional: with Redis unreachable the projector still projects and
    // answers from PostgreSQL (X-Cache: MISS, never a 500), and /health is 200 "degraded"
    // naming the cache as down.
    let harness = Harness::start_with(TestOptions {
        redis_url: Some("redis://127.0.0.1:1".to_owned()),
        ..TestOptions::default()
    })
    .await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "EUR").await;
    let deposit = harness.fund(account, "10.00", "EUR").await;
    harness.caught_up().await;
    for _ in 0..3 {
        let (status, cache, body) = get_transaction(&harness, deposit, &token).await;
        assert_eq!((status, cache.as_str()), (StatusCode::OK, "MISS"), "{body}");
        assert_eq!(body["status"], "CONFIRMED");
    }
    let response = harness.get("/health", None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let health: Value = response.json().await.expect("a health report");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["checks"]["cache"], "down", "{health}");
    assert_eq!(health["checks"]["database"], "ok", "{health}");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_missed_a_write_during_an_outage_is_not_served_afterwards() {
    // Proves "a cached PENDING never hides a CONFIRMED" across a Redis outage: the entry is
    // cached as PENDING, Redis goes away while the confirmation is projected (the write-through
    // fails), Redis comes back with the old entry still in it; no GET may answer PENDING then.
    let mut proxy = RedisProxy::start().await;
    let harness = Harness::start_with(TestOptions {
        redis_url: Some(proxy.url()),
        ..TestOptions::default()
    })
    .await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    let (deposit, position) = harness
        .transact(
            &harness.token_with(Role::Operator),
            serde_json::json!({"type": "deposit", "amount": "3.00", "currency": "USD",
                "destination_account_id": account}),
        )
        .await;
    let response = harness
        .get_at(
            &format!("/api/v1/transactions/{deposit}"),
            &token,
            &position,
        )
        .await;
    assert_eq!(response.headers()["x-cache"], "HIT");

    proxy.cut().await;
    harness.decide(deposit, FraudOutcome::Approved).await;
    harness.wait_settled(&[deposit]).await;
    harness.caught_up().await;
    proxy.restore().await;
    // Until the cache answers again, reads come from PostgreSQL; after, from Redis.
    eventually(Duration::from_secs(10), || async {
        let response = harness.get("/health", None, None).await;
        let health: Value = response.json().await.unwrap_or_default();
        health["checks"]["cache"] == "ok"
    })
    .await;
    for _ in 0..3 {
        let (status, _, body) = get_transaction(&harness, deposit, &token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body["status"], "CONFIRMED",
            "a stale cache entry outlived the outage"
        );
    }
    harness.finish().await;
}
