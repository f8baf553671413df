//! The whole write path of SPEC §4 with real parts: command-api and the fraud worker, RabbitMQ
//! and Redis. No decision is recorded by hand here: each comes from the fraud worker's rules.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_api::replay;
use command_api::testing::{TEST_JWT_SECRET, TestOptions, admin_url, amqp_url};
use futures::StreamExt;
use infra::amqp::Topology;
use infra::auth::{JwtSigner, Role};
use infra::db::ScratchDatabase;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::binary;
use tokio::sync::{Mutex, oneshot};
use uuid::Uuid;

use crate::support::{
    Audited, Harness, Running, balance_of, declare_tap, eventually, free_port, kill,
    post_until_accepted,
};

/// A fraud worker running in this process on the harness's topology.
struct FraudWorker {
    redis_key_prefix: String,
    shutdown: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl FraudWorker {
    async fn start(amqp_prefix: &str) -> FraudWorker {
        let redis_key_prefix = format!("test:{}", Uuid::new_v4().simple());
        let options = fraud_worker::testing::TestOptions::default();
        let config = fraud_worker::testing::test_config(amqp_prefix, &redis_key_prefix, &options);
        let app = fraud_worker::startup::App::build(config)
            .await
            .expect("the fraud worker starts");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = stopped.await;
                })
                .await;
        });
        FraudWorker {
            redis_key_prefix,
            shutdown: Some(shutdown),
            handle,
        }
    }

    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let _ = (&mut self.handle).await;
        fraud_worker::testing::delete_redis_keys(&self.redis_key_prefix)
            .await
            .expect("the worker's Redis keys are deleted");
    }
}

/// Funds `account` with operator deposits below the fraud threshold.
async fn fund(harness: &Harness, account: Uuid, deposits: usize) -> Vec<Uuid> {
    let operator = harness.operator();
    let mut ids = Vec::new();
    for _ in 0..deposits {
        ids.push(
            harness
                .transact(&operator, json!({"type": "deposit", "amount": "9000.00", "currency": "USD", "destination_account_id": account}))
                .await,
        );
    }
    harness.wait_settled(&ids).await;
    ids
}

#[tokio::test]
async fn transfers_go_from_pending_to_confirmed_or_rejected_through_rabbitmq() {
    // Proves SPEC §4 end to end: POST → 202 PENDING → CONFIRMED for 500.00, and → REJECTED
    // fraud_suspected (hold released) for 10000.00, decided by the fraud worker over RabbitMQ.
    let harness = Harness::start().await;
    let worker = FraudWorker::start(&harness.amqp_prefix).await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    fund(&harness, source, 2).await;
    let mut outcomes = Vec::new();
    for amount in ["500.00", "10000.00"] {
        let response = harness
            .post(
                "/api/v1/transactions",
                Some(&alice),
                Some(&Uuid::new_v4().to_string()),
                &json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": source, "destination_account_id": destination}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["status"], "PENDING");
        outcomes.push(Uuid::parse_str(body["id"].as_str().expect("id")).expect("uuid"));
    }
    harness.wait_settled(&outcomes).await;
    assert_eq!(
        harness.outcome(outcomes[0]).await,
        ("CONFIRMED".to_owned(), None)
    );
    assert_eq!(
        harness.outcome(outcomes[1]).await,
        ("REJECTED".to_owned(), Some("fraud_suspected".to_owned()))
    );
    let rule: Option<String> = sqlx::query_scalar(
        "SELECT payload->'FraudChecked'->'decision'->>'rule' FROM command_api.events \
         WHERE aggregate_id = $1 AND event_type = 'FraudChecked'",
    )
    .bind(outcomes[1].to_string())
    .fetch_one(&harness.app.pool)
    .await
    .expect("reads");
    assert_eq!(rule.as_deref(), Some("amount_threshold"));
    let report = harness.assert_invariants().await;
    assert_eq!(
        balance_of(&report, source),
        (1_800_000 - 50_000, 1_800_000 - 50_000)
    );
    assert_eq!(balance_of(&report, destination), (50_000, 50_000));
    worker.stop().await;
    harness.finish().await;
}

/// Messages waiting in `queue` (passive declare).
async fn waiting(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|queue| queue.message_count())
        .unwrap_or(u32::MAX)
}

