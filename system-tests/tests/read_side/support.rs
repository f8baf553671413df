//! What the read side's tests share: command-api and the projector on one scratch database,
//! HTTP calls to both, waiting (with deadlines) for settlement and for the read side to catch
//! up, and the verifier. Cleanup runs on success (`finish`) and on failure (`Drop`).

use std::time::Duration;

pub use command_api::testing::harness::eventually;
use command_api::testing::{TestApp, spawn_app_on_scratch};
use domain::{FraudDecision, FraudOutcome, TransactionId};
use infra::auth::Role;
use infra::db::ScratchDatabase;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::log::LogPosition;
use projector::testing::{TestOptions, TestProjector, spawn_projector};
use projector::verify::VerifyReport;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

/// The event log the projector follows.
pub const EVENTS_TABLE: &str = "command_api.events";

/// How long settling or catching up may take before a test fails.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

pub struct Harness {
    pub app: TestApp,
    pub projector: TestProjector,
    pub client: reqwest::Client,
    database: Option<ScratchDatabase>,
    amqp_prefix: String,
    redis_key_prefix: String,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(TestOptions::default()).await
    }

    /// command-api (saga, relay, decision consumer) on a scratch database, and the projector
    /// with `options` on the same database.
    pub async fn start_with(options: TestOptions) -> Harness {
        let app_options = command_api::testing::TestOptions::default();
        let (database, app) = spawn_app_on_scratch(&app_options)
            .await
            .expect("a scratch database and command-api start");
        let projector = spawn_projector(&database.url(), &options)
            .await
            .expect("the projector starts");
        Harness {
            app,
            projector,
            client: reqwest::Client::new(),
            database: Some(database),
            amqp_prefix: app_options.amqp_prefix,
            redis_key_prefix: options.redis_key_prefix,
        }
    }

    /// Stops both services, flushes the test's cache keys, drops the database and the topology.
    pub async fn finish(mut self) {
        self.projector.stop().await;
        self.app.stop().await;
        let _ = self.projector.flush_cache().await;
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

    /// Kills the projector wherever it is and starts a new one on the same database and
    /// cache prefix.
    pub async fn restart_projector(&mut self) {
        self.projector.kill().await;
        let options = self.projector.options.clone();
        self.projector = spawn_projector(&self.database_url(), &options)
            .await
            .expect("the projector starts again");
    }

    pub fn database_url(&self) -> String {
        self.database
            .as_ref()
            .expect("the database lives until the harness finishes")
            .url()
    }

    pub fn customer(&self) -> (Uuid, String) {
        let subject = Uuid::new_v4();
        (subject, self.app.token(subject, &[Role::Customer]))
    }

    pub fn token_with(&self, role: Role) -> String {
        self.app.token(Uuid::new_v4(), &[role])
    }

    /// A command to command-api; a fresh idempotency key for transactions.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        self.client
            .post(format!("{}{path}", self.app.address))
            .bearer_auth(token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(body)
            .send()
            .await
            .expect("command-api answers")
    }

    /// Opens an account and returns its id.
    pub async fn open_account(&self, token: &str, currency: &str) -> Uuid {
        let response = self
            .post("/api/v1/accounts", token, &json!({ "currency": currency }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("JSON body");
        uuid_of(&body["id"])
    }

    /// Posts a transaction (202 expected); returns its id and `X-Ledger-Position`.
    pub async fn transact(&self, token: &str, body: Value) -> (Uuid, String) {
        let response = self.post("/api/v1/transactions", token, &body).await;
        assert_eq!(
            response.status(),
            StatusCode::ACCEPTED,
            "{body}: {:?}",
            response.text().await
        );
        let position = response
            .headers()
            .get("x-ledger-position")
            .and_then(|value| value.to_str().ok())
            .expect("a command response carries X-Ledger-Position")
            .to_owned();
        let body: Value = response.json().await.expect("JSON body");
        (uuid_of(&body["id"]), position)
    }

    /// Deposits into `account` through an operator (the payment rail: customers do not create
    /// money).
    pub async fn deposit(&self, account: Uuid, amount: &str, currency: &str) -> Uuid {
        let body = json!({"type": "deposit", "amount": amount, "currency": currency,
            "destination_account_id": account});
        self.transact(&self.token_with(Role::Operator), body)
            .await
            .0
    }

    pub async fn transfer(
        &self,
        token: &str,
        from: Uuid,
        to: Uuid,
        amount: &str,
        currency: &str,
    ) -> Uuid {
        let body = json!({"type": "transfer", "amount": amount, "currency": currency,
            "source_account_id": from, "destination_account_id": to});
        self.transact(token, body).await.0
    }

    pub async fn withdraw(&self, token: &str, from: Uuid, amount: &str, currency: &str) -> Uuid {
        let body = json!({"type": "withdrawal", "amount": amount, "currency": currency,
            "source_account_id": from});
        self.transact(token, body).await.0
    }

    /// Deposits into `account` (an operator's deposit), approves it and waits until it settled.
    pub async fn fund(&self, account: Uuid, amount: &str, currency: &str) -> Uuid {
        let id = self.deposit(account, amount, currency).await;
        self.decide(id, FraudOutcome::Approved).await;
        self.wait_settled(&[id]).await;
        id
    }

    /// Records a fraud decision as the decision consumer would (no fraud worker runs).
    pub async fn decide(&self, id: Uuid, outcome: FraudOutcome) {
        let decision = FraudDecision {
            outcome,
            rule: Some("test".to_owned()),
            details: json!({}).into(),
        };
        let metadata =
            command_api::metadata::for_saga(&id.to_string(), "test", format!("decision/{id}"));
        self.app
            .decisions
            .record(TransactionId(id), decision, &metadata)
            .await
            .expect("the decision is recorded");
    }

    /// Waits until every transaction in `ids` is final and its settlement or release is done.
    pub async fn wait_settled(&self, ids: &[Uuid]) {
        let ids: Vec<Uuid> = ids.to_vec();
        eventually(SETTLE_DEADLINE, || async {
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

    /// Waits until the transaction's stream holds an event of `event_type`.
    pub async fn wait_event(&self, id: Uuid, event_type: &str) {
        eventually(SETTLE_DEADLINE, || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM command_api.events WHERE aggregate_type = 'transaction' \
                   AND aggregate_id = $1 AND event_type = $2)",
            )
            .bind(id.to_string())
            .bind(event_type)
            .fetch_one(&self.app.pool)
            .await
            .expect("looking for the event")
        })
        .await;
    }

    /// The event log, as a job that only reads it (a rebuild, the lag) opens it.
    pub async fn log_reader(&self) -> PgEventLog {
        PgEventLog::open(
            self.app.pool.clone(),
            PgEventLogOptions {
                listen: false,
                ..PgEventLogOptions::reader(EVENTS_TABLE)
            },
        )
        .await
        .expect("the log opens")
    }

    /// Waits until every projection has applied the whole committed log.
    pub async fn caught_up(&self) {
        let (commit, index): (i64, i64) = sqlx::query_as(
            "SELECT tx_id::text::bigint, position FROM command_api.events
             ORDER BY tx_id DESC, position DESC LIMIT 1",
        )
        .fetch_optional(&self.app.pool)
        .await
        .expect("reading the last committed event")
        .unwrap_or_default();
        let last = LogPosition { commit, index };
        eventually(SETTLE_DEADLINE, || async {
            read_position(&self.projector).await >= last
        })
        .await;
    }

    /// A GET on the projector, with `X-Ledger-Position` when `position` is given.
    pub async fn get(&self, path: &str, token: Option<&str>, position: Option<&str>) -> Response {
        let mut request = self.client.get(format!("{}{path}", self.projector.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(position) = position {
            request = request.header("X-Ledger-Position", position);
        }
        request.send().await.expect("the projector answers")
    }

    /// A GET with `X-Ledger-Position`, as a well-behaved client sends it: a 503 (the read
    /// side had not reached the position within its bounded wait, which a loaded test machine
    /// can make happen) is retried, for up to [`SETTLE_DEADLINE`]. Any other answer is returned,
    /// so a 404 is still a 404.
    pub async fn get_at(&self, path: &str, token: &str, position: &str) -> Response {
        infra::testing::retry_while(
            SETTLE_DEADLINE,
            || self.get(path, Some(token), Some(position)),
            |response| response.status() == StatusCode::SERVICE_UNAVAILABLE,
        )
        .await
    }

    /// A GET's status and JSON body.
    pub async fn get_json(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let response = self.get(path, Some(token), None).await;
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// A GET that must answer 200; its body.
    pub async fn get_ok(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.get_json(path, token).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    pub async fn verify(&self) -> VerifyReport {
        projector::verify::verify(
            &self.projector.pool,
            &self.app.pool,
            EVENTS_TABLE,
            &mut |_| {},
        )
        .await
        .expect("verify runs")
    }

    /// Asserts that the log keeps SPEC §8 and that every read-model row equals the replay.
    pub async fn assert_verified(&self) -> VerifyReport {
        let report = self.verify().await;
        assert!(
            report.is_clean(),
            "verify found problems: violations {:#?}, differences {:#?}",
            report.audit.violations,
            report.differences
        );
        report
    }
}

impl Drop for Harness {
    /// A test that failed before `finish` still drops its database, topology and cache keys, on
    /// a thread with a runtime of its own (the test's runtime is unwinding).
    fn drop(&mut self) {
        let Some(database) = self.database.take() else {
            return;
        };
        let amqp_prefix = self.amqp_prefix.clone();
        let redis_key_prefix = self.redis_key_prefix.clone();
        infra::tasks::block_on_own_runtime(async move {
            let _ = database.drop_database().await;
            let _ = command_api::testing::delete_topology(&amqp_prefix).await;
            let redis = projector::testing::redis_url();
            if let Ok(cache) = projector::cache::RedisCache::new(&redis, &redis_key_prefix, 60) {
                use projector::cache::TransactionCache;
                let _ = cache.flush().await;
            }
        });
    }
}

/// Where the read side stands: the lowest live checkpoint.
pub async fn read_position(projector: &TestProjector) -> LogPosition {
    projector::generations::read_position(&projector.pool)
        .await
        .expect("the checkpoints can be read")
}

pub fn uuid_of(value: &Value) -> Uuid {
    Uuid::parse_str(value.as_str().expect("a string id")).expect("a UUID")
}

/// What [`Harness::mixed_traffic`] created.
pub struct Traffic {
    /// Two customers with a USD and a JPY account each: `(customer, token, usd, jpy)`.
    pub customers: Vec<(Uuid, String, Uuid, Uuid)>,
    /// Every transaction posted, all final and settled or released.
    pub transactions: Vec<Uuid>,
}

impl Harness {
    /// Two customers, accounts in USD and JPY, deposits, transfers both ways, a withdrawal, a
    /// fraud rejection and an insufficient-funds rejection; waits until everything settled and
    /// the read side caught up.
    pub async fn mixed_traffic(&self) -> Traffic {
        let mut customers = Vec::new();
        for _ in 0..2 {
            let (customer, token) = self.customer();
            let usd = self.open_account(&token, "USD").await;
            let jpy = self.open_account(&token, "JPY").await;
            customers.push((customer, token, usd, jpy));
        }
        let (_, alice, alice_usd, alice_jpy) = customers[0].clone();
        let (_, bob, bob_usd, bob_jpy) = customers[1].clone();
        let mut transactions = vec![
            self.fund(alice_usd, "1000.00", "USD").await,
            self.fund(alice_jpy, "50000", "JPY").await,
            self.fund(bob_usd, "20.00", "USD").await,
        ];
        let approved = [
            self.transfer(&alice, alice_usd, bob_usd, "125.50", "USD")
                .await,
            self.transfer(&alice, alice_jpy, bob_jpy, "500", "JPY")
                .await,
            self.transfer(&bob, bob_usd, alice_usd, "5.25", "USD").await,
            self.withdraw(&alice, alice_usd, "40.00", "USD").await,
        ];
        for id in approved {
            self.decide(id, FraudOutcome::Approved).await;
        }
        let fraud = self
            .transfer(&alice, alice_usd, bob_usd, "9.99", "USD")
            .await;
        self.decide(fraud, FraudOutcome::Rejected).await;
        // Bob's JPY account holds nothing yet when this is reserved, or only 500: either way
        // the saga refuses the hold without waiting for a fraud decision.
        let broke = self
            .transfer(&bob, bob_jpy, alice_jpy, "900000", "JPY")
            .await;
        transactions.extend(approved);
        transactions.extend([fraud, broke]);
        self.wait_settled(&transactions).await;
        self.caught_up().await;
        Traffic {
            customers,
            transactions,
        }
    }
}

/// A TCP relay in front of the test Redis that a test can cut and restore on the same port:
/// an outage without touching the shared Redis.
pub struct RedisProxy {
    pub port: u16,
    tasks: tokio::task::JoinSet<()>,
}

impl RedisProxy {
    pub async fn start() -> RedisProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("an ephemeral port");
        let port = listener.local_addr().expect("a bound address").port();
        let mut proxy = RedisProxy {
            port,
            tasks: tokio::task::JoinSet::new(),
        };
        proxy.serve(listener);
        proxy
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let upstream = projector::testing::redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        self.tasks.spawn(async move {
            // Connections live in this task's set, so cutting the proxy closes them all.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
    }

    /// Closes the listener and every relayed connection: Redis is "down".
    pub async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Listens again on the same port.
    pub async fn restore(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the proxy's port is free again");
        self.serve(listener);
    }
}
