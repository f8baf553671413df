//! The reverse proxy (SPEC §5, §6) in front of the real command-api, projector and fraud worker:
//! the write path with the gateway's own tokens and the client's correlation id, SPEC §8.6
//! across the edge, and the fraud worker's rules.

use std::time::Duration;

use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Harness, Setup, assert_problem};

#[tokio::test]
async fn commands_pass_through_to_command_api_with_position_location_and_correlation_id() {
    // Proves the write path through the gateway with a token the gateway issued: an account is
    // opened (201, Location, X-Ledger-Position), a deposit accepted (202, X-Ledger-Position)
    // and replayed (200, Idempotent-Replayed); the client's correlation id is echoed and is
    // the one command-api wrote into the deposit's event metadata.
    let harness = Harness::start_with(Setup {
        command_api: true,
        ..Setup::default()
    })
    .await;
    let (_customer, token) = harness.customer().await;
    let correlation_id = format!("gw-{}", Uuid::new_v4().simple());
    let response = harness
        .client
        .post(harness.url("/api/v1/accounts"))
        .bearer_auth(&token)
        .header("X-Correlation-ID", &correlation_id)
        .json(&json!({"currency": "EUR"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["x-correlation-id"],
        correlation_id.as_str()
    );
    assert!(response.headers().contains_key("x-ledger-position"));
    let account: Value = response.json().await.expect("JSON");
    let account_id = account["id"].as_str().expect("an id").to_owned();

    let deposit = json!({"type": "deposit", "amount": "25.00", "currency": "EUR",
                         "destination_account_id": account_id});
    // Money enters through the payment rail (SPEC §5).
    let operator = harness.gateway.token(Uuid::new_v4(), &[Role::Operator]);
    let send = || {
        harness
            .client
            .post(harness.url("/api/v1/transactions"))
            .bearer_auth(&operator)
            .header("Idempotency-Key", "deposit-1")
            .header("X-Correlation-ID", &correlation_id)
            .json(&deposit)
            .send()
    };
    let response = send().await.expect("answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let position = response.headers()["x-ledger-position"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    assert!(position.contains('.'), "{position}");
    assert!(
        response.headers()["location"]
            .to_str()
            .expect("ASCII")
            .starts_with("/api/v1/transactions/")
    );
    let transaction: Value = response.json().await.expect("JSON");
    let replay = send().await.expect("answers");
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");

    let pool = &harness.command_api.as_ref().expect("started").pool;
    let recorded: String = sqlx::query_scalar(
        "SELECT metadata->>'correlation_id' FROM command_api.events \
         WHERE aggregate_type = 'transaction' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(transaction["id"].as_str().expect("an id"))
    .fetch_one(pool)
    .await
    .expect("the deposit's first event");
    assert_eq!(recorded, correlation_id);
    harness.finish().await;
}

#[tokio::test]
async fn a_customer_cannot_read_or_move_someone_elses_money_through_any_route() {
    // Proves SPEC §8.6 across the edge, with the real command-api and projector behind it:
    // customer B gets 404 on every route that names customer A's account or transaction,
    // exactly as for ones that do not exist, and B's lists never show A's data.
    let harness = Harness::start_with(Setup {
        command_api: true,
        projector: true,
        ..Setup::default()
    })
    .await;
    let (_a, token_a) = harness.customer().await;
    let (_b, token_b) = harness.customer().await;
    let open = |token: String| {
        let request = harness
            .client
            .post(harness.url("/api/v1/accounts"))
            .bearer_auth(token)
            .json(&json!({"currency": "USD"}));
        async move {
            let response = request.send().await.expect("answers");
            assert_eq!(response.status(), StatusCode::CREATED);
            response.json::<Value>().await.expect("JSON")["id"]
                .as_str()
                .expect("an id")
                .to_owned()
        }
    };
    let account_a = open(token_a.clone()).await;
    let account_b = open(token_b.clone()).await;
    let operator = harness.gateway.token(Uuid::new_v4(), &[Role::Operator]);
    let response = harness
        .client
        .post(harness.url("/api/v1/transactions"))
        .bearer_auth(&operator)
        .header("Idempotency-Key", "top-up-a")
        .json(
            &json!({"type": "deposit", "amount": "10.00", "currency": "USD",
                      "destination_account_id": account_a}),
        )
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let position = response.headers()["x-ledger-position"]
        .to_str()
        .expect("a position")
        .to_owned();
    let deposit = response.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_owned();

    // A sees its own deposit through the gateway (read-your-writes across the proxy)...
    let response = infra::testing::retry_while(
        Duration::from_secs(30),
        || async {
            harness
                .client
                .get(harness.url(&format!("/api/v1/transactions/{deposit}")))
                .bearer_auth(&token_a)
                .header("X-Ledger-Position", &position)
                .send()
                .await
                .expect("answers")
        },
        |response| response.status() == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-ledger-position"));
    assert!(response.headers().contains_key("x-cache"));

    // ...and B sees none of it, on any read route.
    for path in [
        format!("/api/v1/accounts/{account_a}"),
        format!("/api/v1/accounts/{account_a}/balance"),
        format!("/api/v1/accounts/{account_a}/history"),
        format!("/api/v1/transactions/{deposit}"),
        format!("/api/v1/transactions/{deposit}/events"),
        format!("/api/v1/transactions?account_id={account_a}"),
    ] {
        let response = harness
            .client
            .get(harness.url(&path))
            .bearer_auth(&token_b)
            .header("X-Ledger-Position", &position)
            .send()
            .await
            .expect("answers");
        assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    for path in ["/api/v1/accounts", "/api/v1/transactions"] {
        let response = harness.get(path, Some(&token_b)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.text().await.expect("a body");
        assert!(
            !body.contains(&account_a),
            "{path} shows A's account to B: {body}"
        );
        assert!(
            !body.contains(&deposit),
            "{path} shows A's deposit to B: {body}"
        );
    }

    // Nor can B move it: a withdrawal or transfer out of A's account, or a "top-up" into it.
    for (key, body) in [
        (
            "steal-1",
            json!({"type": "withdrawal", "amount": "1.00", "currency": "USD",
                            "source_account_id": account_a}),
        ),
        (
            "steal-2",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                            "source_account_id": account_a, "destination_account_id": account_b}),
        ),
    ] {
        let response = harness
            .client
            .post(harness.url("/api/v1/transactions"))
            .bearer_auth(&token_b)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{body}");
    }
    // Nor can B make money for A (or anyone): deposits are the payment rail's.
    let response = harness
        .client
        .post(harness.url("/api/v1/transactions"))
        .bearer_auth(&token_b)
        .header("Idempotency-Key", "steal-3")
        .json(
            &json!({"type": "deposit", "amount": "1.00", "currency": "USD",
                      "destination_account_id": account_a}),
        )
        .send()
        .await
        .expect("answers");
    assert_problem(response, StatusCode::FORBIDDEN, "top_ups_disabled").await;
    harness.finish().await;
}

#[tokio::test]
async fn fraud_rules_are_served_through_the_gateway_to_admins_and_auditors() {
    // Proves the route to a real fraud worker: admins and auditors get its rules (200).
    let harness = Harness::start_with(Setup {
        fraud_worker: true,
        ..Setup::default()
    })
    .await;
    for role in [Role::Admin, Role::Auditor] {
        let token = harness.gateway.token(Uuid::new_v4(), &[role]);
        let response = harness.get("/api/v1/fraud/rules", Some(&token)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("JSON");
        assert!(
            body["rules"]
                .as_array()
                .is_some_and(|rules| !rules.is_empty()),
            "{body}"
        );
    }
    harness.finish().await;
}
