//! Authentication and roles at the edge (SPEC §5): the gateway refuses before forwarding.
//! The upstreams here are closed ports, so any answer other than 401/403 would have been a 503
//! from the proxy: these refusals are the gateway's own.

use gateway::testing::TEST_JWT_SECRET;
use infra::auth::Role;
use infra::testing::{customer_claims, sign_token};
use jsonwebtoken::Algorithm;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::support::{Harness, assert_problem, raw_request};

#[tokio::test]
async fn every_bad_token_gets_401_with_a_challenge_at_the_edge() {
    // Proves SPEC §5's token rules through the gateway: missing, malformed, expired, wrongly
    // signed, alg:none and other-algorithm (HS384) tokens get 401 with WWW-Authenticate.
    let harness = Harness::start().await;
    let subject = Uuid::new_v4();
    let valid = sign_token(
        Algorithm::HS256,
        TEST_JWT_SECRET,
        &customer_claims(subject, 300),
    );
    let payload = valid.split('.').nth(1).expect("three parts").to_owned();
    let cases = [
        ("missing", None),
        ("malformed", Some("not.a.token".to_owned())),
        ("not bearer", Some(String::new())),
        (
            "expired",
            Some(sign_token(
                Algorithm::HS256,
                TEST_JWT_SECRET,
                &customer_claims(subject, -3600),
            )),
        ),
        (
            "wrong signature",
            Some(sign_token(
                Algorithm::HS256,
                "another-secret-of-at-least-32-bytes!!",
                &customer_claims(subject, 300),
            )),
        ),
        (
            "alg none",
            Some(format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")),
        ),
        (
            "HS384",
            Some(sign_token(
                Algorithm::HS384,
                TEST_JWT_SECRET,
                &customer_claims(subject, 300),
            )),
        ),
    ];
    for (case, token) in cases {
        let mut request = harness
            .client
            .post(harness.url("/api/v1/accounts"))
            .json(&json!({"currency": "USD"}));
        request = match (case, token) {
            ("not bearer", _) => request.header("Authorization", "Basic dXNlcjpwYXNz"),
            (_, Some(token)) => request.bearer_auth(token),
            (_, None) => request,
        };
        let response = request.send().await.expect("the gateway answers");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{case}: a challenge"
        );
        assert_problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    harness.finish().await;
}

#[tokio::test]
async fn the_tables_roles_are_required_at_the_edge() {
    // Proves 403 from the gateway itself: a customer on /api/v1/fraud/rules (admin or auditor
    // only). An auditor gets past the edge to the (down) fraud worker: 503.
    let harness = Harness::start().await;
    let customer = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    let auditor = harness.gateway.token(Uuid::new_v4(), &[Role::Auditor]);
    let response = harness.get("/api/v1/fraud/rules", Some(&customer)).await;
    assert_problem(response, StatusCode::FORBIDDEN, "forbidden").await;
    let response = harness.get("/api/v1/fraud/rules", Some(&auditor)).await;
    assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream_unavailable",
    )
    .await;
    harness.finish().await;
}

#[tokio::test]
async fn unknown_paths_get_404_and_unrouted_methods_405() {
    // Proves the table's answers for what it does not route: unknown /api/v1 paths 404
    // (also under a prefix the gateway answers itself), a method no entry takes 405, all as
    // problem+json; and the public routes need no token.
    let harness = Harness::start().await;
    let admin = harness.gateway.token(Uuid::new_v4(), &[Role::Admin]);
    for path in [
        "/api/v1/nothing",
        "/api/v1/auth/unknown",
        "/api/v1/accountsx",
        "/elsewhere",
    ] {
        let response = harness.get(path, Some(&admin)).await;
        assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    let response = harness
        .client
        .delete(harness.url("/api/v1/accounts/1"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("answers");
    assert_eq!(
        response.headers()["allow"],
        "GET, HEAD, POST",
        "a 405 says what the prefix takes (RFC 9110)"
    );
    assert_problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    for path in ["/health", "/api/v1/openapi.json"] {
        let response = harness.get(path, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    // Metrics are on their own listener (METRICS_ADDR), never on the public one.
    let response = harness.get("/metrics", None).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = harness
        .client
        .get(format!("{}/metrics", harness.gateway.metrics_address))
        .send()
        .await
        .expect("the metrics listener answers");
    assert_eq!(response.status(), StatusCode::OK);
    harness.finish().await;
}

#[tokio::test]
async fn dot_segments_cannot_move_a_request_past_the_tables_rules() {
    // Proves a path the proxy's URL would normalise into another prefix is refused (400)
    // rather than routed by one entry and delivered to another path: here a customer's way
    // around the fraud routes' roles.
    let harness = Harness::start().await;
    let customer = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    for path in [
        "/api/v1/accounts/../fraud/rules",
        "/api/v1/accounts/%2e%2e/fraud/rules",
    ] {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {customer}\r\n\r\n"
        );
        let (status, response) = raw_request(&harness.gateway.address, &head, &[]).await;
        assert_eq!(status, 400, "{path}: {response}");
        assert!(response.contains("application/problem+json"), "{response}");
    }
    harness.finish().await;
}
