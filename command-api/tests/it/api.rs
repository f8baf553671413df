//! The HTTP contract of the two commands (SPEC §5): authentication, validation, ownership and
//! idempotency. Every refused request must leave the event store untouched.

use infra::auth::Role;
use infra::testing::{customer_claims, sign_token};
use jsonwebtoken::Algorithm;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::Harness;

#[tokio::test]
async fn every_bad_token_gets_401_with_a_challenge() {
    // Proves SPEC §5's token rules: missing, malformed, expired, wrongly signed, alg:none and
    // other-algorithm tokens are refused with 401 and WWW-Authenticate, and append nothing.
    let harness = Harness::start().await;
    let secret = command_api::testing::TEST_JWT_SECRET;
    let subject = Uuid::new_v4();
    let valid = sign_token(Algorithm::HS256, secret, &customer_claims(subject, 300));
    let payload = valid.split('.').nth(1).expect("three parts").to_owned();
    let mut no_exp = serde_json::to_value(customer_claims(subject, 300)).expect("claims serialise");
    no_exp.as_object_mut().expect("an object").remove("exp");
    let no_exp = sign_token(Algorithm::HS256, secret, &no_exp);
    let bad_tokens = [
        ("malformed", Some("not.a.token".to_owned())),
        (
            "expired",
            Some(sign_token(
                Algorithm::HS256,
                secret,
                &customer_claims(subject, -3600),
            )),
        ),
        (
            "wrong secret",
            Some(sign_token(
                Algorithm::HS256,
                "another-secret-another-secret-another",
                &customer_claims(subject, 300),
            )),
        ),
        (
            "HS384",
            Some(sign_token(
                Algorithm::HS384,
                secret,
                &customer_claims(subject, 300),
            )),
        ),
        (
            "alg none",
            Some(format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")),
        ),
        ("no exp", Some(no_exp)),
        ("missing", None),
    ];
    let before = harness.request_event_count().await;
    for (case, token) in bad_tokens {
        let response = harness
            .post(
                "/api/v1/accounts",
                token.as_deref(),
                None,
                &json!({"currency": "USD"}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{case}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{case}"
        );
    }
    let ok = harness
        .post(
            "/api/v1/accounts",
            Some(&valid),
            None,
            &json!({"currency": "USD"}),
        )
        .await;
    assert_eq!(ok.status(), StatusCode::CREATED, "the valid token works");
    assert_eq!(harness.request_event_count().await, before + 1);
    harness.finish().await;
}

#[tokio::test]
async fn accounts_open_with_the_spec_shape_and_roles_are_enforced() {
    // Proves POST /accounts answers 201 with the GET shape, Location and X-Ledger-Position, and
    // that auditors (403), customers naming another owner (403) and bad bodies (400) are refused.
    let harness = Harness::start().await;
    let (subject, token) = harness.customer();
    let response = harness
        .post(
            "/api/v1/accounts",
            Some(&token),
            None,
            &json!({"currency": "JPY", "name": "Savings"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(response.headers().contains_key("x-ledger-position"));
    assert!(response.headers().contains_key("x-correlation-id"));
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(
        location,
        format!("/api/v1/accounts/{}", body["id"].as_str().expect("id"))
    );
    assert_eq!(body["owner_id"], subject.to_string());
    assert_eq!(body["currency"], "JPY");
    assert_eq!(body["balance"], "0");
    assert_eq!(body["available"], "0");
    assert_eq!(body["status"], "active");
    assert_eq!(body["version"], 1);

    let before = harness.request_event_count().await;
    let auditor = harness.app.token(Uuid::new_v4(), &[Role::Auditor]);
    let cases = [
        (
            Some(auditor.as_str()),
            json!({"currency": "USD"}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "USD", "owner_id": Uuid::new_v4()}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "XYZ"}),
            StatusCode::BAD_REQUEST,
            "unknown_currency",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "usd"}),
            StatusCode::BAD_REQUEST,
            "unknown_currency",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "USD", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "USD", "name": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Some(token.as_str()),
            json!({"currency": "USD", "name": "x".repeat(101)}),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            Some(token.as_str()),
            json!({}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
    ];
    for (token, body, status, code) in cases {
        let response = harness.post("/api/v1/accounts", token, None, &body).await;
        assert_eq!(response.status(), status, "{body}");
        let problem: Value = response.json().await.expect("problem+json");
        assert_eq!(problem["code"], code, "{body}");
        assert_eq!(problem["status"], status.as_u16());
    }
    // An admin may open an account for someone else.
    let owner = Uuid::new_v4();
    let response = harness
        .post(
            "/api/v1/accounts",
            Some(&harness.admin()),
            None,
            &json!({"currency": "USD", "owner_id": owner}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["owner_id"], owner.to_string());
    assert_eq!(
        harness.request_event_count().await,
        before + 1,
        "only the admin's account was appended"
    );
    harness.finish().await;
}

#[tokio::test]
async fn bad_transaction_requests_get_a_4xx_and_append_nothing() {
    // Proves SPEC §3/§5 validation: every kind of bad input is refused with its status and code
    // before anything is written.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let usd = harness.open_account(&alice, "USD").await;
    let eur = harness.open_account(&alice, "EUR").await;
    let jpy = harness.open_account(&alice, "JPY").await;
    let bobs = harness.open_account(&bob, "USD").await;
    let missing = Uuid::new_v4();
    let transfer = |amount: Value| json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": usd, "destination_account_id": bobs});
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (
            transfer(json!("0")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!("-5.00")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!(-5)),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!("1.001")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!("abc")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!("1e3")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!(true)),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!(null)),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            transfer(json!("10000000000000.01")),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            json!({"type": "deposit", "amount": "1.5", "currency": "JPY", "destination_account_id": jpy}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            json!({"type": "transfer", "amount": "1.00", "currency": "XXX", "source_account_id": usd, "destination_account_id": bobs}),
            StatusCode::BAD_REQUEST,
            "unknown_currency",
        ),
        (
            json!({"type": "refund", "amount": "1.00", "currency": "USD", "source_account_id": usd}),
            StatusCode::BAD_REQUEST,
            "invalid_type",
        ),
        (
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": usd}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "source_account_id": usd, "destination_account_id": usd}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": usd, "destination_account_id": bobs}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": usd, "description": "d".repeat(501)}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": usd, "memo": "x"}),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": "not-a-uuid"}),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": usd, "destination_account_id": usd}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "same_account",
        ),
        (
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": usd, "destination_account_id": eur}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency_mismatch",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": missing}),
            StatusCode::FORBIDDEN,
            "top_ups_disabled",
        ),
        (
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": missing}),
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
        (
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": usd, "description": "a\u{0}b"}),
            StatusCode::BAD_REQUEST,
            "invalid_description",
        ),
        (
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": bobs}),
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
        (
            json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": bobs}),
            StatusCode::FORBIDDEN,
            "top_ups_disabled",
        ),
        (
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": bobs, "destination_account_id": usd}),
            StatusCode::NOT_FOUND,
            "account_not_found",
        ),
    ];
    let before = harness.request_event_count().await;
    for (index, (body, status, code)) in cases.iter().enumerate() {
        let key = format!("bad-{index}");
        let response = harness
            .post("/api/v1/transactions", Some(&alice), Some(&key), body)
            .await;
        assert_eq!(response.status(), *status, "{body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.expect("problem+json");
        assert_eq!(problem["code"], *code, "{body}");
        if *code == "currency_mismatch" {
            // Finding 9: the other account's currency is not the caller's business.
            let detail = problem["detail"].as_str().expect("a detail");
            assert!(!detail.contains("EUR"), "{detail}");
        }
    }
    // Missing and malformed idempotency keys.
    let deposit = json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": usd});
    let response = harness
        .post("/api/v1/transactions", Some(&alice), None, &deposit)
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(problem["code"], "idempotency_key_required");
    let response = harness
        .post(
            "/api/v1/transactions",
            Some(&alice),
            Some(&"k".repeat(256)),
            &deposit,
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Not JSON, and over 1 MiB.
    let response = harness
        .client
        .post(format!("{}/api/v1/transactions", harness.app.address))
        .bearer_auth(&alice)
        .header("Idempotency-Key", "text")
        .header("content-type", "text/plain")
        .body("amount=1")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": usd, "description": "x".repeat(1024 * 1024)});
    let response = harness
        .post("/api/v1/transactions", Some(&alice), Some("huge"), &huge)
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // An auditor may not move money.
    let auditor = harness.app.token(Uuid::new_v4(), &[Role::Auditor]);
    let response = harness
        .post(
            "/api/v1/transactions",
            Some(&auditor),
            Some("aud"),
            &deposit,
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        harness.request_event_count().await,
        before,
        "no refused request appended an event"
    );
    harness.finish().await;
}

#[tokio::test]
async fn a_customer_moves_only_their_own_money() {
    // Proves ownership (SPEC §8.6): Bob cannot withdraw from or deposit into Alice's account, may
    // pay into it, and an admin may act on any account.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let alices = harness.open_account(&alice, "USD").await;
    let bobs = harness.open_account(&bob, "USD").await;
    let withdraw = json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": alices});
    let response = harness
        .post("/api/v1/transactions", Some(&bob), Some("w"), &withdraw)
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let pay = json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": bobs, "destination_account_id": alices});
    let response = harness
        .post("/api/v1/transactions", Some(&bob), Some("p"), &pay)
        .await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "paying into someone's account is allowed"
    );
    let response = harness
        .post(
            "/api/v1/transactions",
            Some(&harness.admin()),
            Some("a"),
            &withdraw,
        )
        .await;
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "admins act on any account"
    );
    harness.finish().await;
}

