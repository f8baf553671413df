//! The embedded mode as a user runs it: `ledger serve` on a data directory, with
//! `DATABASE_URL`, `AMQP_URL` and `REDIS_URL` pointing at closed ports (SPEC §10). What only
//! this mode has: `/health` names its embedded parts, the CLI reads its directory beside it, a
//! second `serve` on the same directory is refused, and `kill -9` at any moment loses nothing and
//! applies nothing twice. The README walkthrough and the scenarios both modes share are in
//! `both_modes.rs`.

use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::deployment::{Deployment, Mode};
use system_tests::embedded::Embedded;
use system_tests::{ADMIN_PASSWORD, SECRET, binary, eventually, run, token};
use tokio::sync::RwLock;
use uuid::Uuid;

#[tokio::test]
async fn health_metrics_and_the_cli_beside_a_live_serve() {
    // (The README walkthrough and the other scenarios of both modes are in `both_modes.rs`.)
    let deployment = Deployment::start(Mode::Embedded).await;
    let (admin, alice) = (deployment.admin().await, deployment.customer().await);
    let (wallet, savings) = (
        alice.open_account("USD").await,
        alice.open_account("USD").await,
    );
    admin.deposit(wallet, "125.50", "USD").await;
    let transfer = alice
        .transact(&json!({
            "type": "transfer", "amount": "40.00", "currency": "USD",
            "source_account_id": wallet, "destination_account_id": savings,
        }))
        .await;
    assert_eq!(alice.final_status(transfer.id()).await, "CONFIRMED");
    alice.account_when(savings, "40.00").await;
    let Deployment::Embedded(ledger) = deployment else {
        unreachable!("started in the embedded mode")
    };

    // `/health` names the embedded parts; `/metrics` is on its own listener only.
    let health: Value = ledger
        .client
        .get(format!("{}/health", ledger.base))
        .send()
        .await
        .expect("health answers")
        .json()
        .await
        .expect("JSON");
    for part in ["database", "bus", "cache"] {
        assert_eq!(health["checks"][part], "ok", "{health}");
    }
    let public_metrics = ledger
        .client
        .get(format!("{}/metrics", ledger.base))
        .send()
        .await
        .expect("answers");
    assert_ne!(public_metrics.status(), StatusCode::OK);
    let metrics = ledger
        .client
        .get(format!("{}/metrics", ledger.metrics))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("http_requests_total"), "{metrics}");

    // The CLI reads the same directory beside the live process.
    let data = ledger.data.display().to_string();
    let verify = run(Command::new(binary("ledger")).args(["verify", "--data", &data]));
    assert!(
        verify.status.success(),
        "ledger verify --data failed:\n{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let replay = run(Command::new(binary("ledger")).args(["replay", "--data", &data]));
    assert!(replay.status.success(), "{replay:?}");
    assert!(String::from_utf8_lossy(&replay.stdout).contains("SettlementCompleted"));

    // No log line carries the admin's password or the secret.
    let logs = ledger.logs();
    assert!(!logs.contains(ADMIN_PASSWORD) && !logs.contains(SECRET));
    ledger.finish();
}

#[tokio::test]
async fn one_serve_per_directory_and_rebuild_waits_its_turn() {
    let ledger = Embedded::start().await;
    let data = ledger.data.display().to_string();
    let second = run(Command::new(binary("ledger")).args([
        "serve",
        "--data",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]));
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("is in use by ledger serve"), "{said}");

    let rebuild = run(Command::new(binary("ledger")).args(["rebuild", "--data", &data]));
    assert!(!rebuild.status.success());
    assert!(
        String::from_utf8_lossy(&rebuild.stderr).contains("is in use by ledger serve"),
        "{rebuild:?}"
    );

    // Once it stopped, the rebuild runs, and a restart serves the rebuilt models.
    let mut ledger = ledger;
    ledger.service.stop();
    let rebuild = run(Command::new(binary("ledger")).args(["rebuild", "--data", &data]));
    assert!(rebuild.status.success(), "{rebuild:?}");
    let verify = run(Command::new(binary("ledger")).args(["verify", "--data", &data]));
    assert!(verify.status.success(), "{verify:?}");
    ledger.finish();
}

/// Transfers between the customer's accounts.
const TRANSFERS: usize = 500;
const CLIENTS: usize = 8;
const ACCOUNTS: usize = 8;
const KILLS: usize = 3;

