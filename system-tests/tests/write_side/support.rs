//! Helpers shared by the write side's tests: command-api on a scratch database, HTTP calls,
//! polling with deadlines, child processes, the SPEC §8 audit and the projector's rebuild and
//! verify of the log a scenario leaves behind.

use std::process::Child;
use std::time::Duration;

use command_api::replay;
use command_api::testing::{TestApp, TestOptions, spawn_app_on_scratch};
use domain::audit::AuditReport;
use domain::{FraudDecision, FraudOutcome, TransactionId};
use infra::auth::Role;
use infra::db::ScratchDatabase;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

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
        command_api::testing::delete_topology(&self.amqp_prefix)
            .await
            .expect("the test's RabbitMQ topology is deleted");
    }

    pub fn customer(&self) -> (Uuid, String) {
        let subject = Uuid::new_v4();
        (subject, self.app.token(subject, &[Role::Customer]))
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
            details: json!({}),
        };
        let metadata =
            command_api::metadata::for_saga(&id.to_string(), "test", format!("decision/{id}"));
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

    pub async fn audit(&self) -> AuditReport {
        replay::audit(&self.app.pool, "command_api.events")
            .await
            .expect("the log can be audited")
    }

    /// Asserts SPEC §8 over the whole log: no violation, nothing in flight.
    pub async fn assert_invariants(&self) -> AuditReport {
        let report = self.audit().await;
        assert!(
            report.violations.is_empty(),
            "invariants broken: {:#?}",
            report.violations
        );
        assert!(
            report.in_flight.is_empty(),
            "transactions still in flight: {:?}",
            report.in_flight
        );
        self.assert_read_models_verify().await;
        report
    }

    /// Builds the projector's read models from this scenario's log (a rebuild of each
    /// projection, in small batches) and runs `ledger verify`'s check on them: every log an
    /// integration scenario leaves behind projects and verifies cleanly.
    pub async fn assert_read_models_verify(&self) {
        let read_pool = projector::startup::connect_read_models(&self.app.database_url, 2)
            .await
            .expect("the read models' schema is created");
        let log = infra::eventlog::postgres::PgEventLog::open(
            self.app.pool.clone(),
            infra::eventlog::postgres::PgEventLogOptions {
                listen: false,
                ..infra::eventlog::postgres::PgEventLogOptions::reader("command_api.events")
            },
        )
        .await
        .expect("the log opens");
        projector::rebuild::rebuild(
            &read_pool,
            &log,
            &projector::model::ProjectionName::ALL,
            projector::rebuild::RebuildOptions {
                batch_size: 97,
                restart: false,
            },
            |_| {},
        )
        .await
        .expect("the projections rebuild from the log");
        let report = projector::verify::verify(
            &read_pool,
            &self.app.pool,
            "command_api.events",
            &mut |_| {},
        )
        .await
        .expect("verify runs");
        assert!(
            report.differences.is_empty(),
            "read models differ from the log: {:#?}",
            &report.differences[..report.differences.len().min(5)]
        );
        read_pool.close().await;
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
            let _ = command_api::testing::delete_topology(&prefix).await;
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

/// The available balance of an account, from the audit of its stream.
pub fn balance_of(report: &AuditReport, account: Uuid) -> (i64, i64) {
    let state = &report.accounts[&domain::AccountId(account)];
    (state.balance_minor, state.available_minor())
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
