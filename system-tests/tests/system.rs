//! The whole system as an operator runs it: the four service binaries as processes on a scratch
//! database, their own RabbitMQ topology and Redis prefixes, JSON logs to files. A client talks
//! to the gateway only. One correlation id sent with a deposit must appear in every service's
//! log and in the event's metadata; no log may contain the password or the token.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::{ADMIN_PASSWORD, ADMIN_USERNAME, Overrides, SECRET, System, eventually};
use uuid::Uuid;

#[tokio::test]
async fn one_correlation_id_follows_a_deposit_through_all_four_services() {
    let mut system = System::start(Overrides::default()).await;
    let gateway = system.gateway.clone();
    let client = system.client.clone();

    // A customer registers and logs in through the gateway.
    let password = format!("correct horse {}", Uuid::new_v4().simple());
    let response = client
        .post(format!("{gateway}/api/v1/auth/register"))
        .json(&json!({"username": "carol", "password": password, "name": "Carol Example"}))
        .send()
        .await
        .expect("register answers");
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = client
        .post(format!("{gateway}/api/v1/auth/token"))
        .json(&json!({"username": "carol", "password": password}))
        .send()
        .await
        .expect("token answers");
    assert_eq!(response.status(), StatusCode::OK);
    let login = response.json::<Value>().await.expect("JSON");
    let token = login["access_token"].as_str().expect("a token").to_owned();
    // Access tokens live 30 s; a client renews them with its refresh token, as this test does
    // before each read that may come late.
    let refresh = login["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned();

    let response = client
        .post(format!("{gateway}/api/v1/accounts"))
        .bearer_auth(&token)
        .json(&json!({"currency": "USD", "name": "wallet"}))
        .send()
        .await
        .expect("open answers");
    assert_eq!(response.status(), StatusCode::CREATED);
    let account = response.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_owned();

    // The deposit, by the admin (money enters through an operator or an admin), with our
    // correlation id.
    let response = client
        .post(format!("{gateway}/api/v1/auth/token"))
        .json(&json!({"username": ADMIN_USERNAME, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("token answers");
    assert_eq!(response.status(), StatusCode::OK);
    let admin_login = response.json::<Value>().await.expect("JSON");
    let admin = admin_login["access_token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let admin_refresh = admin_login["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_owned();
    let correlation = format!("system-test-{}", Uuid::new_v4().simple());
    let response = client
        .post(format!("{gateway}/api/v1/transactions"))
        .bearer_auth(&admin)
        .header("X-Correlation-ID", &correlation)
        .header("Idempotency-Key", "system-test-deposit-1")
        .json(&json!({"type": "deposit", "amount": "125.50", "currency": "USD", "destination_account_id": account}))
        .send()
        .await
        .expect("deposit answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(
        response.headers()["x-correlation-id"].to_str().ok(),
        Some(correlation.as_str()),
        "the gateway echoes the caller's id"
    );
    let position = response.headers()["x-ledger-position"]
        .to_str()
        .expect("a position")
        .to_owned();
    let transaction = response.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("an id")
        .to_owned();

    // Read-your-writes through the gateway: never a 404, then CONFIRMED.
    let response = infra::testing::retry_while(
        Duration::from_secs(30),
        || async {
            client
                .get(format!("{gateway}/api/v1/transactions/{transaction}"))
                .bearer_auth(access_token(&client, &gateway, &refresh).await)
                .header("X-Ledger-Position", &position)
                .send()
                .await
                .expect("GET answers")
        },
        |response| response.status() == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-ledger-position"));
    // The balance, the history and the audit trail each follow the log on their own, and the
    // saga's SettlementCompleted comes after the balances move: each is waited for, since
    // seeing one settled says nothing about the others.
    let read = |path: String| {
        let (client, gateway, refresh) = (&client, &gateway, &refresh);
        async move {
            let token = access_token(client, gateway, refresh).await;
            let request = client.get(format!("{gateway}{path}")).bearer_auth(token);
            match request.send().await {
                Ok(response) => response.json::<Value>().await.unwrap_or_default(),
                Err(_) => Value::Null,
            }
        }
    };
    let settled = |trail: &Value| {
        trail["items"].as_array().is_some_and(|events| {
            events
                .iter()
                .any(|event| event["type"] == "SettlementCompleted")
        })
    };
    eventually(
        "the deposit is settled in the balance, the history and the audit trail",
        Duration::from_secs(30),
        || async {
            let balance = read(format!("/api/v1/accounts/{account}/balance")).await;
            let history = read(format!("/api/v1/accounts/{account}/history")).await;
            let trail = read(format!("/api/v1/transactions/{transaction}/events")).await;
            balance["balance"] == "125.50"
                && balance["available"] == "125.50"
                && history["items"][0]["status"] == "CONFIRMED"
                && history["items"][0]["balance_after"] == "125.50"
                && settled(&trail)
        },
    )
    .await;

    // The audit trail carries the id in every event's metadata, as an admin sees it (the
    // customer, who did not initiate the deposit, sees none of the admin's metadata).
    let trail = client
        .get(format!(
            "{gateway}/api/v1/transactions/{transaction}/events"
        ))
        .bearer_auth(access_token(&client, &gateway, &admin_refresh).await)
        .send()
        .await
        .expect("the trail answers")
        .json::<Value>()
        .await
        .expect("JSON");
    let events = trail["items"].as_array().expect("items");
    assert!(events.len() >= 5, "{trail}");
    for event in events {
        assert_eq!(
            event["metadata"]["correlation_id"],
            correlation.as_str(),
            "{event}"
        );
    }

    // Stop everything gracefully, then read the logs.
    for service in system.services.iter_mut().rev() {
        service.stop();
    }
    for service in &system.services {
        let log = service.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(&correlation))
            .collect();
        assert!(
            !lines.is_empty(),
            "{} never logged the correlation id; its log:\n{log}",
            service.name
        );
        eprintln!(
            "{}: {} log lines carry the correlation id",
            service.name,
            lines.len()
        );
        for line in &lines {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|_| panic!("{}: not a JSON log line: {line}", service.name));
        }
        for secret in [
            password.as_str(),
            token.as_str(),
            refresh.as_str(),
            admin.as_str(),
            admin_refresh.as_str(),
            ADMIN_PASSWORD,
            SECRET,
            "Carol Example",
        ] {
            assert!(
                !log.contains(secret),
                "{} logged a secret or personal data",
                service.name
            );
        }
    }

    system.finish().await;
}

/// A fresh access token from a refresh token (`POST /api/v1/auth/refresh`).
async fn access_token(client: &reqwest::Client, gateway: &str, refresh: &str) -> String {
    let response = client
        .post(format!("{gateway}/api/v1/auth/refresh"))
        .json(&json!({ "refresh_token": refresh }))
        .send()
        .await
        .expect("refresh answers");
    assert_eq!(response.status(), StatusCode::OK);
    response.json::<Value>().await.expect("JSON")["access_token"]
        .as_str()
        .expect("a token")
        .to_owned()
}
