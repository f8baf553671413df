//! Issue 11 at the gateway, in process: what needs the gateway's insides to prove (its hashing
//! queue, its clock, its migrations) rather than the running binaries that
//! `system-tests/tests/hostile.rs` attacks.

use std::borrow::Cow;
use std::time::Duration;

use gateway::clients::TrustedProxies;
use gateway::passwords::Passwords;
use gateway::routes::RoutingTable;
use infra::auth::{JwtVerifier, Role};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::migrate::Migrator;
use uuid::Uuid;

use crate::support::{
    EchoUpstream, Harness, PASSWORD, Setup, assert_problem, raw_request, unique_username,
};

fn verifier() -> JwtVerifier {
    JwtVerifier::new(&infra::testing::test_token_config()).expect("a verifier")
}

async fn login_body(harness: &Harness, username: &str) -> Value {
    let response = harness.login(username, PASSWORD).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("JSON")
}

async fn refresh(harness: &Harness, refresh_token: &str) -> reqwest::Response {
    harness
        .post_json(
            "/api/v1/auth/refresh",
            None,
            &json!({ "refresh_token": refresh_token }),
        )
        .await
}

#[tokio::test]
async fn a_refresh_renews_access_with_the_roles_the_user_has_now() {
    // Proves finding 6's mechanism: access tokens are short (ACCESS_TOKEN_TTL_SECONDS, here
    // 30) and a refresh mints the next one with the user's current roles, so a promotion, a
    // demotion or a disabled user (an empty role list: 403 user_disabled, for refresh and
    // login alike) reaches the client within one access token's life.
    let mut setup = Setup::default();
    setup.gateway.access_token_ttl_seconds = 30;
    let harness = Harness::start_with(setup).await;
    let username = unique_username("rita");
    let id = harness.register(&username).await;
    let body = login_body(&harness, &username).await;
    assert_eq!(body["expires_in"], 30);
    let first = verifier()
        .verify(body["access_token"].as_str().expect("a token"))
        .expect("verifies");
    assert_eq!(first.roles, vec![Role::Customer]);
    let refresh_token = body["refresh_token"].as_str().expect("a refresh token");
    let admin = harness.gateway.token(Uuid::new_v4(), &[Role::Admin]);
    let set_roles = |roles: Value| {
        let request = harness
            .client
            .put(harness.url(&format!("/api/v1/admin/users/{id}/roles")))
            .bearer_auth(&admin)
            .json(&json!({ "roles": roles }));
        async move { request.send().await.expect("answers").status() }
    };

    assert_eq!(set_roles(json!(["operator"])).await, StatusCode::OK);
    let response = refresh(&harness, refresh_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let renewed: Value = response.json().await.expect("JSON");
    let token = renewed["access_token"].as_str().expect("a token");
    let caller = verifier().verify(token).expect("verifies");
    assert_eq!(
        caller.roles,
        vec![Role::Operator],
        "the roles as they are now"
    );
    let claims = jsonwebtoken::dangerous::insecure_decode::<infra::auth::Claims>(token)
        .expect("decodes")
        .claims;
    assert_eq!(claims.exp - claims.iat, 30);

    assert_eq!(set_roles(json!([])).await, StatusCode::OK);
    assert_problem(
        refresh(&harness, refresh_token).await,
        StatusCode::FORBIDDEN,
        "user_disabled",
    )
    .await;
    assert_problem(
        harness.login(&username, PASSWORD).await,
        StatusCode::FORBIDDEN,
        "user_disabled",
    )
    .await;
    assert_problem(
        refresh(&harness, &"0".repeat(64)).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    harness.finish().await;
}

#[tokio::test]
async fn a_taken_name_costs_no_hashing_and_a_full_queue_answers_503() {
    // Proves finding 2's bounds on password work: a taken username is refused (409) before its
    // password is hashed; with every core busy and no room to queue, a login or registration
    // is refused at once with 503 hashing_busy and Retry-After instead of piling up.
    let passwords = Passwords::with_bounds(1, 0)
        .await
        .expect("the decoy hashes");
    let mut setup = Setup::default();
    setup.gateway.passwords = Some(passwords.clone());
    let harness = Harness::start_with(setup).await;
    let username = unique_username("tess");
    harness.register(&username).await;
    let before = passwords.hashes_started();
    let response = harness
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"username": username, "password": PASSWORD}),
        )
        .await;
    assert_problem(response, StatusCode::CONFLICT, "username_taken").await;
    assert_eq!(
        passwords.hashes_started(),
        before,
        "no hash for a taken name"
    );

    let busy = passwords.reserve().await.expect("the only core");
    let response = harness.login(&username, PASSWORD).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "hashing_busy").await;
    let response = harness
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"username": unique_username("uma"), "password": PASSWORD}),
        )
        .await;
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE, "hashing_busy").await;
    drop(busy);
    // A refused login was no failure: the owner is not nearer a lockout for it.
    harness.token(&username, PASSWORD).await;
    harness.finish().await;
}