#[tokio::test]
async fn kill_9_of_ledger_serve_loses_nothing_and_applies_nothing_twice() {
    let mut ledger = Embedded::start().await;
    let client = ledger.client.clone();
    let base = Arc::new(RwLock::new(ledger.base.clone()));

    // A customer with eight funded accounts (the admin deposits 1,000.00 into each).
    let customer = Uuid::new_v4();
    let customer_token = token(customer, &[Role::Customer]);
    let admin_token = token(Uuid::new_v4(), &[Role::Admin]);
    let mut accounts = Vec::new();
    for index in 0..ACCOUNTS {
        let response = client
            .post(format!("{}/api/v1/accounts", ledger.base))
            .bearer_auth(&customer_token)
            .json(&json!({"currency": "USD", "name": format!("wallet {index}")}))
            .send()
            .await
            .expect("open answers");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("JSON");
        accounts.push(body["id"].as_str().expect("an id").to_owned());
    }
    for (index, account) in accounts.iter().enumerate() {
        let response = client
            .post(format!("{}/api/v1/transactions", ledger.base))
            .bearer_auth(&admin_token)
            .header("Idempotency-Key", format!("funding-{index}"))
            .json(
                &json!({"type": "deposit", "amount": "1000.00", "currency": "USD",
                          "destination_account_id": account}),
            )
            .send()
            .await
            .expect("deposit answers");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }

    // Eight clients post 500 transfers, each retrying its own key until it gets an answer,
    // while the process is killed three times and started again.
    let accepted = Arc::new(AtomicUsize::new(0));
    let accounts = Arc::new(accounts);
    let mut clients = Vec::new();
    for client_index in 0..CLIENTS {
        let (client, base, accepted, accounts, customer_token) = (
            client.clone(),
            base.clone(),
            accepted.clone(),
            accounts.clone(),
            customer_token.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for index in (client_index..TRANSFERS).step_by(CLIENTS) {
                let key = format!("transfer-{index}");
                let from = &accounts[index % ACCOUNTS];
                let to = &accounts[(index + 1 + index / ACCOUNTS) % ACCOUNTS];
                let to = if to == from {
                    &accounts[(index + 1) % ACCOUNTS]
                } else {
                    to
                };
                let body = json!({"type": "transfer", "amount": "1.25", "currency": "USD",
                                  "source_account_id": from, "destination_account_id": to});
                let id = loop {
                    let url = format!("{}/api/v1/transactions", base.read().await);
                    let answer = client
                        .post(url)
                        .bearer_auth(&customer_token)
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status().is_success() => {
                            let body: Value = response.json().await.expect("JSON");
                            break body["id"].as_str().expect("an id").to_owned();
                        }
                        // Killed mid-request, not up yet, or an outcome it cannot know yet
                        // (503): the same key again, as a client must.
                        Ok(response) if response.status().is_server_error() => {}
                        Ok(response) => panic!("{key}: {}", response.status()),
                        Err(_) => {}
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                ids.push((key, id, body));
            }
            ids
        }));
    }
    for kill in 1..=KILLS {
        let threshold = kill * TRANSFERS / (KILLS + 1);
        while accepted.load(Ordering::Relaxed) < threshold {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            accepted.load(Ordering::Relaxed) < TRANSFERS,
            "kill {kill} came after the last transfer: it proves nothing"
        );
        ledger.kill_and_restart().await;
        *base.write().await = ledger.base.clone();
    }
    let mut ids = Vec::new();
    for client in clients {
        ids.extend(client.await.expect("a client finished"));
    }
    assert_eq!(ids.len(), TRANSFERS);
    let distinct: HashSet<&String> = ids.iter().map(|(_, id, _)| id).collect();
    assert_eq!(
        distinct.len(),
        TRANSFERS,
        "every key yields its own transaction"
    );

    // Every key answers with the transaction it made, replayed.
    let base = ledger.base.clone();
    for (key, id, body) in ids.iter().step_by(25) {
        let response = client
            .post(format!("{base}/api/v1/transactions"))
            .bearer_auth(&customer_token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .expect("answers");
        assert!(
            response.status().is_success(),
            "{key}: {}",
            response.status()
        );
        assert!(response.headers().contains_key("idempotent-replayed"));
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
    }

    // Nothing stays PENDING, and the money is all still there.
    let (client_ref, base_ref, admin_ref) = (&client, &base, &admin_token);
    eventually(
        "no transaction stays PENDING",
        Duration::from_secs(120),
        || async move {
            let Ok(response) = client_ref
                .get(format!(
                    "{base_ref}/api/v1/transactions?status=PENDING&page_size=1"
                ))
                .bearer_auth(admin_ref)
                .send()
                .await
            else {
                return false;
            };
            let body: Value = response.json().await.unwrap_or_default();
            body["items"].as_array().is_some_and(Vec::is_empty)
        },
    )
    .await;
    // Final is not yet settled: a confirmed transfer's hold becomes a debit a moment later
    // (SPEC §3, in flight). Wait until no account holds anything, then count the money.
    let balances = |accounts: Arc<Vec<String>>| {
        let (client, base, token) = (client.clone(), base.clone(), customer_token.clone());
        async move {
            let mut balances = Vec::new();
            for account in accounts.iter() {
                let body: Value = client
                    .get(format!("{base}/api/v1/accounts/{account}/balance"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("balance answers")
                    .json()
                    .await
                    .expect("JSON");
                balances.push(body);
            }
            balances
        }
    };
    eventually(
        "every hold settled or released",
        Duration::from_secs(60),
        || {
            let balances = balances(accounts.clone());
            async move {
                balances
                    .await
                    .iter()
                    .all(|body| body["available"] == body["balance"])
            }
        },
    )
    .await;
    let mut total_minor = 0_i64;
    for body in balances(accounts.clone()).await {
        let balance = body["balance"].as_str().expect("a balance");
        assert_eq!(body["available"].as_str(), Some(balance), "nothing held");
        let (units, cents) = balance.split_once('.').expect("two decimals");
        total_minor +=
            units.parse::<i64>().expect("units") * 100 + cents.parse::<i64>().expect("cents");
    }
    assert_eq!(
        total_minor,
        i64::try_from(ACCOUNTS).expect("small") * 100_000,
        "money is conserved"
    );

    assert_eq!(
        ledger.logs().matches("ledger listening").count(),
        KILLS + 1,
        "one start and a restart per kill"
    );
    let data = ledger.data.display().to_string();
    let verify = run(Command::new(binary("ledger")).args(["verify", "--data", &data]));
    assert!(
        verify.status.success(),
        "ledger verify --data failed:\n{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    ledger.finish();
}
