//! The query API of SPEC §5: pagination, ownership and roles, the JSON shapes, the audit
//! trail of a transaction and read-your-writes.

use std::collections::HashSet;

use domain::FraudOutcome;
use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use crate::support::{Harness, uuid_of};

/// Follows `next_cursor` from `path` (which has a query string) and returns every page.
async fn pages(harness: &Harness, path: &str, token: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut url = path.to_owned();
    loop {
        let body = harness.get_ok(&url, token).await;
        let items = body["items"].as_array().expect("items").clone();
        pages.push(items);
        assert!(pages.len() <= 10, "pagination does not end");
        match body["next_cursor"].as_str() {
            Some(cursor) => url = format!("{path}&cursor={cursor}"),
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                return pages;
            }
        }
    }
}

/// A refused GET: its status and problem `code`.
async fn problem(harness: &Harness, path: &str, token: &str) -> (StatusCode, String) {
    let response = harness.get(path, Some(token), None).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json", "{path}");
    let body: Value = response.json().await.expect("a problem body");
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_transaction_lists_page_newest_first_without_gaps() {
    // Proves keyset pagination: 25 transactions on one account come back 10/10/5, newest first,
    // each once, with the balance after each one, on both the history and the transaction
    // list; bad page sizes and forged cursors are 400s with their own codes.
    let harness = Harness::start().await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    let other = harness.open_account(&token, "USD").await;
    // Settled one by one, so that the balance after each is known.
    let mut created = vec![harness.fund(account, "100.00", "USD").await];
    for _ in 0..24 {
        let id = harness
            .transfer(&token, account, other, "1.00", "USD")
            .await;
        harness.decide(id, FraudOutcome::Approved).await;
        harness.wait_settled(&[id]).await;
        created.push(id);
    }
    harness.caught_up().await;

    let history = pages(
        &harness,
        &format!("/api/v1/accounts/{account}/history?page_size=10"),
        &token,
    )
    .await;
    assert_eq!(
        history.iter().map(Vec::len).collect::<Vec<_>>(),
        [10, 10, 5]
    );
    let items: Vec<&Value> = history.iter().flatten().collect();
    let ids: Vec<Uuid> = items
        .iter()
        .map(|item| uuid_of(&item["transaction_id"]))
        .collect();
    let newest_first: Vec<Uuid> = created.iter().rev().copied().collect();
    assert_eq!(ids, newest_first);
    for (index, item) in items.iter().enumerate() {
        let transfers_up_to_here = 24 - index;
        assert_eq!(item["status"], "CONFIRMED");
        assert_eq!(
            item["balance_after"],
            format!("{}.00", 100 - transfers_up_to_here),
            "{item}"
        );
        if index < 24 {
            assert_eq!(
                (&item["type"], &item["amount"]),
                (&"transfer".into(), &"-1.00".into())
            );
        } else {
            assert_eq!(
                (&item["type"], &item["amount"]),
                (&"deposit".into(), &"100.00".into())
            );
        }
    }

    let listed = pages(
        &harness,
        &format!("/api/v1/transactions?account_id={account}&page_size=10"),
        &token,
    )
    .await;
    assert_eq!(listed.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let listed: Vec<Uuid> = listed
        .iter()
        .flatten()
        .map(|item| uuid_of(&item["id"]))
        .collect();
    assert_eq!(listed, newest_first);
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), 25);

    let history_path = format!("/api/v1/accounts/{account}/history");
    for size in ["0", "101", "abc", "-1", "1.5"] {
        assert_eq!(
            problem(
                &harness,
                &format!("{history_path}?page_size={size}"),
                &token
            )
            .await,
            (StatusCode::BAD_REQUEST, "invalid_page_size".to_owned()),
            "page_size={size}"
        );
    }
    for cursor in ["forged", "djE6LTE", "djI6NDI", ""] {
        assert_eq!(
            problem(&harness, &format!("{history_path}?cursor={cursor}"), &token).await,
            (StatusCode::BAD_REQUEST, "invalid_cursor".to_owned()),
            "cursor={cursor}"
        );
        assert_eq!(
            problem(
                &harness,
                &format!("/api/v1/transactions?account_id={account}&cursor={cursor}"),
                &token
            )
            .await,
            (StatusCode::BAD_REQUEST, "invalid_cursor".to_owned()),
            "cursor={cursor}"
        );
    }
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_see_only_their_own_and_staff_see_everything() {
    // Proves SPEC §5 and §8.6 on the read side: someone else's account, balance, history,
    // transaction, audit trail and transaction list are 404s; a customer lists only their own
    // accounts (asking for another owner's is 403); admins and auditors read everything; no
    // token is a 401 with WWW-Authenticate; and the bodies have SPEC §5's shapes, amounts as
    // decimal strings in the currency's decimals.
    let harness = Harness::start().await;
    let (alice, alice_token) = harness.customer();
    let (bob, bob_token) = harness.customer();
    let (_, eve_token) = harness.customer();
    let alice_usd = harness.open_account(&alice_token, "USD").await;
    let bob_usd = harness.open_account(&bob_token, "USD").await;
    let bob_jpy = harness.open_account(&bob_token, "JPY").await;
    harness.fund(alice_usd, "1000.00", "USD").await;
    harness.fund(bob_jpy, "500", "JPY").await;
    let transfer = harness
        .transfer(&alice_token, alice_usd, bob_usd, "10.00", "USD")
        .await;
    harness.decide(transfer, FraudOutcome::Approved).await;
    harness.wait_settled(&[transfer]).await;
    harness.caught_up().await;

    let of_alice = [
        format!("/api/v1/accounts/{alice_usd}"),
        format!("/api/v1/accounts/{alice_usd}/balance"),
        format!("/api/v1/accounts/{alice_usd}/history"),
        format!("/api/v1/transactions?account_id={alice_usd}"),
    ];
    let of_the_transfer = [
        format!("/api/v1/transactions/{transfer}"),
        format!("/api/v1/transactions/{transfer}/events"),
    ];
    for path in of_alice.iter().chain(&of_the_transfer) {
        assert_eq!(
            problem(&harness, path, &eve_token).await,
            (StatusCode::NOT_FOUND, "not_found".to_owned()),
            "{path} for a stranger"
        );
        assert_eq!(harness.get_json(path, &alice_token).await.0, StatusCode::OK);
    }
    // Bob is a party to the transfer, but Alice's account is still not his.
    for path in &of_the_transfer {
        assert_eq!(harness.get_json(path, &bob_token).await.0, StatusCode::OK);
    }
    for path in &of_alice {
        assert_eq!(
            harness.get_json(path, &bob_token).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    let unknown = Uuid::new_v4();
    for path in [
        format!("/api/v1/accounts/{unknown}"),
        format!("/api/v1/transactions/{unknown}"),
        "/api/v1/accounts/not-a-uuid".to_owned(),
    ] {
        assert_eq!(
            harness.get_json(&path, &alice_token).await.0,
            StatusCode::NOT_FOUND
        );
    }

    // Lists: a customer's own accounts only; staff see all, and may filter by owner.
    let ids = |body: Value| -> HashSet<Uuid> {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|item| uuid_of(&item["id"]))
            .collect()
    };
    let listed = ids(harness.get_ok("/api/v1/accounts", &bob_token).await);
    assert_eq!(listed, HashSet::from([bob_usd, bob_jpy]));
    assert_eq!(
        ids(harness
            .get_ok(&format!("/api/v1/accounts?owner_id={bob}"), &bob_token)
            .await),
        listed
    );
    assert_eq!(
        problem(
            &harness,
            &format!("/api/v1/accounts?owner_id={alice}"),
            &bob_token
        )
        .await,
        (StatusCode::FORBIDDEN, "forbidden".to_owned())
    );
    let bob_transactions = ids(harness.get_ok("/api/v1/transactions", &bob_token).await);
    assert!(bob_transactions.contains(&transfer));
    assert!(ids(harness.get_ok("/api/v1/transactions", &eve_token).await).is_empty());
    for role in [Role::Admin, Role::Auditor] {
        let staff = harness.token_with(role);
        let everything = ids(harness.get_ok("/api/v1/accounts", &staff).await);
        assert!(everything.is_superset(&HashSet::from([alice_usd, bob_usd, bob_jpy])));
        assert_eq!(
            ids(harness
                .get_ok(&format!("/api/v1/accounts?owner_id={bob}"), &staff)
                .await),
            listed
        );
        for path in of_alice.iter().chain(&of_the_transfer) {
            assert_eq!(
                harness.get_json(path, &staff).await.0,
                StatusCode::OK,
                "{path}"
            );
        }
    }
    let roleless = harness.app.token(Uuid::new_v4(), &[]);
    assert_eq!(
        harness.get_json("/api/v1/accounts", &roleless).await.0,
        StatusCode::FORBIDDEN
    );

    // No token, or a bad one: 401 with a challenge.
    for token in [None, Some("not-a-jwt")] {
        let response = harness.get(&of_alice[0], token, None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key("www-authenticate"));
    }

    // Shapes.
    let account = harness
        .get_ok(&format!("/api/v1/accounts/{bob_jpy}"), &bob_token)
        .await;
    for field in [
        "id",
        "owner_id",
        "currency",
        "name",
        "balance",
        "available",
        "held",
        "pending_credits",
        "status",
        "version",
        "created_at",
        "updated_at",
    ] {
        assert!(
            account.get(field).is_some(),
            "account lacks {field}: {account}"
        );
    }
    assert_eq!(account["owner_id"], bob.to_string());
    assert_eq!(account["currency"], "JPY");
    assert_eq!(
        (&account["balance"], &account["available"]),
        (&"500".into(), &"500".into())
    );
    assert_eq!(
        (&account["held"], &account["pending_credits"]),
        (&"0".into(), &"0".into())
    );
    let balance = harness
        .get_ok(
            &format!("/api/v1/accounts/{alice_usd}/balance"),
            &alice_token,
        )
        .await;
    assert_eq!(
        balance,
        serde_json::json!({"account_id": alice_usd, "currency": "USD",
            "balance": "990.00", "available": "990.00"})
    );
    let paid = &harness
        .get_ok(
            &format!("/api/v1/accounts/{alice_usd}/history"),
            &alice_token,
        )
        .await["items"][0];
    let received = &harness
        .get_ok(&format!("/api/v1/accounts/{bob_usd}/history"), &bob_token)
        .await["items"][0];
    assert_eq!(paid["transaction_id"], transfer.to_string());
    assert_eq!(
        (&paid["amount"], &paid["balance_after"]),
        (&"-10.00".into(), &"990.00".into())
    );
    assert_eq!(
        (&received["amount"], &received["balance_after"]),
        (&"10.00".into(), &"10.00".into())
    );
    for item in [paid, received] {
        assert_eq!(
            (&item["type"], &item["status"]),
            (&"transfer".into(), &"CONFIRMED".into())
        );
        assert_rfc3339(&item["created_at"]);
    }
    let transaction = harness
        .get_ok(&format!("/api/v1/transactions/{transfer}"), &bob_token)
        .await;
    for field in [
        "id",
        "type",
        "status",
        "amount",
        "currency",
        "source_account_id",
        "destination_account_id",
        "created_at",
        "updated_at",
        "version",
    ] {
        assert!(
            transaction.get(field).is_some(),
            "transaction lacks {field}: {transaction}"
        );
    }
    assert_eq!(transaction["amount"], "10.00");
    assert_eq!(transaction["status"], "CONFIRMED");
    assert_eq!(transaction["source_account_id"], alice_usd.to_string());
    assert_eq!(transaction["destination_account_id"], bob_usd.to_string());
    assert_eq!(transaction["fraud"]["outcome"], "approved");
    assert_rfc3339(&transaction["created_at"]);
    assert_rfc3339(&transaction["updated_at"]);
    harness.finish().await;
}

fn assert_rfc3339(value: &Value) {
    let text = value.as_str().expect("a timestamp string");
    let parsed = chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339");
    assert_eq!(parsed.offset().local_minus_utc(), 0, "{text} is not UTC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_lists_a_transactions_events_in_order() {
    // Proves GET /transactions/{id}/events returns the stream as stored: every event in
    // sequence order with its type, version, time, payload and metadata (correlation id).
    let harness = Harness::start().await;
    let (_, token) = harness.customer();
    let source = harness.open_account(&token, "GBP").await;
    let destination = harness.open_account(&token, "GBP").await;
    harness.fund(source, "50.00", "GBP").await;
    let (transfer, _) = harness
        .transact(
            &token,
            serde_json::json!({"type": "transfer", "amount": "12.34", "currency": "GBP",
                "source_account_id": source, "destination_account_id": destination,
                "description": "rent"}),
        )
        .await;
    harness.decide(transfer, FraudOutcome::Approved).await;
    harness.wait_settled(&[transfer]).await;
    harness.caught_up().await;

    let body = harness
        .get_ok(&format!("/api/v1/transactions/{transfer}/events"), &token)
        .await;
    let items = body["items"].as_array().expect("items");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_api.events
         WHERE aggregate_type = 'transaction' AND aggregate_id = $1",
    )
    .bind(transfer.to_string())
    .fetch_one(&harness.app.pool)
    .await
    .expect("counting the stream");
    assert_eq!(items.len() as i64, stored);
    let sequences: Vec<i64> = items
        .iter()
        .map(|item| item["sequence"].as_i64().expect("a sequence"))
        .collect();
    assert_eq!(sequences, (1..=stored).collect::<Vec<_>>());
    let types: Vec<&str> = items
        .iter()
        .map(|item| item["type"].as_str().expect("a type"))
        .collect();
    assert_eq!(types.first(), Some(&"TransactionCreated"));
    assert_eq!(types.last(), Some(&"SettlementCompleted"));
    for expected in ["FundsReserved", "FraudChecked", "TransactionConfirmed"] {
        assert!(types.contains(&expected), "{types:?} lacks {expected}");
    }
    for item in items {
        assert!(
            item["event_version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{item}"
        );
        assert_rfc3339(&item["recorded_at"]);
        assert!(item["payload"].is_object(), "{item}");
        let correlation = item["metadata"]["correlation_id"]
            .as_str()
            .unwrap_or_default();
        assert!(!correlation.is_empty(), "no correlation id: {item}");
    }
    assert_eq!(
        items[0]["payload"]["TransactionCreated"]["request"]["description"],
        "rent"
    );
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_the_command_position_sees_the_write() {
    // Proves read-your-writes: a GET sending the POST's X-Ledger-Position finds the new
    // transaction every time (it waits for the projector instead of answering 404), and says
    // where the read side stood; a malformed position is a 400, and so (at once, finding 7) is
    // one beyond the head of the log, which no projection will ever reach.
    let harness = Harness::start().await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    for round in 0..50 {
        let (id, position) = harness
            .transact(
                &harness.token_with(Role::Operator),
                serde_json::json!({"type": "deposit", "amount": "1.00", "currency": "USD",
                    "destination_account_id": account}),
            )
            .await;
        let response = harness
            .get_at(&format!("/api/v1/transactions/{id}"), &token, &position)
            .await;
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let reached = response
            .headers()
            .get("x-ledger-position")
            .and_then(|value| value.to_str().ok())
            .expect("the answer says where the read side stood")
            .parse::<infra::log::LogPosition>()
            .expect("a position");
        assert!(reached >= position.parse().expect("a position"));
    }

    let path = format!("/api/v1/accounts/{account}");
    for malformed in ["abc", "1", "1.x", "-1.5", "1.2.3"] {
        let response = harness.get(&path, Some(&token), Some(malformed)).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{malformed}");
        let body: Value = response.json().await.expect("a problem");
        assert_eq!(body["code"], "invalid_position");
    }
    let response = harness
        .get(&path, Some(&token), Some("999999999999.999999999999"))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("a problem");
    assert_eq!(body["code"], "position_unreachable");
    harness.finish().await;
}

#[tokio::test]
async fn reads_waiting_for_a_position_are_bounded_in_number() {
    // Proves finding 7's other half: a position the log has but the projections have not
    // applied yet makes a read wait, and only POSITION_WAITERS_MAX reads may wait at once; the
    // next is told 503 too_many_waiting_reads at once. The projections are held back
    // deterministically: an open transaction that started before the write keeps every
    // follower below it (decision 3), while the write itself is committed and in the log.
    let harness = Harness::start_with(projector::testing::TestOptions {
        position_waiters_max: 0,
        ..projector::testing::TestOptions::default()
    })
    .await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    let mut blocker = harness
        .app
        .pool
        .begin()
        .await
        .expect("a transaction that holds the followers back");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *blocker)
        .await
        .expect("it takes a transaction id");
    let (_, position) = harness
        .transact(
            &harness.token_with(Role::Operator),
            serde_json::json!({"type": "deposit", "amount": "1.00", "currency": "USD",
                "destination_account_id": account}),
        )
        .await;
    let response = harness
        .get(
            &format!("/api/v1/accounts/{account}"),
            Some(&token),
            Some(&position),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("a problem");
    assert_eq!(body["code"], "too_many_waiting_reads");
    blocker.rollback().await.expect("the blocker ends");
    harness.finish().await;
}
