//! The HTTP surface: the rules listing behind admin/auditor tokens, `/health`, `/metrics` and
//! problem+json for everything else.

use std::time::Duration;

use domain::AccountId;
use fraud_worker::rules::RuleName;
use fraud_worker::testing::{TestOptions, TestPayment, spawn_app};
use infra::auth::{JwtSigner, Role};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

async fn get(url: &str, token: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("the worker answers")
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_rules_are_listed_to_admins_and_auditors_only() {
    // Proves `GET /api/v1/fraud/rules`: 401 with WWW-Authenticate for a missing, malformed or
    // wrongly signed token, 403 for a customer, and for admins and auditors every rule with
    // whether it is on and its effective parameters.
    let options = TestOptions {
        amount_thresholds: vec![("JPY", 1_500_000)],
        velocity_window_seconds: 300,
        rules_disabled: vec![RuleName::Velocity],
        ..TestOptions::default()
    };
    let app = spawn_app(&options).await.expect("the worker starts");
    let url = format!("{}/api/v1/fraud/rules", app.address);
    let forged = JwtSigner::new(&infra::auth::TokenConfig::with_secret(
        "another-secret-that-is-long-enough-too!!XYZ",
    ))
    .expect("long enough")
    .mint(
        Uuid::new_v4(),
        &[Role::Admin],
        chrono::Utc::now().timestamp(),
        600,
    )
    .expect("signs");
    for token in [None, Some("not-a-token"), Some(forged.as_str())] {
        let response = get(&url, token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        assert!(response.headers().contains_key("www-authenticate"));
        assert_eq!(content_type(&response), "application/problem+json");
    }
    let customer = app.token(Uuid::new_v4(), &[Role::Customer]);
    let response = get(&url, Some(&customer)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(content_type(&response), "application/problem+json");

    for role in [Role::Admin, Role::Auditor] {
        let token = app.token(Uuid::new_v4(), &[role]);
        let response = get(&url, Some(&token)).await;
        assert_eq!(response.status(), StatusCode::OK, "{role:?}");
        let body: Value = response.json().await.expect("a JSON body");
        let rules = body["rules"].as_array().expect("a list of rules");
        assert_eq!(rules.len(), 2, "{body}");
        let threshold = &rules[0];
        assert_eq!(threshold["name"], "amount_threshold");
        assert_eq!(threshold["enabled"], true);
        assert!(
            threshold["description"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
        );
        assert_eq!(threshold["parameters"]["default_threshold"], "10000");
        assert_eq!(
            threshold["parameters"]["currency_overrides"]["JPY"],
            "1500000"
        );
        assert_eq!(threshold["parameters"]["thresholds"]["JPY"], "1500000");
        assert_eq!(threshold["parameters"]["thresholds"]["USD"], "10000.00");
        let velocity = &rules[1];
        assert_eq!(velocity["name"], "velocity");
        assert_eq!(velocity["enabled"], false);
        assert_eq!(velocity["parameters"]["window_seconds"], 300);
        assert_eq!(velocity["parameters"]["limits"]["USD"], "50000.00");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn health_checks_the_broker_and_redis() {
    // Proves `/health` with everything up: 200 `ok`, naming the broker and Redis.
    let app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let response = get(&format!("{}/health", app.address), None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-correlation-id"));
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["checks"]["broker"], "ok", "{body}");
    assert_eq!(body["checks"]["redis"], "ok", "{body}");
    app.cleanup().await;
}

#[tokio::test]
async fn metrics_count_decisions_and_unknown_routes_are_problems() {
    // Proves `/metrics` exposes the worker's counters once a message was handled, and that
    // unknown paths and methods answer problem+json.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let payment = TestPayment::deposit("10.00", "USD", AccountId(Uuid::new_v4()));
    app.decide(&payment.event("corr-metrics")).await;
    // The worker counts a message after its decision is confirmed and the message acked, which
    // can be a moment after the decision reaches us: poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = get(&format!("{}/metrics", app.address), None).await;
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.expect("a text body");
        if text.contains("fraud_decisions_total") && text.contains("fraud_messages_total") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the counters never appeared: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let response = get(&format!("{}/api/v1/nothing-here", app.address), None).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(content_type(&response), "application/problem+json");
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/fraud/rules", app.address))
        .send()
        .await
        .expect("the worker answers");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(content_type(&response), "application/problem+json");
    app.cleanup().await;
}