#[tokio::test]
async fn only_operators_and_admins_create_money() {
    // Proves finding 1 (SPEC §5): a customer cannot deposit (403 top_ups_disabled) nor open
    // accounts to multiply its velocity limit with money it made up; an operator deposits and
    // withdraws on anyone's account but transfers nothing and opens nothing; nothing refused
    // appends an event.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let alices = harness.open_account(&alice, "USD").await;
    let bobs = harness.open_account(&bob, "USD").await;
    let rail = harness.operator();
    let before = harness.request_event_count().await;
    let top_up = json!({"type": "deposit", "amount": "100.00", "currency": "USD", "destination_account_id": alices});
    let response = harness
        .post("/api/v1/transactions", Some(&alice), Some("t"), &top_up)
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(problem["code"], "top_ups_disabled");
    let transfer = json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": alices, "destination_account_id": bobs});
    let response = harness
        .post("/api/v1/transactions", Some(&rail), Some("x"), &transfer)
        .await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "operators move no money between customers"
    );
    let response = harness
        .post(
            "/api/v1/accounts",
            Some(&rail),
            None,
            &json!({"currency": "USD"}),
        )
        .await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "operators open no accounts"
    );
    assert_eq!(harness.request_event_count().await, before);
    for (key, body) in [
        ("d", top_up.clone()),
        (
            "w",
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD", "source_account_id": bobs}),
        ),
    ] {
        let response = harness
            .post("/api/v1/transactions", Some(&rail), Some(key), &body)
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{body}");
    }
    harness.finish().await;
}

