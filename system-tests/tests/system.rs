//! The whole system as an operator runs it: the four service binaries as processes on a scratch
//! database, their own RabbitMQ topology and Redis prefixes, JSON logs to files. A client talks
//! to the gateway only. One correlation id sent with a deposit must appear in every service's
//! log and in the event's metadata; no log may contain the password or the token.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use infra::db::ScratchDatabase;
use infra::testing::{admin_url, amqp_url, redis_url};
use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::Service;
use uuid::Uuid;

const SECRET: &str = "system-test-secret-of-at-least-thirty-two-bytes";
const ADMIN_PASSWORD: &str = "admin-password-for-the-system-test";

/// How long a service may take to log its port.
const LISTEN_WITHIN: Duration = Duration::from_secs(60);
/// How long a service gets to stop gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts a service of the kit with the test's secret and JSON logs at `info`.
fn start(name: &'static str, logs: &Path, env: &[(&str, String)]) -> Service {
    let mut all = vec![
        ("LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "info".to_owned()),
        ("JWT_SECRET", SECRET.to_owned()),
    ];
    all.extend(env.iter().cloned());
    Service::start(name, logs, &all).unwrap_or_else(|error| panic!("{error}"))
}

async fn port(service: &mut Service) -> u16 {
    service
        .port(LISTEN_WITHIN)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_correlation_id_follows_a_deposit_through_all_four_services() {
    let database = ScratchDatabase::create(&admin_url())
        .await
        .expect("a scratch database");
    let logs = std::env::temp_dir().join(format!("ledger-system-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&logs).expect("a log directory");
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let url = database.url();
    let any_port = "127.0.0.1:0".to_owned();
    let mut command_api = start(
        "command-api",
        &logs,
        &[
            ("DATABASE_URL", url.clone()),
            ("AMQP_URL", amqp_url()),
            ("AMQP_PREFIX", prefix.clone()),
            ("LISTEN_ADDR", any_port.clone()),
        ],
    );
    let mut fraud_worker = start(
        "fraud-worker",
        &logs,
        &[
            ("AMQP_URL", amqp_url()),
            ("AMQP_PREFIX", prefix.clone()),
            ("REDIS_URL", redis_url()),
            ("REDIS_KEY_PREFIX", format!("{prefix}:fraud")),
            ("LISTEN_ADDR", any_port.clone()),
        ],
    );
    let mut projector = start(
        "projector",
        &logs,
        &[
            ("DATABASE_URL", url.clone()),
            ("REDIS_URL", redis_url()),
            ("REDIS_KEY_PREFIX", format!("{prefix}:cache")),
            ("LISTEN_ADDR", any_port.clone()),
        ],
    );
    // The gateway needs the others' addresses, so it starts once they listen.
    let (command_port, fraud_port, query_port) = (
        port(&mut command_api).await,
        port(&mut fraud_worker).await,
        port(&mut projector).await,
    );
    let mut gateway_service = start(
        "gateway",
        &logs,
        &[
            ("DATABASE_URL", url.clone()),
            ("LISTEN_ADDR", any_port),
            (
                "COMMAND_API_URL",
                format!("http://127.0.0.1:{command_port}"),
            ),
            ("QUERY_API_URL", format!("http://127.0.0.1:{query_port}")),
            ("FRAUD_WORKER_URL", format!("http://127.0.0.1:{fraud_port}")),
            ("ADMIN_USERNAME", "operator".to_owned()),
            ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ],
    );
    let gateway_port = port(&mut gateway_service).await;
    let mut services = vec![command_api, fraud_worker, projector, gateway_service];
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");

    // Every service up, as the gateway's aggregated health says.
    eventually(
        "the gateway reports every service ok",
        Duration::from_secs(60),
        || async {
            let Ok(response) = client.get(format!("{gateway}/health")).send().await else {
                return false;
            };
            let body: Value = response.json().await.unwrap_or_default();
            body["status"] == "ok"
        },
    )
    .await;

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
    let token = response.json::<Value>().await.expect("JSON")["access_token"]
        .as_str()
        .expect("a token")
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

    // The deposit, with our correlation id.
    let correlation = format!("system-test-{}", Uuid::new_v4().simple());
    let response = client
        .post(format!("{gateway}/api/v1/transactions"))
        .bearer_auth(&token)
        .header("X-Correlation-ID", &correlation)
        .header("Idempotency-Key", "top-up-1")
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
                .bearer_auth(&token)
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
        let request = client.get(format!("{gateway}{path}")).bearer_auth(&token);
        async move {
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

    // The audit trail carries the id in every event's metadata.
    let trail = read(format!("/api/v1/transactions/{transaction}/events")).await;
    let events = trail["items"].as_array().expect("items");
    assert!(events.len() >= 5, "{trail}");
    for event in events {
        assert_eq!(
            event["metadata"]["correlation_id"],
            correlation.as_str(),
            "{event}"
        );
    }

    // The README's walkthrough, run as written against the same system.
    let output = run_readme_walkthrough(&gateway);
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README walkthrough failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains(r#""balance":"85.50""#), "{printed}");
    assert!(printed.contains("SettlementCompleted"), "{printed}");

    // Stop everything gracefully, then read the logs.
    for service in services.iter_mut().rev() {
        service.stop(STOP_GRACE);
    }
    for service in &services {
        let log = service.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|line| line.contains(&correlation))
            .collect();
        assert!(
            !lines.is_empty(),
            "{} never logged the correlation id; its log:\n{log}",
            service.name()
        );
        eprintln!(
            "{}: {} log lines carry the correlation id",
            service.name(),
            lines.len()
        );
        for line in &lines {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|_| panic!("{}: not a JSON log line: {line}", service.name()));
        }
        for secret in [
            password.as_str(),
            token.as_str(),
            ADMIN_PASSWORD,
            SECRET,
            "Alice Example",
        ] {
            assert!(
                !log.contains(secret),
                "{} logged a secret or personal data",
                service.name()
            );
        }
    }

    drop(services);
    let _ = std::fs::remove_dir_all(&logs);
    database
        .drop_database()
        .await
        .expect("the scratch database drops");
    let topology = infra::amqp::Topology::new(&prefix).expect("a valid prefix");
    infra::amqp::delete_topology(&amqp_url(), &topology)
        .await
        .expect("the topology is deleted");
    system_tests::delete_redis_keys(&redis_url(), &format!("{prefix}:"))
        .await
        .expect("the test's Redis keys are deleted");
}

/// Extracts the walkthrough between its markers in README.md and runs it with bash against
/// `gateway`.
fn run_readme_walkthrough(gateway: &str) -> std::process::Output {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md is readable");
    let block = readme
        .split_once("<!-- walkthrough:start -->")
        .and_then(|(_, rest)| rest.split_once("<!-- walkthrough:end -->"))
        .map(|(block, _)| block)
        .expect("README.md marks its walkthrough");
    let script: String = block
        .lines()
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .env("LEDGER", gateway)
        .output()
        .expect("bash runs")
}
