//! The write side's test harness: command-api on a scratch database with its own RabbitMQ
//! prefix, HTTP calls with tokens of each role, fraud decisions recorded directly, waits on the
//! log with deadlines, and child processes killed on drop. command-api's own tests and the
//! cross-service ones in `system-tests` (which add the projector's checks) share it.

use std::process::Child;
use std::time::Duration;

use domain::{FraudDecision, FraudOutcome, TransactionId};
use infra::auth::Role;
use infra::db::ScratchDatabase;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{TestApp, TestOptions, spawn_app_on_scratch};

pub struct Harness {
    pub app: TestApp,
    pub amqp_prefix: String,
    pub database: Option<ScratchDatabase>,
    pub client: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(TestOptions::default()).await
    }

    pub async fn start_with(options: TestOptions) -> Harness {
        let (database, app) = spawn_app_on_scratch(&options)
            .await
            .expect("a scratch database and app start");
        Harness {
            app,
            amqp_prefix: options.amqp_prefix.clone(),
            database: Some(database),
            client: reqwest::Client::new(),
        }
    }

    /// Stops the app, drops the scratch database and deletes the RabbitMQ topology.
    pub async fn finish(mut self) {
        self.app.stop().await;
        if let Some(database) = self.database.take() {
            database
                .drop_database()
                .await
                .expect("the scratch database drops");
        }
        super::delete_topology(&self.amqp_prefix)
            .await
            .expect("the test's RabbitMQ topology is deleted");
    }

    /// A log appending to this test's store through a committer of its own: another instance.
    pub async fn writer_log(&self) -> std::sync::Arc<dyn infra::eventlog::EventLog> {
        super::writer_log(&self.app.pool, &self.app.database_url).await
    }

    pub fn customer(&self) -> (Uuid, String) {
        let subject = Uuid::new_v4();
        (subject, self.app.token(subject, &[Role::Customer]))
    }

    pub fn admin(&self) -> String {
        self.app.token(Uuid::new_v4(), &[Role::Admin])
    }

    /// A payment rail's token: money enters and leaves through it (SPEC §5).
    pub fn operator(&self) -> String {
        self.app.token(Uuid::new_v4(), &[Role::Operator])
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: &Value,
    ) -> Response {
        let mut request = self
            .client
            .post(format!("{}{path}", self.app.address))
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("the app answers")
    }

    /// Two customers' USD accounts: the payer's token, the payer's account (a transfer's source)
    /// and the payee's (its destination).
    pub async fn payer_and_payee(&self) -> (String, Uuid, Uuid) {
        let (_, payer) = self.customer();
        let (_, payee) = self.customer();
        let source = self.open_account(&payer, "USD").await;
        let destination = self.open_account(&payee, "USD").await;
        (payer, source, destination)
    }

    /// Opens an account and returns its id.
    pub async fn open_account(&self, token: &str, currency: &str) -> Uuid {
        let response = self
            .post(
                "/api/v1/accounts",
                Some(token),
                None,
                &json!({ "currency": currency }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("JSON body");
        Uuid::parse_str(body["id"].as_str().expect("an id")).expect("a UUID")
    }

    /// Posts a transaction and returns its id (202 expected).
    pub async fn transact(&self, token: &str, body: Value) -> Uuid {
        let response = self
            .post(
                "/api/v1/transactions",
                Some(token),
                Some(&Uuid::new_v4().to_string()),
                &body,
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::ACCEPTED,
            "{:?}",
            response.text().await
        );
        let body: Value = response.json().await.expect("JSON body");
        Uuid::parse_str(body["id"].as_str().expect("an id")).expect("a UUID")
    }

    /// Deposits `amount` into `account` through an operator (the payment rail: customers do not
    /// create money) and approves it, waiting until it is settled.
    pub async fn fund(&self, account: Uuid, amount: &str, currency: &str) {
        let id = self
            .transact(
                &self.operator(),
                json!({"type": "deposit", "amount": amount, "currency": currency, "destination_account_id": account}),
            )
            .await;
        self.decide(id, FraudOutcome::Approved).await;
        self.wait_settled(&[id]).await;
    }

    pub async fn decide(&self, id: Uuid, outcome: FraudOutcome) {
        let decision = FraudDecision {
            outcome,
            rule: Some("test".to_owned()),
            details: json!({}).into(),
        };
        let metadata = crate::metadata::for_saga(&id.to_string(), "test", format!("decision/{id}"));
        self.app
            .decisions
            .record(TransactionId(id), decision, &metadata)
            .await
            .expect("the decision is recorded");
    }

    /// Waits until every transaction in `ids` is final and fully applied.
    pub async fn wait_settled(&self, ids: &[Uuid]) {
        let ids: Vec<Uuid> = ids.to_vec();
        eventually(Duration::from_secs(30), || async {
            let unfinished: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM unnest($1::uuid[]) AS wanted(id) WHERE NOT EXISTS ( \
                   SELECT 1 FROM command_api.events e WHERE e.aggregate_type = 'transaction' \
                   AND e.aggregate_id = wanted.id::text \
                   AND e.event_type IN ('SettlementCompleted', 'ReleaseCompleted'))",
            )
            .bind(&ids)
            .fetch_one(&self.app.pool)
            .await
            .expect("counting unfinished transactions");
            unfinished == 0
        })
        .await;
    }

    /// Events appended by requests (not by the saga working in the background): what a refused
    /// or replayed request must leave unchanged.
    pub async fn request_event_count(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM command_api.events WHERE metadata->>'actor' <> 'saga'",
        )
        .fetch_one(&self.app.pool)
        .await
        .expect("counting events")
    }

    /// The app's `/metrics`, as Prometheus text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.app.address))
            .send()
            .await
            .expect("answers")
            .text()
            .await
            .expect("text")
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM command_api.events")
            .fetch_one(&self.app.pool)
            .await
            .expect("counting events")
    }

    /// The transaction's status and rejection reason, from its stream.
    pub async fn outcome(&self, id: Uuid) -> (String, Option<String>) {
        let events: Vec<(String, Value)> = sqlx::query_as(
            "SELECT event_type, payload FROM command_api.events \
             WHERE aggregate_type = 'transaction' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id.to_string())
        .fetch_all(&self.app.pool)
        .await
        .expect("reading a transaction stream");
        for (event_type, payload) in events {
            match event_type.as_str() {
                "TransactionConfirmed" => return ("CONFIRMED".to_owned(), None),
                "TransactionRejected" => {
                    let reason = payload["TransactionRejected"]["reason"]
                        .as_str()
                        .map(str::to_owned);
                    return ("REJECTED".to_owned(), reason);
                }
                _ => {}
            }
        }
        ("PENDING".to_owned(), None)
    }
}

