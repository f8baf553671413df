//! The real binary, killed with SIGKILL while traffic flows: clients retry with their
//! idempotency keys, the restarted process finishes every transaction, and SPEC §8 holds.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_api::aggregates::TransactionAggregate;
use command_api::decisions::FraudDecisions;
use command_api::replay;
use command_api::store::AggregateStore;
use command_api::testing::{TEST_JWT_SECRET, admin_url};
use domain::{FraudDecision, FraudOutcome, TransactionId};
use futures::StreamExt;
use infra::auth::{JwtSigner, Role};
use infra::db::ScratchDatabase;
use rand::Rng;
use serde_json::json;
use tokio::sync::Mutex;

use crate::support::{Running, free_port, kill, post_until_accepted};
use uuid::Uuid;

const TRANSFERS: usize = 300;
const KILLS: usize = 3;

fn start(database_url: &str, amqp_prefix: &str, port: u16, saga_batch_size: usize) -> Child {
    let output = || {
        if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    };
    Command::new(env!("CARGO_BIN_EXE_command-api"))
        .env("DATABASE_URL", database_url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("JWT_SECRET", TEST_JWT_SECRET)
        .env("AMQP_URL", command_api::testing::amqp_url())
        .env("AMQP_PREFIX", amqp_prefix)
        .env("RUST_LOG", "warn")
        .env("LOG_POLL_INTERVAL_MS", "20")
        .env("SAGA_BATCH_SIZE", saga_batch_size.to_string())
        .stdout(output())
        .stderr(output())
        .spawn()
        .expect("the command-api binary starts")
}

#[tokio::test]
async fn command_api_killed_three_times_mid_traffic_finishes_every_transaction() {
    // Proves recovery of the real process: SIGKILL at random moments while 300 transfers flow,
    // retried requests replay instead of duplicating, every transaction ends, SPEC §8 holds.
    // Small saga batches: kills land between many batches.
    killed_mid_traffic(8).await;
}

#[tokio::test]
async fn command_api_killed_mid_large_batches_loses_nothing_and_applies_nothing_twice() {
    // The same with saga batches larger than the whole run: a kill lands inside a batch that
    // carries hundreds of transactions, whose appends are partly committed.
    killed_mid_traffic(4_096).await;
}

async fn killed_mid_traffic(saga_batch_size: usize) {
    let database = ScratchDatabase::create(&admin_url())
        .await
        .expect("a scratch database");
    let url = database.url();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let server = Arc::new(Mutex::new(Running(start(
        &url,
        &prefix,
        port,
        saga_batch_size,
    ))));
    let client = reqwest::Client::new();
    let signer = JwtSigner::new(&infra::testing::test_token_config()).expect("signs");
    let now = chrono::Utc::now().timestamp();
    let customers: Vec<(Uuid, String)> = (0..2)
        .map(|_| {
            let subject = Uuid::new_v4();
            (
                subject,
                signer
                    .mint(subject, &[Role::Customer], now, 3600)
                    .expect("mints"),
            )
        })
        .collect();

    // Accounts and funding, once the first process listens.
    let mut accounts = Vec::new();
    for (_, token) in &customers {
        for _ in 0..2 {
            let body = post_until_accepted(
                &client,
                &format!("{base}/api/v1/accounts"),
                token,
                "unused",
                &json!({"currency": "USD"}),
            )
            .await;
            accounts.push((
                token.clone(),
                Uuid::parse_str(body["id"].as_str().expect("id")).expect("uuid"),
            ));
        }
    }
    let pool = infra::db::connect(&url, "command_api", 4, "test")
        .await
        .expect("connects");
    // Decisions come from this test process: a second writer of the same log, as another
    // instance would be.
    let log = command_api::testing::writer_log(&pool, &url).await;
    let decisions = FraudDecisions::new(
        Arc::new(AggregateStore::<TransactionAggregate>::new(log)),
        chrono::TimeDelta::seconds(300),
    );
    let approve = |id: Uuid| {
        let decisions = decisions.clone();
        async move {
            let decision = FraudDecision {
                outcome: FraudOutcome::Approved,
                rule: None,
                details: json!({}).into(),
            };
            decisions
                .record(
                    TransactionId(id),
                    decision,
                    &command_api::metadata::for_saga("kill-test", "test", format!("decision/{id}")),
                )
                .await
                .expect("recorded");
        }
    };
    // The payment rail funds the accounts; the customers move money between them.
    let operator = signer
        .mint(Uuid::new_v4(), &[Role::Operator], now, 3600)
        .expect("mints");
    let mut planned = Vec::new();
    for (_, account) in &accounts {
        planned.push((operator.clone(), json!({"type": "deposit", "amount": "1000.00", "currency": "USD", "destination_account_id": account})));
    }
    for _ in 0..TRANSFERS {
        let (from, to) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..accounts.len()),
                rng.random_range(0..accounts.len()),
            )
        };
        if from == to {
            continue;
        }
        let amount = format!(
            "{}.{:02}",
            rand::rng().random_range(1..20),
            rand::rng().random_range(0..100)
        );
        planned.push((
            accounts[from].0.clone(),
            json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": accounts[from].1, "destination_account_id": accounts[to].1}),
        ));
    }

    let killer = {
        let server = server.clone();
        let url = url.clone();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            for _ in 0..KILLS {
                let pause = rand::rng().random_range(400..1200);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let mut child = server.lock().await;
                kill(&mut child);
                *child = Running(start(&url, &prefix, port, saga_batch_size));
            }
        })
    };
    let transactions_url = format!("{base}/api/v1/transactions");
    let ids: Vec<Uuid> = futures::stream::iter(planned.iter().enumerate())
        .map(|(index, (token, body))| {
            let (client, url, approve) = (&client, &transactions_url, &approve);
            async move {
                let key = format!("kill-test-{index}");
                let accepted = post_until_accepted(client, url, token, &key, body).await;
                let id = Uuid::parse_str(accepted["id"].as_str().expect("id")).expect("uuid");
                approve(id).await;
                id
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    killer.await.expect("the killer finished");

    // Everything settles with the last process alive.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let report = replay::audit(&pool, "command_api.events")
            .await
            .expect("audits");
        assert!(report.violations.is_empty(), "{:#?}", report.violations);
        if report.in_flight.is_empty() {
            assert_eq!(
                report.transactions_confirmed + report.transactions_rejected,
                ids.len()
            );
            let total: i64 = report
                .accounts
                .values()
                .map(|account| account.balance_minor)
                .sum();
            assert_eq!(total, 4 * 100_000, "transfers move money, never create it");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in flight: {}",
            report.in_flight.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'TransactionCreated'")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!(
        created,
        i64::try_from(ids.len()).expect("small"),
        "retries replayed, never duplicated"
    );
    kill(&mut *server.lock().await);
    pool.close().await;
    database.drop_database().await.expect("drops");
    command_api::testing::delete_topology(&prefix)
        .await
        .expect("deletes the topology");
}