#[tokio::test]
async fn logins_and_registrations_are_limited_per_address_successes_included() {
    // Proves finding 2's limits: every login counts per address, successful ones too (a client
    // that knows its password cannot loop argon2 work), and so do registrations; both answer
    // 429 with Retry-After and lift when their window ends.
    let mut setup = Setup::default();
    setup.gateway.login_attempts_per_address = 3;
    setup.gateway.registrations_per_address = 2;
    let harness = Harness::start_with(setup).await;
    let username = unique_username("vic");
    harness.register(&username).await;
    for _ in 0..2 {
        harness.token(&username, PASSWORD).await;
    }
    let response = harness.login(&username, "wrong password!!").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_problem(
        harness.login(&username, PASSWORD).await,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_login_attempts",
    )
    .await;
    harness.register(&unique_username("wes")).await;
    let response = harness
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"username": unique_username("xan"), "password": PASSWORD}),
        )
        .await;
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_registrations",
    )
    .await;
    harness.clock.advance(Duration::from_secs(3_600));
    harness.token(&username, PASSWORD).await;
    harness.register(&unique_username("yul")).await;
    harness.finish().await;
}

#[tokio::test]
async fn a_huge_username_is_refused_without_being_stored_or_hashed() {
    // Proves finding 8's memory half from the outside: a login with a 900 kB username is a
    // plain 401, costs no hashing, and leaves no failure charged to any real username.
    let passwords = Passwords::with_bounds(1, 0)
        .await
        .expect("the decoy hashes");
    let mut setup = Setup::default();
    setup.gateway.passwords = Some(passwords.clone());
    let harness = Harness::start_with(setup).await;
    let before = passwords.hashes_started();
    let huge = "a".repeat(900_000);
    let response = harness.login(&huge, PASSWORD).await;
    assert_problem(response, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(passwords.hashes_started(), before);
    harness.finish().await;
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    // Proves TRUSTED_PROXIES: from an untrusted peer a forged X-Forwarded-For changes nothing
    // (the limit follows the socket address); from a trusted proxy it names the client, so
    // clients behind one TLS terminator are limited one by one.
    let register_from = |harness: &Harness, address: &str| {
        let request = harness
            .client
            .post(harness.url("/api/v1/auth/register"))
            .header("X-Forwarded-For", address)
            .json(&json!({"username": unique_username("p"), "password": PASSWORD}));
        async move { request.send().await.expect("answers").status() }
    };
    let mut setup = Setup::default();
    setup.gateway.registrations_per_address = 1;
    let mut harness = Harness::start_with(setup).await;
    assert_eq!(
        register_from(&harness, "203.0.113.1").await,
        StatusCode::CREATED
    );
    assert_eq!(
        register_from(&harness, "203.0.113.2").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a forged header is no new address"
    );
    harness
        .restart_gateway(|options| {
            options.trusted_proxies = TrustedProxies::parse("127.0.0.1").expect("an address");
        })
        .await;
    assert_eq!(
        register_from(&harness, "203.0.113.3").await,
        StatusCode::CREATED
    );
    assert_eq!(
        register_from(&harness, "203.0.113.3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        register_from(&harness, "203.0.113.4").await,
        StatusCode::CREATED
    );
    harness.finish().await;
}

#[tokio::test]
async fn the_bootstrap_admin_is_marked_and_a_squatted_admin_name_stops_the_start() {
    // Proves finding 6's second half. Migration 0002 marks today's bootstrap admin (created by
    // the gateway: admin, no customer role, no name) and not a customer that registered a name
    // first and had admin appended to it. A gateway whose ADMIN_USERNAME is the marked admin
    // starts; one whose ADMIN_USERNAME is the squatter refuses to start, naming it, and the
    // squatter gets no admin role.
    let database = infra::db::ScratchDatabase::create(&gateway::testing::admin_url())
        .await
        .expect("a scratch database");
    let pool = infra::db::connect(&database.url(), gateway::startup::SCHEMA, 2, "test")
        .await
        .expect("connects");
    let mut first = Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations"
    )))
    .await
    .expect("the migrations load");
    first.migrations = Cow::Owned(
        first
            .iter()
            .filter(|migration| migration.version == 1)
            .cloned()
            .collect(),
    );
    infra::db::migrate(&pool, gateway::startup::SCHEMA, &first)
        .await
        .expect("migration 1 applies");
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g";
    let (admin_id, squatter_id) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, username, roles, name) in [
        (admin_id, "root", vec!["admin"], None),
        (
            squatter_id,
            "boss",
            vec!["customer", "admin"],
            Some("Mallory"),
        ),
    ] {
        sqlx::query(
            "INSERT INTO users (customer_id, username, password_hash, roles, name) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(username)
        .bind(hash)
        .bind(roles)
        .bind(name)
        .execute(&pool)
        .await
        .expect("a user of before the upgrade");
    }
    gateway::startup::migrate(&pool)
        .await
        .expect("the upgrade migrates");
    let marked: Vec<Uuid> =
        sqlx::query_scalar("SELECT customer_id FROM users WHERE bootstrap_admin")
            .fetch_all(&pool)
            .await
            .expect("reads");
    assert_eq!(marked, vec![admin_id]);

    let options = |username: &str| gateway::testing::TestOptions {
        admin: Some((
            username.to_owned(),
            "the configured admin password".to_owned(),
        )),
        ..gateway::testing::TestOptions::default()
    };
    let mut started = gateway::testing::spawn_app(&database.url(), &options("root"))
        .await
        .expect("the marked admin's gateway starts");
    started.stop().await;
    let refused = gateway::testing::spawn_app(&database.url(), &options("boss")).await;
    let message = match refused {
        Ok(_) => panic!("a gateway with a squatted ADMIN_USERNAME started"),
        Err(error) => error.to_string(),
    };
    assert!(message.contains(&squatter_id.to_string()), "{message}");
    assert!(message.contains("bootstrap admin"), "{message}");
    let roles: Vec<String> = sqlx::query_scalar("SELECT roles FROM users WHERE customer_id = $1")
        .bind(squatter_id)
        .fetch_one(&pool)
        .await
        .map(|roles: Vec<String>| roles)
        .expect("reads");
    assert_eq!(
        roles,
        vec!["customer", "admin"],
        "left as it was, not touched"
    );
    pool.close().await;
    database
        .drop_database()
        .await
        .expect("the scratch database drops");
}

