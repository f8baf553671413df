//! The system tests that hold in both modes (SPEC §10): every scenario here runs once against
//! the four services on PostgreSQL, RabbitMQ and Redis and once against `ledger serve` with
//! those servers' ports closed, from the same code, through the public API only. A difference
//! between the modes in a path, a status code, a problem code, a body or a header fails here.
//!
//! Scenarios: the README walkthrough; money flows (deposits by an admin and by the payment
//! rail, transfers, withdrawals, an overdraft refused, the fraud threshold, balances and
//! history); idempotency; 50 concurrent transfers out of one account; ownership on every route;
//! bad input; hostile requests (issue 11: ambiguous paths, unreachable read positions, the audit
//! trail's counterparty, `/metrics` on the public port). After each, the invariants of SPEC §8 that a client can see hold: money is
//! conserved, no available balance is negative, nothing was applied twice, nothing is left
//! PENDING, and refused requests changed nothing.

use std::collections::HashMap;

use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::deployment::{Deployment, Mode, Session};
use system_tests::{ADMIN_PASSWORD, ADMIN_USERNAME, run_readme_walkthrough};
use uuid::Uuid;

/// One `#[tokio::test]` per scenario and mode, each on a fresh deployment of its own.
macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        in_both_modes!(@mode distributed, Distributed; $($scenario),*);
        in_both_modes!(@mode embedded, Embedded; $($scenario),*);
    };
    (@mode $module:ident, $mode:ident; $($scenario:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let deployment = super::Deployment::start(super::Mode::$mode).await;
                    super::$scenario(&deployment).await;
                    deployment.finish().await;
                }
            )*
        }
    };
}

in_both_modes!(
    the_readme_walkthrough_runs,
    money_flows_end_to_end,
    a_retried_request_applies_once,
    fifty_concurrent_transfers_out_of_one_account,
    no_one_reads_or_moves_someone_elses_money,
    bad_input_gets_a_clear_4xx_and_changes_nothing,
    hostile_requests_are_refused_the_same_way,
);