impl Drop for Harness {
    /// A test that failed before `finish` still drops its database and topology, on a thread
    /// with a runtime of its own (the test's runtime is unwinding).
    fn drop(&mut self) {
        let Some(database) = self.database.take() else {
            return;
        };
        let prefix = self.amqp_prefix.clone();
        infra::tasks::block_on_own_runtime(async move {
            let _ = database.drop_database().await;
            let _ = super::delete_topology(&prefix).await;
        });
    }
}

/// Declares an exclusive, auto-deleted queue bound to `exchange` with `key`, to watch what is
/// published there; returns its name.
pub async fn declare_tap(channel: &lapin::Channel, exchange: &str, key: &str) -> String {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let queue = format!("tap-{}", Uuid::new_v4().simple());
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await
        .expect("declares the tap");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("binds the tap");
    queue
}

/// Polls `check` until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed when dropped, so a failing test leaves no service running.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn kill(running: &mut Running) {
    running.0.kill().expect("SIGKILL is delivered");
    running.0.wait().expect("the killed process is reaped");
}

/// POSTs until accepted (200, 201 or 202), across kills and restarts.
pub async fn post_until_accepted(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> Value {
    for _ in 0..600 {
        let sent = client
            .post(url)
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status();
            if status.is_success() {
                return response.json().await.expect("JSON");
            }
            assert!(status.is_server_error(), "unexpected {status} for {body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never accepted {body}");
}

pub use infra::testing::free_port;
