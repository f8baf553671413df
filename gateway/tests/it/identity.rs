//! Identity through the gateway (SPEC §5): registration, tokens, failed-login limits, roles,
//! and the admin ensured at start.

use std::time::Duration;

use gateway::testing::TEST_JWT_SECRET;
use infra::auth::{Claims, JwtVerifier, Role};
use jsonwebtoken::{DecodingKey, Validation};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Harness, PASSWORD, Setup, assert_problem, unique_username};

const ADMIN_USERNAME: &str = "root_admin";
const ADMIN_PASSWORD: &str = "the admin's long password";

fn with_admin() -> Setup {
    let mut setup = Setup::default();
    setup.gateway.admin = Some((ADMIN_USERNAME.to_owned(), ADMIN_PASSWORD.to_owned()));
    setup
}

#[tokio::test]
async fn a_registered_customer_gets_a_token_naming_it_with_the_customer_role() {
    // Proves register → 201 {customer_id, username} and token → 200 with an HS256 JWT whose
    // sub is the customer id, roles [customer], exp − iat = JWT_TTL_SECONDS and a jti.
    let harness = Harness::start().await;
    let username = unique_username("alice");
    let response = harness
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"username": username, "password": PASSWORD, "name": "Alice Example"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["username"], username.as_str());
    let customer_id = Uuid::parse_str(body["customer_id"].as_str().expect("an id")).expect("UUID");
    assert_eq!(body.as_object().expect("an object").len(), 2, "{body}");

    let response = harness.login(&username, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(
        body["expires_in"], 600,
        "the test gateway's access token lifetime"
    );
    assert_eq!(
        body["refresh_expires_in"], 900,
        "a login lasts JWT_TTL_SECONDS"
    );
    assert!(
        body["refresh_token"]
            .as_str()
            .is_some_and(|token| token.len() == 64)
    );
    let token = body["access_token"].as_str().expect("a token");
    let verifier = JwtVerifier::new(&infra::testing::test_token_config()).expect("a verifier");
    let caller = verifier
        .verify(token)
        .expect("the gateway's token verifies");
    assert_eq!(caller.subject, customer_id);
    assert_eq!(caller.roles, vec![Role::Customer]);
    let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["ledger-api"]);
    let claims = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(TEST_JWT_SECRET.as_bytes()),
        &validation,
    )
    .expect("decodes")
    .claims;
    assert_eq!(claims.exp - claims.iat, 600);
    assert_eq!(
        (claims.iss.as_str(), claims.aud.as_str()),
        ("ledger", "ledger-api")
    );
    assert_eq!(claims.nbf, claims.iat);
    assert!(!claims.jti.is_empty());
    harness.finish().await;
}

#[tokio::test]
async fn bad_registrations_get_400_and_a_taken_username_409() {
    // Proves the identity rules of SPEC §5: usernames [a-z0-9_.-]{3,32}, passwords 12–128
    // characters, unknown fields refused; the same username twice is 409.
    let harness = Harness::start().await;
    let username = unique_username("bob");
    let cases = [
        (
            json!({"username": "Bob", "password": PASSWORD}),
            "invalid_username",
        ),
        (
            json!({"username": "bo", "password": PASSWORD}),
            "invalid_username",
        ),
        (
            json!({"username": "a".repeat(33), "password": PASSWORD}),
            "invalid_username",
        ),
        (
            json!({"username": "bob smith", "password": PASSWORD}),
            "invalid_username",
        ),
        (
            json!({"username": username, "password": "eleven char"}),
            "invalid_password",
        ),
        (
            json!({"username": username, "password": "p".repeat(129)}),
            "invalid_password",
        ),
        (
            json!({"username": username, "password": PASSWORD, "admin": true}),
            "unknown_field",
        ),
        (json!({"username": username}), "invalid_body"),
        (
            json!({"username": username, "password": PASSWORD, "name": "a\nb"}),
            "invalid_name",
        ),
    ];
    for (body, code) in cases {
        let response = harness
            .post_json("/api/v1/auth/register", None, &body)
            .await;
        assert_problem(response, StatusCode::BAD_REQUEST, code).await;
    }
    harness.register(&username).await;
    let again = harness
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"username": username, "password": "another long password"}),
        )
        .await;
    assert_problem(again, StatusCode::CONFLICT, "username_taken").await;
    harness.finish().await;
}