async fn the_readme_walkthrough_runs(deployment: &Deployment) {
    let output = run_readme_walkthrough(deployment.base(), ADMIN_USERNAME, ADMIN_PASSWORD);
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README walkthrough failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains(r#""balance":"85.50""#), "{printed}");
    assert!(printed.contains("SettlementCompleted"), "{printed}");
}

async fn money_flows_end_to_end(deployment: &Deployment) {
    let (admin, rail, alice) = (
        deployment.admin().await,
        deployment.operator(),
        deployment.customer().await,
    );
    let wallet = alice.open_account("USD").await;
    let savings = alice.open_account("USD").await;
    let yen = alice.open_account("JPY").await;

    // Money arrives through an admin and through the payment rail.
    assert_eq!(admin.deposit(wallet, "100.00", "USD").await, "CONFIRMED");
    assert_eq!(rail.deposit(wallet, "25.50", "USD").await, "CONFIRMED");
    assert_eq!(rail.deposit(yen, "500", "JPY").await, "CONFIRMED");

    // A transfer, a withdrawal by the customer and one by the rail.
    let transfer = alice
        .transact(&json!({
            "type": "transfer", "amount": "40.00", "currency": "USD",
            "source_account_id": wallet, "destination_account_id": savings,
            "description": "rainy day",
        }))
        .await;
    assert_eq!(transfer.status, StatusCode::ACCEPTED, "{transfer:?}");
    assert_eq!(transfer.body["status"], "PENDING");
    assert!(
        transfer.header("location").is_some() && transfer.header("x-ledger-position").is_some()
    );
    assert_eq!(alice.final_status(transfer.id()).await, "CONFIRMED");
    let withdrawal = alice
        .transact(&json!({
            "type": "withdrawal", "amount": "5.50", "currency": "USD",
            "source_account_id": savings,
        }))
        .await;
    assert_eq!(alice.final_status(withdrawal.id()).await, "CONFIRMED");
    let payout = rail
        .transact(&json!({
            "type": "withdrawal", "amount": "100", "currency": "JPY",
            "source_account_id": yen,
        }))
        .await;
    assert_eq!(rail.final_status(payout.id()).await, "CONFIRMED");
    // The rail sees outcomes through the transaction, not the audit trail.
    let trail = rail
        .get(&format!("/api/v1/transactions/{}/events", payout.id()))
        .await;
    assert_eq!(trail.status, StatusCode::FORBIDDEN, "{trail:?}");

    // More than is available: accepted, then rejected and released by the saga.
    let overdraft = alice
        .transact(&json!({
            "type": "transfer", "amount": "1000.00", "currency": "USD",
            "source_account_id": wallet, "destination_account_id": savings,
        }))
        .await;
    assert_eq!(overdraft.status, StatusCode::ACCEPTED);
    assert_eq!(alice.final_status(overdraft.id()).await, "REJECTED");
    let refused = alice
        .get(&format!("/api/v1/transactions/{}", overdraft.id()))
        .await;
    assert_eq!(refused.body["reason"], "insufficient_funds", "{refused:?}");

    // At the fraud threshold (10,000 by default): rejected, with the rule named.
    let large = admin
        .transact(&json!({
            "type": "deposit", "amount": "10000.00", "currency": "USD",
            "destination_account_id": wallet,
        }))
        .await;
    assert_eq!(admin.final_status(large.id()).await, "REJECTED");
    let suspected = admin
        .get(&format!("/api/v1/transactions/{}", large.id()))
        .await;
    assert_eq!(suspected.body["reason"], "fraud_suspected", "{suspected:?}");

    // Balances: every confirmed leg once, nothing of the rejected ones, nothing held.
    for (account, balance) in [(wallet, "85.50"), (savings, "34.50"), (yen, "400")] {
        let view = alice.account_when(account, balance).await;
        assert_eq!(view["available"], balance, "{view}");
        assert_eq!(view["held"], zero_of(balance), "{view}");
    }
    let history = alice
        .get(&format!("/api/v1/accounts/{wallet}/history?page_size=10"))
        .await;
    let rows = items(&history.body);
    let amounts: Vec<(&str, &str)> = rows
        .iter()
        .map(|item| {
            (
                item["amount"].as_str().unwrap_or(""),
                item["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(amounts.contains(&("-40.00", "CONFIRMED")), "{amounts:?}");
    assert!(amounts.contains(&("100.00", "CONFIRMED")), "{amounts:?}");
    assert!(amounts.contains(&("25.50", "CONFIRMED")), "{amounts:?}");
    assert_eq!(history.body["next_cursor"], Value::Null);

    // The customer's transactions: all of them final.
    let mine = alice.get("/api/v1/transactions?page_size=100").await;
    assert_eq!(mine.status, StatusCode::OK);
    assert!(
        items(&mine.body)
            .iter()
            .all(|item| item["status"] != "PENDING"),
        "{mine:?}"
    );
}

/// "0.00" for a USD amount, "0" for a JPY one.
fn zero_of(amount: &str) -> &'static str {
    if amount.contains('.') { "0.00" } else { "0" }
}

fn items(body: &Value) -> Vec<Value> {
    body["items"].as_array().cloned().unwrap_or_default()
}

async fn a_retried_request_applies_once(deployment: &Deployment) {
    let (admin, alice, bob) = (
        deployment.admin().await,
        deployment.customer().await,
        deployment.customer().await,
    );
    let wallet = alice.open_account("EUR").await;
    let other = bob.open_account("EUR").await;
    let deposit = json!({
        "type": "deposit", "amount": "50.00", "currency": "EUR",
        "destination_account_id": wallet,
    });
    let first = admin
        .post("/api/v1/transactions", Some("top-up-7"), &deposit)
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    admin.final_status(first.id()).await;

    // The same request again, three times: the transaction as it is now, no new money.
    for _ in 0..3 {
        let again = admin
            .post("/api/v1/transactions", Some("top-up-7"), &deposit)
            .await;
        assert_eq!(again.status, StatusCode::OK, "{again:?}");
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.id(), first.id());
        assert_eq!(again.body["status"], "CONFIRMED");
    }
    // The same key with another body is refused, and moves nothing.
    let reused = admin
        .post(
            "/api/v1/transactions",
            Some("top-up-7"),
            &json!({
                "type": "deposit", "amount": "51.00", "currency": "EUR",
                "destination_account_id": wallet,
            }),
        )
        .await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{reused:?}"
    );
    assert_eq!(reused.code(), "idempotency_key_reused");
    assert!(reused.is_problem());

    // A key is the caller's own: bob's "same" key is another transaction.
    bob_pays_alice(&admin, &bob, other, wallet).await;

    // Concurrent retries of one transfer (a client timing out and retrying): one transaction.
    let transfer = json!({
        "type": "transfer", "amount": "10.00", "currency": "EUR",
        "source_account_id": wallet, "destination_account_id": other,
    });
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let alice = alice.clone();
            let transfer = transfer.clone();
            tokio::spawn(async move {
                alice
                    .post("/api/v1/transactions", Some("rent-2026-12"), &transfer)
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for retry in retries {
        let answer = retry.await.expect("no panic");
        // 202 for the one that created it, 200 for replays, 409 while the first is in flight.
        assert!(
            [StatusCode::ACCEPTED, StatusCode::OK, StatusCode::CONFLICT].contains(&answer.status),
            "{answer:?}"
        );
        if answer.status != StatusCode::CONFLICT {
            ids.push(answer.id());
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one transaction for one key: {ids:?}");
    assert_eq!(alice.final_status(ids[0]).await, "CONFIRMED");
    alice.account_when(wallet, "45.00").await;
    // Bob's 20.00, less his 5.00 to alice, plus alice's 10.00 once.
    bob.account_when(other, "25.00").await;

    // A missing key changes nothing either.
    let keyless = alice.post("/api/v1/transactions", None, &transfer).await;
    assert_eq!(keyless.status, StatusCode::BAD_REQUEST);
    assert_eq!(keyless.code(), "idempotency_key_required");
    alice.account_when(wallet, "45.00").await;
}

/// Bob, funded, pays alice 5.00 under the key alice's admin used for her deposit.
async fn bob_pays_alice(admin: &Session, bob: &Session, from: Uuid, to: Uuid) {
    admin.deposit(from, "20.00", "EUR").await;
    let answer = bob
        .post(
            "/api/v1/transactions",
            Some("top-up-7"),
            &json!({
                "type": "transfer", "amount": "5.00", "currency": "EUR",
                "source_account_id": from, "destination_account_id": to,
            }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(bob.final_status(answer.id()).await, "CONFIRMED");
}

async fn fifty_concurrent_transfers_out_of_one_account(deployment: &Deployment) {
    let (admin, alice) = (deployment.admin().await, deployment.customer().await);
    let source = alice.open_account("USD").await;
    let destination = alice.open_account("USD").await;
    admin.deposit(source, "25.00", "USD").await;

    // 50 transfers of 1.00 at once out of an account holding 25.00.
    let transfers: Vec<_> = (0..50)
        .map(|_| {
            let alice = alice.clone();
            tokio::spawn(async move {
                alice
                    .transact(&json!({
                        "type": "transfer", "amount": "1.00", "currency": "USD",
                        "source_account_id": source, "destination_account_id": destination,
                    }))
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for transfer in transfers {
        let answer = transfer.await.expect("no panic");
        // No client ever sees a write conflict: every one is accepted.
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        ids.push(answer.id());
    }
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for id in ids {
        *outcomes.entry(alice.final_status(id).await).or_default() += 1;
    }
    // Exactly the funds there were: 25 confirmed, 25 refused for want of funds.
    assert_eq!(outcomes.get("CONFIRMED"), Some(&25), "{outcomes:?}");
    assert_eq!(outcomes.get("REJECTED"), Some(&25), "{outcomes:?}");
    let emptied = alice.account_when(source, "0.00").await;
    assert_eq!(emptied["available"], "0.00", "{emptied}");
    assert_eq!(emptied["held"], "0.00", "{emptied}");
    alice.account_when(destination, "25.00").await;
    let history = alice
        .get(&format!(
            "/api/v1/accounts/{destination}/history?page_size=100"
        ))
        .await;
    let credited = items(&history.body)
        .iter()
        .filter(|row| row["status"] == "CONFIRMED" && row["amount"] == "1.00")
        .count();
    assert_eq!(credited, 25, "each confirmed credit once: {history:?}");
}

async fn no_one_reads_or_moves_someone_elses_money(deployment: &Deployment) {
    let (admin, alice, mallory) = (
        deployment.admin().await,
        deployment.customer().await,
        deployment.customer().await,
    );
    let auditor = deployment.with_roles(Uuid::new_v4(), &[Role::Auditor]);
    let rail = deployment.operator();
    let anonymous = deployment.anonymous();
    let account = alice.open_account("USD").await;
    let own = mallory.open_account("USD").await;
    let deposit = admin
        .transact(&json!({
            "type": "deposit", "amount": "30.00", "currency": "USD",
            "destination_account_id": account,
        }))
        .await;
    let transaction = deposit.id();
    admin.final_status(transaction).await;
    alice.account_when(account, "30.00").await;

    let reads = [
        format!("/api/v1/accounts/{account}"),
        format!("/api/v1/accounts/{account}/balance"),
        format!("/api/v1/accounts/{account}/history"),
        format!("/api/v1/transactions/{transaction}"),
        format!("/api/v1/transactions/{transaction}/events"),
        format!("/api/v1/transactions?account_id={account}"),
    ];
    for path in &reads {
        // The owner, an admin, an auditor and the payment rail read it.
        for (who, reader) in [
            ("owner", &alice),
            ("admin", &admin),
            ("auditor", &auditor),
            ("operator", &rail),
        ] {
            if who == "operator" && path.ends_with("/events") {
                continue; // the trail is not the rail's (money_flows_end_to_end)
            }
            let answer = reader.get(path).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{who} GET {path}: {answer:?}"
            );
        }
        // Someone else's: as if it did not exist.
        let answer = mallory.get(path).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "GET {path}: {answer:?}"
        );
        assert!(answer.is_problem(), "{answer:?}");
        // No token: 401 with a challenge.
        let answer = anonymous.get(path).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "GET {path}: {answer:?}"
        );
        assert!(answer.header("www-authenticate").is_some(), "{answer:?}");
    }
    // Lists show only one's own.
    let listed = mallory.get("/api/v1/accounts").await;
    assert_eq!(items(&listed.body).len(), 1, "{listed:?}");
    assert_eq!(items(&listed.body)[0]["id"], own.to_string());
    let listed = mallory.get("/api/v1/transactions").await;
    assert!(items(&listed.body).is_empty(), "{listed:?}");

    // Moving it: as if it did not exist, and top-ups are not for customers.
    let out_of_alices = [
        json!({"type": "transfer", "amount": "1.00", "currency": "USD",
               "source_account_id": account, "destination_account_id": own}),
        json!({"type": "withdrawal", "amount": "1.00", "currency": "USD",
               "source_account_id": account}),
    ];
    for body in &out_of_alices {
        let answer = mallory.transact(body).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{body}: {answer:?}");
    }
    let top_up = mallory
        .transact(
            &json!({"type": "deposit", "amount": "1.00", "currency": "USD",
                          "destination_account_id": own}),
        )
        .await;
    assert_eq!(top_up.status, StatusCode::FORBIDDEN, "{top_up:?}");
    assert_eq!(top_up.code(), "top_ups_disabled");
    // The rail moves money in and out, never between customers; an auditor only reads.
    let answer = rail.transact(&out_of_alices[0]).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    for body in &out_of_alices {
        let answer = auditor.transact(body).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    }
    let answer = auditor
        .post("/api/v1/accounts", None, &json!({"currency": "USD"}))
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    // Admin routes and the fraud rules are not a customer's.
    let answer = mallory.get("/api/v1/fraud/rules").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    assert_eq!(
        auditor.get("/api/v1/fraud/rules").await.status,
        StatusCode::OK
    );
    let promote = mallory
        .put(
            &format!("/api/v1/admin/users/{}/roles", mallory.id),
            &json!({"roles": ["admin"]}),
        )
        .await;
    assert_eq!(promote.status, StatusCode::FORBIDDEN, "{promote:?}");

    // Nothing moved.
    let view = alice.account_when(account, "30.00").await;
    assert_eq!(view["available"], "30.00");
    let history = alice
        .get(&format!("/api/v1/accounts/{account}/history"))
        .await;
    assert_eq!(items(&history.body).len(), 1, "{history:?}");
}

async fn bad_input_gets_a_clear_4xx_and_changes_nothing(deployment: &Deployment) {
    let (admin, alice) = (deployment.admin().await, deployment.customer().await);
    let wallet = alice.open_account("USD").await;
    let savings = alice.open_account("USD").await;
    let euros = alice.open_account("EUR").await;
    admin.deposit(wallet, "10.00", "USD").await;
    let transfer = |amount: Value| {
        json!({"type": "transfer", "amount": amount, "currency": "USD",
               "source_account_id": wallet, "destination_account_id": savings})
    };

    let bad_transactions = [
        (
            "too many decimals",
            transfer(json!("1.001")),
            StatusCode::BAD_REQUEST,
        ),
        ("zero", transfer(json!("0.00")), StatusCode::BAD_REQUEST),
        (
            "negative",
            transfer(json!("-1.00")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not a number",
            transfer(json!("abc")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "over 10^15 minor units",
            transfer(json!("10000000000000.01")),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an inexact JSON number",
            transfer(json!(0.1 + 0.2)),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an unknown currency",
            json!({"type": "transfer", "amount": "1.00", "currency": "XXX",
                   "source_account_id": wallet, "destination_account_id": savings}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an unknown type",
            json!({"type": "gift", "amount": "1.00", "currency": "USD",
                   "destination_account_id": savings}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an unknown field",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "fee": "0.10",
                   "source_account_id": wallet, "destination_account_id": savings}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a description over 500 characters",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "source_account_id": wallet, "destination_account_id": savings,
                   "description": "x".repeat(501)}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a NUL in the description",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "source_account_id": wallet, "destination_account_id": savings,
                   "description": "a\u{0}b"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a transfer without a source",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "destination_account_id": savings}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "the same account on both sides",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "source_account_id": wallet, "destination_account_id": wallet}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "a currency its account does not hold",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "source_account_id": wallet, "destination_account_id": euros}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "an account that does not exist",
            json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                   "source_account_id": wallet, "destination_account_id": Uuid::new_v4()}),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (what, body, status) in &bad_transactions {
        let answer = alice.transact(body).await;
        assert_eq!(answer.status, *status, "{what}: {answer:?}");
        assert!(answer.is_problem(), "{what}: {answer:?}");
        assert!(
            !answer.code().is_empty(),
            "{what}: a stable code: {answer:?}"
        );
    }
    for (what, raw) in [
        ("malformed JSON", "{\"type\": \"transfer\","),
        ("not an object", "[1, 2, 3]"),
    ] {
        let answer = alice
            .post_raw("/api/v1/transactions", Some("raw"), raw)
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {answer:?}");
        assert!(answer.is_problem(), "{what}: {answer:?}");
    }
    let huge = alice
        .post(
            "/api/v1/accounts",
            None,
            &json!({"currency": "USD", "name": "x".repeat(1_100_000)}),
        )
        .await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE, "{huge:?}");
    for (what, body) in [
        ("an unknown currency", json!({"currency": "ABC"})),
        (
            "a NUL in the name",
            json!({"currency": "USD", "name": "a\u{0}b"}),
        ),
        (
            "someone else as owner",
            json!({"currency": "USD", "owner_id": Uuid::new_v4()}),
        ),
    ] {
        let answer = alice.post("/api/v1/accounts", None, &body).await;
        assert!(answer.status.is_client_error(), "{what}: {answer:?}");
        assert!(answer.is_problem(), "{what}: {answer:?}");
    }
    for query in [
        "page_size=0",
        "page_size=101",
        "page_size=ten",
        "cursor=not-a-cursor",
    ] {
        let answer = alice
            .get(&format!("/api/v1/accounts/{wallet}/history?{query}"))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{query}: {answer:?}"
        );
        assert!(answer.is_problem(), "{query}: {answer:?}");
    }
    let answer = alice.get("/api/v1/transactions?status=LOST").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    let answer = alice.get("/api/v1/transactions/not-a-uuid").await;
    assert!(
        answer.status.is_client_error() && answer.is_problem(),
        "{answer:?}"
    );

    // Nothing changed: one deposit, no transfer, no new account.
    let view = alice.account_when(wallet, "10.00").await;
    assert_eq!(view["available"], "10.00", "{view}");
    let history = alice
        .get(&format!("/api/v1/accounts/{wallet}/history"))
        .await;
    assert_eq!(items(&history.body).len(), 1, "{history:?}");
    let accounts = alice.get("/api/v1/accounts").await;
    assert_eq!(items(&accounts.body).len(), 3, "{accounts:?}");
}

/// Sends `head` (a request line and headers, without the blank line) on a connection of its own
/// and returns the response's status line and headers, lowercased: the requests here are ones
/// an HTTP client library would refuse to send or would normalise first.
async fn raw_head(deployment: &Deployment, head: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = deployment
        .base()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connects");
    stream.write_all(head).await.expect("writes");
    stream
        .write_all(b"\r\nHost: ledger\r\nConnection: close\r\n\r\n")
        .await
        .expect("writes");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "no answer within 10 s to {:?}",
        String::from_utf8_lossy(head)
    );
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn hostile_requests_are_refused_the_same_way(deployment: &Deployment) {
    let (admin, alice, bob) = (
        deployment.admin().await,
        deployment.customer().await,
        deployment.customer().await,
    );
    let wallet = alice.open_account("USD").await;
    let payee = bob.open_account("USD").await;
    admin.deposit(wallet, "50.00", "USD").await;

    // Finding 4: every ambiguous path is refused before routing, with problem+json, so the path
    // that was authorised is the path served. None of them reaches the metrics.
    let bearer = format!("Authorization: Bearer {}", alice.token);
    for path in [
        r"/api/v1/accounts/x\..\..\..\..\metrics",
        "/api/v1/accounts/x/../../../../metrics",
        "/api/v1/accounts/x%2F..%2F..%2Fmetrics",
        "/api/v1/accounts/x%2e%2e/metrics",
        "/api/v1/accounts/x%00",
    ] {
        let head = raw_head(
            deployment,
            format!("GET {path} HTTP/1.1\r\n{bearer}").as_bytes(),
        )
        .await;
        assert!(head.starts_with("http/1.1 400"), "GET {path}: {head}");
        assert!(
            head.contains("content-type: application/problem+json"),
            "GET {path}: {head}"
        );
    }
    // Finding 9: a path whose percent-encoding is not UTF-8 is a problem+json 400 too.
    let head = raw_head(
        deployment,
        format!("GET /api/v1/accounts/%ff%fe HTTP/1.1\r\n{bearer}").as_bytes(),
    )
    .await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(head.contains("application/problem+json"), "{head}");
    // Finding 9: /metrics is not on the public port.
    let metrics = admin.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::NOT_FOUND, "{metrics:?}");

    // Finding 7: a position no log will reach is refused as such (400), not waited for until a
    // 503.
    let unreachable = deployment
        .client()
        .get(format!("{}/api/v1/accounts/{wallet}", deployment.base()))
        .bearer_auth(&alice.token)
        .header("X-Ledger-Position", "999999999999.999999999")
        .send()
        .await
        .expect("answers");
    assert_eq!(unreachable.status(), StatusCode::BAD_REQUEST);
    let body: Value = unreachable.json().await.expect("problem+json");
    assert_eq!(body["code"], "position_unreachable", "{body}");

    // Finding 5: the payee's view of the audit trail shows its own side: not the payer's
    // customer id, nor the fraud rules' inputs (the request itself, accounts included, is the
    // payee's to see, as `GET /transactions/{id}` shows it).
    let payment = alice
        .transact(&json!({
            "type": "transfer", "amount": "20.00", "currency": "USD",
            "source_account_id": wallet, "destination_account_id": payee,
        }))
        .await;
    assert_eq!(payment.status, StatusCode::ACCEPTED, "{payment:?}");
    assert_eq!(alice.final_status(payment.id()).await, "CONFIRMED");
    bob.account_when(payee, "20.00").await;
    let trail_path = format!("/api/v1/transactions/{}/events", payment.id());
    let payees = bob.get(&trail_path).await;
    assert_eq!(payees.status, StatusCode::OK, "{payees:?}");
    let seen = payees.body.to_string();
    assert!(
        !seen.contains(&alice.id.to_string()),
        "the payee sees the payer's customer id: {seen}"
    );
    assert!(
        !seen.contains("details"),
        "the payee sees the fraud rules' inputs: {seen}"
    );
    // The admin sees the whole trail: who initiated it, and the rules' inputs.
    let whole = admin.get(&trail_path).await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let all = whole.body.to_string();
    assert!(all.contains(&alice.id.to_string()), "{all}");
    assert!(all.contains("details"), "{all}");
}