#[tokio::test]
async fn ambiguous_paths_never_reach_an_upstream() {
    // Proves finding 4 at the edge: every way of writing a path as another is a 400
    // problem+json and the upstream sees none of them.
    let echo = EchoUpstream::start().await;
    let mut setup = Setup::default();
    setup.gateway.fraud_worker_url = Some(echo.url.clone());
    setup.gateway.query_api_url = Some(echo.url.clone());
    let harness = Harness::start_with(setup).await;
    let customer = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    for path in [
        r"/api/v1/accounts/x\..\..\..\..\metrics",
        "/api/v1/accounts/x%5C..%5C..%5Cmetrics",
        "/api/v1/accounts/x%2F..%2Fmetrics",
        "/api/v1/accounts/x%252e%252e",
        "/api/v1/accounts//x",
        "/api/v1/accounts/%00",
        "/api/v1/accounts/%C3%28",
    ] {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {customer}\r\n\r\n"
        );
        let (status, response) = raw_request(&harness.gateway.address, &head, &[]).await;
        assert_eq!(status, 400, "{path}: {response}");
        assert!(response.contains("application/problem+json"), "{response}");
    }
    assert_eq!(echo.count(), 0, "no ambiguous path was forwarded");
    harness.finish().await;
}

#[tokio::test]
async fn a_broken_request_body_is_the_clients_fault_and_names_no_upstream() {
    // Proves finding 9: a malformed chunked body is 400 invalid_body from the gateway, not a
    // 502 quoting the upstream's URL.
    let echo = EchoUpstream::start().await;
    let mut setup = Setup::default();
    setup.gateway.fraud_worker_url = Some(echo.url.clone());
    setup.gateway.routes =
        RoutingTable::parse("/api/v1/echo -> fraud-worker").expect("a valid table");
    let harness = Harness::start_with(setup).await;
    let token = harness.gateway.token(Uuid::new_v4(), &[Role::Customer]);
    let head = format!(
        "POST /api/v1/echo HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (status, response) = raw_request(
        &harness.gateway.address,
        &head,
        &[b"5\r\n{\"a\":\r\nnot-a-chunk-size\r\n\r\n".to_vec()],
    )
    .await;
    assert_eq!(status, 400, "{response}");
    let port = echo.url.rsplit(':').next().unwrap_or_default();
    assert!(
        !response.contains(port),
        "the upstream's address leaked: {response}"
    );
    harness.finish().await;
}

#[tokio::test]
async fn health_is_answered_from_a_one_second_cache() {
    // Proves finding 9: the public, unauthenticated /health does not fan out to every
    // dependency on each call; ten calls in a row ask each upstream far fewer than ten times.
    let echo = EchoUpstream::start().await;
    let mut setup = Setup::default();
    setup.gateway.command_api_url = Some(echo.url.clone());
    setup.gateway.query_api_url = Some(echo.url.clone());
    setup.gateway.fraud_worker_url = Some(echo.url.clone());
    let harness = Harness::start_with(setup).await;
    for _ in 0..10 {
        let response = harness.get("/health", None).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let checks = echo.health_checks.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        checks < 3 * 10,
        "{checks} upstream checks for ten calls: not cached"
    );
    assert!(checks >= 3, "the first call asks each upstream");
    harness.finish().await;
}