#[tokio::test]
async fn customer_top_ups_exist_only_where_a_sandbox_enables_them() {
    // Proves CUSTOMER_TOP_UPS=enabled: a customer tops up its own account, never someone else's.
    let harness = Harness::start_with(command_api::testing::TestOptions {
        customer_top_ups: true,
        ..Default::default()
    })
    .await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let alices = harness.open_account(&alice, "USD").await;
    let bobs = harness.open_account(&bob, "USD").await;
    let own = json!({"type": "deposit", "amount": "5.00", "currency": "USD", "destination_account_id": alices});
    let response = harness
        .post("/api/v1/transactions", Some(&alice), Some("own"), &own)
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let others = json!({"type": "deposit", "amount": "5.00", "currency": "USD", "destination_account_id": bobs});
    let response = harness
        .post("/api/v1/transactions", Some(&alice), Some("other"), &others)
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    harness.finish().await;
}

#[tokio::test]
async fn a_nul_in_a_name_or_description_is_a_400_not_a_500() {
    // Proves finding 9: U+0000, which PostgreSQL cannot store, is refused as bad input (and
    // names refuse every control character).
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let response = harness
        .post(
            "/api/v1/accounts",
            Some(&alice),
            None,
            &json!({"currency": "USD", "name": "wal\u{0}let"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(problem["code"], "invalid_name");
    // A name is one line: no control character at all (the OpenAPI document says so too).
    let response = harness
        .post(
            "/api/v1/accounts",
            Some(&alice),
            None,
            &json!({"currency": "USD", "name": "bell\u{7}"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let account = harness.open_account(&alice, "USD").await;
    let response = harness
        .post(
            "/api/v1/transactions",
            Some(&harness.operator()),
            Some("nul"),
            &json!({"type": "deposit", "amount": "1.00", "currency": "USD",
                    "destination_account_id": account, "description": "\u{0}"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(problem["code"], "invalid_description");
    harness.finish().await;
}

#[tokio::test]
async fn a_repeated_key_replays_and_a_different_body_is_refused() {
    // Proves idempotency (SPEC §5): same key and body → 200 with Idempotent-Replayed and no new
    // event; different body → 422 idempotency_key_reused; a JSON number amount is read exactly
    // and fingerprints like its string form; keys are scoped per caller.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let account = harness.open_account(&alice, "USD").await;
    let bobs = harness.open_account(&bob, "USD").await;
    // Two payment rails (operators), each with its own keys.
    let rail = harness.operator();
    let other_rail = harness.operator();
    let body = json!({"type": "deposit", "amount": "0.29", "currency": "USD", "destination_account_id": account});
    let first = harness
        .post("/api/v1/transactions", Some(&rail), Some("k-1"), &body)
        .await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first_position = first.headers()["x-ledger-position"].clone();
    let first_body: Value = first.json().await.expect("JSON");
    assert_eq!(first_body["status"], "PENDING");
    assert_eq!(first_body["amount"], "0.29");
    let events = harness.request_event_count().await;

    let as_number = json!({"type": "deposit", "amount": 0.29, "currency": "USD", "destination_account_id": account});
    let again = harness
        .post("/api/v1/transactions", Some(&rail), Some("k-1"), &as_number)
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    // The replay points at the transaction's latest event, which the saga may have moved on.
    let position = |value: &reqwest::header::HeaderValue| {
        value
            .to_str()
            .expect("ASCII")
            .parse::<infra::log::LogPosition>()
            .expect("a position")
    };
    assert!(position(&again.headers()["x-ledger-position"]) >= position(&first_position));
    let again_body: Value = again.json().await.expect("JSON");
    assert_eq!(again_body["id"], first_body["id"]);
    assert_eq!(
        harness.request_event_count().await,
        events,
        "a replay appends nothing"
    );

    let different = json!({"type": "deposit", "amount": "0.30", "currency": "USD", "destination_account_id": account});
    let refused = harness
        .post("/api/v1/transactions", Some(&rail), Some("k-1"), &different)
        .await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.expect("problem+json");
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(harness.request_event_count().await, events);

    // The other rail's "k-1" is its own key: a new transaction.
    let bobs_body = json!({"type": "deposit", "amount": "0.29", "currency": "USD", "destination_account_id": bobs});
    let response = harness
        .post(
            "/api/v1/transactions",
            Some(&other_rail),
            Some("k-1"),
            &bobs_body,
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    harness.finish().await;
}

#[tokio::test]
async fn one_key_sent_sixteen_times_at_once_makes_one_transaction() {
    // Proves that concurrent identical requests race on the transaction stream's first event:
    // exactly one 202, fifteen 200 replays, one TransactionCreated.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let account = harness.open_account(&alice, "USD").await;
    let rail = harness.operator();
    let body = json!({"type": "deposit", "amount": "10.00", "currency": "USD", "destination_account_id": account});
    let requests =
        (0..16).map(|_| harness.post("/api/v1/transactions", Some(&rail), Some("same-key"), &body));
    let responses = futures::future::join_all(requests).await;
    let mut ids = std::collections::HashSet::new();
    let (mut accepted, mut replayed) = (0, 0);
    for response in responses {
        match response.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::OK => {
                assert_eq!(response.headers()["idempotent-replayed"], "true");
                replayed += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        let body: Value = response.json().await.expect("JSON");
        ids.insert(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!((accepted, replayed), (1, 15));
    assert_eq!(ids.len(), 1);
    let created: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_api.events WHERE event_type = 'TransactionCreated'",
    )
    .fetch_one(&harness.app.pool)
    .await
    .expect("counting");
    assert_eq!(created, 1);
    harness.finish().await;
}

#[tokio::test]
async fn health_checks_the_database_for_real() {
    // Proves /health reports the database: 200 ok while it is there, 503 once it is gone.
    let mut harness = Harness::start().await;
    let url = format!("{}/health", harness.app.address);
    // Healthy once the decision consumer holds its broker connection.
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        let response = harness.client.get(&url).send().await.expect("answers");
        response.status() == StatusCode::OK
            && response.json::<Value>().await.expect("JSON")
                == json!({"status": "ok", "checks": {"database": "ok", "broker": "ok"}})
    })
    .await;
    let metrics = harness.metrics().await;
    assert!(metrics.contains("http_requests_total"), "{metrics}");
    // Drop the database under the running app.
    if let Some(database) = harness.database.take() {
        database.drop_database().await.expect("drops");
    }
    let response = harness.client.get(&url).send().await.expect("answers");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["checks"]["database"], "down");
    harness.app.stop().await;
    command_api::testing::delete_topology(&harness.amqp_prefix)
        .await
        .expect("deletes the topology");
}

#[tokio::test]
async fn metrics_count_the_saga_s_decisions_by_outcome_and_reason() {
    // Proves an operator can watch rejections by reason (the runbook's decision timeouts among
    // them): a funded deposit is confirmed and a transfer the payer cannot cover is rejected
    // `insufficient_funds`, and /metrics counts both as the saga reads them from the log.
    let harness = Harness::start().await;
    let (payer, source, destination) = harness.payer_and_payee().await;
    harness.fund(source, "1.00", "USD").await;
    let uncovered = harness
        .transact(
            &payer,
            json!({"type": "transfer", "amount": "5.00", "currency": "USD", "source_account_id": source, "destination_account_id": destination}),
        )
        .await;
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        harness.outcome(uncovered).await
            == ("REJECTED".to_owned(), Some("insufficient_funds".to_owned()))
    })
    .await;
    crate::support::eventually(std::time::Duration::from_secs(10), || async {
        let metrics = harness.metrics().await;
        [
            r#"saga_transactions_decided_total{outcome="confirmed",reason="none"}"#,
            r#"saga_transactions_decided_total{outcome="rejected",reason="insufficient_funds"}"#,
        ]
        .iter()
        .all(|series| metrics.contains(series))
    })
    .await;
    harness.finish().await;
}
