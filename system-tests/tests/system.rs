//! The whole system as an operator runs it: the four service binaries as processes on a scratch
//! database, their own RabbitMQ topology and Redis prefixes, JSON logs to files. A client talks
//! to the gateway only. One correlation id sent with a deposit must appear in every service's
//! log and in the event's metadata; no log may contain the password or the token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infra::db::ScratchDatabase;
use infra::testing::{admin_url, amqp_url, redis_url};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const SECRET: &str = "system-test-secret-of-at-least-thirty-two-bytes";
const ADMIN_PASSWORD: &str = "admin-password-for-the-system-test";

/// `target/<profile>/<name>`: this test runs from `target/<profile>/deps/`.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows where it runs from");
    let directory = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let path = directory.join(name);
    assert!(
        path.exists(),
        "{} is missing: build every binary first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A service process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &'static str, logs: &Path, env: &[(&str, String)]) -> Service {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let errors = file.try_clone().expect("the log file again");
        let mut command = Command::new(binary(name));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("JWT_SECRET", SECRET)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(errors));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("the service starts");
        Service { name, child, log }
    }

    /// The port the service bound, from its `<name> listening` log line. Services start on
    /// port 0, so no other test can take a port between our choosing it and the service binding
    /// it.
    async fn port(&mut self) -> u16 {
        let message = format!("{} listening", self.name);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let port = self.log().lines().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                if line["message"] != message.as_str() {
                    return None;
                }
                line["port"]
                    .as_u64()
                    .and_then(|port| u16::try_from(port).ok())
            });
            if let Some(port) = port {
                return port;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log that it listens within 60 s:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
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
    let mut command_api = Service::start(
        "command-api",
        &logs,
        &[
            ("DATABASE_URL", url.clone()),
            ("AMQP_URL", amqp_url()),
            ("AMQP_PREFIX", prefix.clone()),
            ("LISTEN_ADDR", any_port.clone()),
        ],
    );
    let mut fraud_worker = Service::start(
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
    let mut projector = Service::start(
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
        command_api.port().await,
        fraud_worker.port().await,
        projector.port().await,
    );
    let mut gateway_service = Service::start(
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
    let gateway_port = gateway_service.port().await;
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
        service.stop();
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
            ADMIN_PASSWORD,
            SECRET,
            "Alice Example",
        ] {
            assert!(
                !log.contains(secret),
                "{} logged a secret or personal data",
                service.name
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
    let client = redis_keys_cleanup(&prefix).await;
    assert!(client, "the test's Redis keys are deleted");
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

/// Deletes the Redis keys this test's services wrote (fraud counters, cache entries).
async fn redis_keys_cleanup(prefix: &str) -> bool {
    // No Redis client crate here: redis-cli is on every machine that runs Redis, and the test
    // must not leave keys behind.
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -u {} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {} DEL",
            redis_url(),
            redis_url()
        ))
        .output();
    output.is_ok_and(|output| output.status.success())
}