#[tokio::test]
async fn an_unknown_user_and_a_wrong_password_get_the_same_401() {
    // Proves the token route does not reveal which usernames exist: same status, code and
    // detail; and that a bad body is a 400, not a failed login.
    let harness = Harness::start().await;
    let username = unique_username("carol");
    harness.register(&username).await;
    let wrong = assert_problem(
        harness.login(&username, "not the right password").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let unknown = assert_problem(
        harness.login(&unique_username("nobody"), PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    assert_eq!(wrong, unknown);
    let response = harness
        .post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": username, "password": PASSWORD, "scope": "all"}),
        )
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST, "unknown_field").await;
    harness.finish().await;
}

#[tokio::test]
async fn failed_logins_per_username_are_limited_until_the_window_ends() {
    // Proves 10 failures per username (from one address) per minute: the 11th attempt is 429
    // with Retry-After,
    // even with the right password, other usernames are unaffected, and the limit lifts when
    // the window ends (the limiter's clock is moved, not waited for).
    let harness = Harness::start().await;
    let username = unique_username("dave");
    let other = unique_username("erin");
    harness.register(&username).await;
    harness.register(&other).await;
    for _ in 0..10 {
        let response = harness.login(&username, "wrong password!!").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    harness.clock.advance(Duration::from_secs(15));
    let response = harness.login(&username, PASSWORD).await;
    assert_eq!(
        response.headers()["retry-after"].to_str().expect("ASCII"),
        "45"
    );
    assert_problem(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_login_failures",
    )
    .await;
    harness.token(&other, PASSWORD).await;
    harness.clock.advance(Duration::from_secs(45));
    harness.token(&username, PASSWORD).await;
    harness.finish().await;
}

#[tokio::test]
async fn failed_logins_per_address_are_limited_across_usernames() {
    // Proves the per-address limit (configured to 3 here to keep the test short; 100 by
    // default): after three failures from one address with different usernames, a fourth
    // username is refused with 429 before any password is checked.
    let mut setup = Setup::default();
    setup.gateway.login_failures_per_address = 3;
    let harness = Harness::start_with(setup).await;
    let username = unique_username("frank");
    harness.register(&username).await;
    for _ in 0..3 {
        let response = harness.login(&unique_username("ghost"), PASSWORD).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = harness.login(&username, PASSWORD).await;
    assert_eq!(
        response.headers()["retry-after"].to_str().expect("ASCII"),
        "60"
    );
    assert_problem(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_login_failures",
    )
    .await;
    harness.clock.advance(Duration::from_secs(60));
    harness.token(&username, PASSWORD).await;
    harness.finish().await;
}

#[tokio::test]
async fn admins_set_roles_and_everyone_else_is_refused() {
    // Proves PUT /api/v1/admin/users/{id}/roles: 200 with the user for an admin, the new
    // roles in the user's next token; 400 for an unknown role, an unknown field or a bad id;
    // 404 for an unknown user; 401 without a token; 403 for a customer.
    let harness = Harness::start_with(with_admin()).await;
    let admin = harness.token(ADMIN_USERNAME, ADMIN_PASSWORD).await;
    let username = unique_username("grace");
    let customer_id = harness.register(&username).await;
    let path = format!("/api/v1/admin/users/{customer_id}/roles");
    let put = |token: Option<String>, path: String, body: Value| {
        let mut request = harness.client.put(harness.url(&path)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.expect("the gateway answers") }
    };
    let response = put(
        Some(admin.clone()),
        path.clone(),
        json!({"roles": ["auditor", "customer", "auditor"]}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(
        body,
        json!({"customer_id": customer_id, "username": username, "roles": ["auditor", "customer"]})
    );
    let token = harness.token(&username, PASSWORD).await;
    let verifier = JwtVerifier::new(&infra::testing::test_token_config()).expect("a verifier");
    let caller = verifier.verify(&token).expect("verifies");
    assert!(caller.has(Role::Auditor) && caller.has(Role::Customer));

    let refusals = [
        (
            Some(admin.clone()),
            path.clone(),
            json!({"roles": ["root"]}),
            StatusCode::BAD_REQUEST,
            "unknown_role",
        ),
        (
            Some(admin.clone()),
            path.clone(),
            json!({"roles": [], "x": 1}),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Some(admin.clone()),
            "/api/v1/admin/users/not-a-uuid/roles".to_owned(),
            json!({"roles": []}),
            StatusCode::BAD_REQUEST,
            "invalid_customer_id",
        ),
        (
            Some(admin.clone()),
            format!("/api/v1/admin/users/{}/roles", Uuid::new_v4()),
            json!({"roles": ["admin"]}),
            StatusCode::NOT_FOUND,
            "user_not_found",
        ),
        (
            None,
            path.clone(),
            json!({"roles": ["admin"]}),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            Some(token),
            path.clone(),
            json!({"roles": ["admin"]}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
    ];
    for (token, path, body, status, code) in refusals {
        assert_problem(put(token, path, body).await, status, code).await;
    }
    harness.finish().await;
}

#[tokio::test]
async fn the_configured_admin_is_ensured_at_every_start() {
    // Proves the admin of ADMIN_USERNAME/ADMIN_PASSWORD exists after start with the admin
    // role, that a restart with another password makes that one the admin's password (the old
    // one stops working), and that an admin role taken away in between is given back.
    let mut harness = Harness::start_with(with_admin()).await;
    let admin = harness.token(ADMIN_USERNAME, ADMIN_PASSWORD).await;
    let verifier = JwtVerifier::new(&infra::testing::test_token_config()).expect("a verifier");
    let admin_id = verifier.verify(&admin).expect("verifies").subject;
    assert!(verifier.verify(&admin).expect("verifies").has(Role::Admin));
    sqlx::query("UPDATE gateway.users SET roles = ARRAY['auditor'] WHERE customer_id = $1")
        .bind(admin_id)
        .execute(&harness.gateway.pool)
        .await
        .expect("roles change");
    let new_password = "a brand new admin password";
    harness
        .restart_gateway(|options| {
            options.admin = Some((ADMIN_USERNAME.to_owned(), new_password.to_owned()));
        })
        .await;
    let response = harness.login(ADMIN_USERNAME, ADMIN_PASSWORD).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let token = harness.token(ADMIN_USERNAME, new_password).await;
    let caller = verifier.verify(&token).expect("verifies");
    assert_eq!(caller.subject, admin_id, "the same user, not a new one");
    assert!(caller.has(Role::Admin) && caller.has(Role::Auditor));
    harness.finish().await;
}