#[tokio::test]
async fn every_message_delivered_twice_still_yields_one_decision_and_one_settlement() {
    // Proves idempotent consumers: after 20 transfers settled, the relay is rewound and
    // republishes the whole log; the fraud worker decides every transaction again and command-api
    // receives every decision twice — no event is appended, no money moves.
    let harness = Harness::start().await;
    let worker = FraudWorker::start(&harness.amqp_prefix).await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    fund(&harness, source, 1).await;
    let body = json!({"type": "transfer", "amount": "100.00", "currency": "USD", "source_account_id": source, "destination_account_id": destination});
    let ids =
        futures::future::join_all((0..20).map(|_| harness.transact(&alice, body.clone()))).await;
    harness.wait_settled(&ids).await;
    let before = harness.assert_invariants().await;
    let events = harness.event_count().await;

    // Rewind only once the relay has published the first round and is idle: a batch still in
    // flight would store its checkpoint over the rewind.
    let last: i64 = sqlx::query_scalar(
        "SELECT max(position) FROM command_api.events WHERE event_type = 'TransactionCreated'",
    )
    .fetch_one(&harness.app.pool)
    .await
    .expect("reads");
    eventually(Duration::from_secs(30), || async {
        let relayed: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM command_api.follower_checkpoints WHERE name = 'relay'",
        )
        .fetch_optional(&harness.app.pool)
        .await
        .expect("reads");
        relayed == Some(last)
    })
    .await;
    // Watch the decisions of the second round: every transaction must be decided again.
    let topology = Topology::new(&harness.amqp_prefix).expect("valid");
    let connection = infra::amqp::connect(&amqp_url()).await.expect("connects");
    let channel = connection.create_channel().await.expect("a channel");
    let tap = declare_tap(
        &channel,
        &topology.decisions_exchange(),
        infra::amqp::FRAUD_DECISION_KEY,
    )
    .await;
    sqlx::query(
        "UPDATE command_api.follower_checkpoints SET tx_id = 0, position = 0 WHERE name = 'relay'",
    )
    .execute(&harness.app.pool)
    .await
    .expect("rewinds the relay");
    let last: i64 = sqlx::query_scalar(
        "SELECT max(position) FROM command_api.events WHERE event_type = 'TransactionCreated'",
    )
    .fetch_one(&harness.app.pool)
    .await
    .expect("reads");
    eventually(Duration::from_secs(30), || async {
        let relayed: i64 = sqlx::query_scalar(
            "SELECT position FROM command_api.follower_checkpoints WHERE name = 'relay'",
        )
        .fetch_one(&harness.app.pool)
        .await
        .expect("reads");
        relayed >= last
    })
    .await;
    // Every transaction (the funding deposit and the 20 transfers) was decided a second time.
    let mut decided_again = std::collections::HashSet::new();
    let decided_deadline = std::time::Instant::now() + Duration::from_secs(30);
    while decided_again.len() < ids.len() + 1 {
        assert!(
            std::time::Instant::now() < decided_deadline,
            "only {} decided again",
            decided_again.len()
        );
        match channel
            .basic_get(
                tap.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
        {
            Some(message) => {
                let decision: infra::messages::DecisionMessage =
                    serde_json::from_slice(&message.delivery.data).expect("a decision");
                decided_again.insert(decision.transaction_id);
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // Both queues drained, and stay drained.
    let quiet_deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut quiet = 0;
    while quiet < 10 {
        assert!(
            std::time::Instant::now() < quiet_deadline,
            "the queues never drained"
        );
        let idle = waiting(&channel, &topology.fraud_queue()).await == 0
            && waiting(&channel, &topology.decisions_queue()).await == 0;
        quiet = if idle { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        harness.event_count().await,
        events,
        "the second delivery appended nothing"
    );
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT aggregate_id FROM command_api.events WHERE event_type = 'FraudChecked' \
         GROUP BY aggregate_id HAVING count(*) > 1) AS doubled",
    )
    .fetch_one(&harness.app.pool)
    .await
    .expect("counts");
    assert_eq!(duplicates, 0);
    for queue in [topology.fraud_queue(), topology.decisions_queue()] {
        assert_eq!(
            waiting(&channel, &Topology::dead_letter_queue(&queue)).await,
            0,
            "nothing dead-lettered from {queue}"
        );
    }
    let after = harness.assert_invariants().await;
    assert_eq!(balance_of(&after, source), balance_of(&before, source));
    assert_eq!(balance_of(&after, destination), (200_000, 200_000));
    let _ = connection.close(200, "done".into()).await;
    worker.stop().await;
    harness.finish().await;
}

#[tokio::test]
async fn with_the_fraud_worker_stopped_transactions_time_out_and_release_their_holds() {
    // Proves the decision timeout: with no fraud worker running, a transfer ends REJECTED
    // fraud_check_timeout, its hold is released, and nothing is dead-lettered meanwhile.
    let harness = Harness::start_with(TestOptions {
        decision_timeout_seconds: 5,
        ..TestOptions::default()
    })
    .await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    // Funded with a decision recorded directly: no fraud worker runs in this test.
    harness.fund(source, "9000.00", "USD").await;
    let id = harness
        .transact(&alice, json!({"type": "transfer", "amount": "40.00", "currency": "USD", "source_account_id": source, "destination_account_id": destination}))
        .await;
    harness.wait_settled(&[id]).await;
    assert_eq!(
        harness.outcome(id).await,
        (
            "REJECTED".to_owned(),
            Some("fraud_check_timeout".to_owned())
        )
    );
    let report = harness.assert_invariants().await;
    assert_eq!(
        balance_of(&report, source),
        (900_000, 900_000),
        "the hold was released"
    );
    harness.finish().await;
}

const KILL_TEST_TRANSFERS: usize = 1_000;

fn output() -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

struct Processes {
    database_url: String,
    amqp_prefix: String,
    redis_key_prefix: String,
    port: u16,
}

impl Processes {
    fn command_api(&self) -> Child {
        Command::new(binary("command-api"))
            .env("DATABASE_URL", &self.database_url)
            .env("LISTEN_ADDR", format!("127.0.0.1:{}", self.port))
            .env("JWT_SECRET", TEST_JWT_SECRET)
            .env("AMQP_URL", amqp_url())
            .env("AMQP_PREFIX", &self.amqp_prefix)
            .env("RUST_LOG", "warn")
            .env("LOG_POLL_INTERVAL_MS", "5")
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("command-api starts")
    }

    fn fraud_worker(&self) -> Child {
        Command::new(binary("fraud-worker"))
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", TEST_JWT_SECRET)
            .env("AMQP_URL", amqp_url())
            .env("AMQP_PREFIX", &self.amqp_prefix)
            .env("REDIS_URL", fraud_worker::testing::redis_url())
            .env("REDIS_KEY_PREFIX", &self.redis_key_prefix)
            .env("RUST_LOG", "warn")
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("fraud-worker starts")
    }
}

#[tokio::test]
async fn killing_command_api_or_the_fraud_worker_mid_traffic_leaves_nothing_stuck() {
    // Proves recovery of the real processes: 1,000 transfers flow while command-api and the
    // fraud worker are each SIGKILLed and restarted; every transaction ends CONFIRMED or REJECTED
    // and SPEC §8 holds.
    let database = ScratchDatabase::create(&admin_url())
        .await
        .expect("a scratch database");
    let processes = Arc::new(Processes {
        database_url: database.url(),
        amqp_prefix: format!("test-{}", Uuid::new_v4().simple()),
        redis_key_prefix: format!("test:{}", Uuid::new_v4().simple()),
        port: free_port(),
    });
    let api = Arc::new(Mutex::new(Running(processes.command_api())));
    let worker = Arc::new(Mutex::new(Running(processes.fraud_worker())));
    let base = format!("http://127.0.0.1:{}", processes.port);
    let client = reqwest::Client::new();
    let signer = JwtSigner::new(&infra::testing::test_token_config()).expect("signs");
    let token = signer
        .mint(
            Uuid::new_v4(),
            &[Role::Customer],
            chrono::Utc::now().timestamp(),
            3600,
        )
        .expect("mints");
    // The payment rail funds the accounts; the customer moves money between them.
    let operator = signer
        .mint(
            Uuid::new_v4(),
            &[Role::Operator],
            chrono::Utc::now().timestamp(),
            3600,
        )
        .expect("mints");
    let mut accounts = Vec::new();
    for index in 0..4 {
        let body = post_until_accepted(
            &client,
            &format!("{base}/api/v1/accounts"),
            &token,
            &format!("account-{index}"),
            &json!({"currency": "USD"}),
        )
        .await;
        accounts.push(Uuid::parse_str(body["id"].as_str().expect("id")).expect("uuid"));
    }
    let mut planned: Vec<(&str, Value)> = accounts
        .iter()
        .map(|account| (operator.as_str(), json!({"type": "deposit", "amount": "5000.00", "currency": "USD", "destination_account_id": account})))
        .collect();
    while planned.len() < accounts.len() + KILL_TEST_TRANSFERS {
        let (from, to) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..accounts.len()),
                rng.random_range(0..accounts.len()),
            )
        };
        if from != to {
            let amount = format!(
                "{}.{:02}",
                rand::rng().random_range(1..10),
                rand::rng().random_range(0..100)
            );
            planned.push((token.as_str(), json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": accounts[from], "destination_account_id": accounts[to]})));
        }
    }

    // Kill while traffic flows: after 20, 40, 60 and 80 % of the requests were accepted.
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = planned.len();
    let killer = {
        let (api, worker, processes, accepted) = (
            api.clone(),
            worker.clone(),
            processes.clone(),
            accepted.clone(),
        );
        tokio::spawn(async move {
            for round in 0..4 {
                while accepted.load(std::sync::atomic::Ordering::Relaxed) < total * (round + 1) / 5
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if round % 2 == 0 {
                    let mut child = api.lock().await;
                    kill(&mut child);
                    *child = Running(processes.command_api());
                } else {
                    let mut child = worker.lock().await;
                    kill(&mut child);
                    *child = Running(processes.fraud_worker());
                }
            }
        })
    };
    let url = format!("{base}/api/v1/transactions");
    let ids: Vec<Uuid> = futures::stream::iter(planned.iter().enumerate())
        .map(|(index, (token, body))| {
            let (client, url, accepted) = (&client, &url, &accepted);
            async move {
                let answer =
                    post_until_accepted(client, url, token, &format!("transfer-{index}"), body)
                        .await;
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Uuid::parse_str(answer["id"].as_str().expect("id")).expect("uuid")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    killer.await.expect("the killer finished");

    let pool = infra::db::connect(&processes.database_url, "command_api", 2, "test")
        .await
        .expect("connects");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let report = loop {
        let report = replay::audit(&pool, "command_api.events")
            .await
            .expect("audits");
        assert!(report.violations.is_empty(), "{:#?}", report.violations);
        if report.in_flight.is_empty() {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} transactions stuck",
            report.in_flight.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        report.transactions_confirmed + report.transactions_rejected,
        ids.len()
    );
    let timeouts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'TransactionRejected' \
         AND payload->'TransactionRejected'->>'reason' = 'fraud_check_timeout'",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(timeouts, 0, "every decision arrived; none timed out");
    let total: i64 = report
        .accounts
        .values()
        .map(|account| account.balance_minor)
        .sum();
    assert_eq!(total, 4 * 500_000, "transfers move money, never create it");
    for child in [&api, &worker] {
        kill(&mut *child.lock().await);
    }
    pool.close().await;
    database.drop_database().await.expect("drops");
    command_api::testing::delete_topology(&processes.amqp_prefix)
        .await
        .expect("deletes the topology");
    fraud_worker::testing::delete_redis_keys(&processes.redis_key_prefix)
        .await
        .expect("deletes the keys");
}
