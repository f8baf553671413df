//! Starting the fraud worker for integration tests: its own topology prefix and Redis key prefix
//! per test, the real consumer and router on `127.0.0.1:0`, a connection of the test's own to
//! publish events and read decisions and dead letters, and a clean-up that deletes the topology
//! and the keys. Logs print only with `TEST_LOG=1`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    AccountId, Amount, Currency, CustomerId, TransactionEvent, TransactionId, TransactionKind,
    TransactionRequest,
};
use futures::StreamExt;
use infra::amqp::{DEAD_LETTER_REASON_HEADER, TRANSACTION_CREATED_KEY, Topology};
use infra::auth::{JwtSigner, Role};
use infra::messages::{DecisionMessage, EVENT_MESSAGE_SCHEMA, EventMessage};
use lapin::options::{BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::{Config, CurrencyAmounts, DisabledRules, RulesConfig};
use crate::error::Result;
use crate::messages::{CAUSATION_ID_HEADER, CORRELATION_ID_HEADER};
use crate::rules::RuleName;
use crate::startup::App;

pub use infra::testing::{TEST_JWT_SECRET, amqp_url, init_test_logging, redis_url};

/// How often a test polls a queue while waiting for something to arrive there.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What a test may change about the worker it starts.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub amount_threshold: i64,
    pub amount_thresholds: Vec<(&'static str, i64)>,
    pub velocity_limit: i64,
    pub velocity_limits: Vec<(&'static str, i64)>,
    pub velocity_window_seconds: u64,
    pub rules_disabled: Vec<RuleName>,
    pub prefetch: u16,
    /// Another Redis than [`redis_url`], e.g. one the test starts and stops itself.
    pub redis_url: Option<String>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            amount_threshold: 10_000,
            amount_thresholds: Vec::new(),
            velocity_limit: 50_000,
            velocity_limits: Vec::new(),
            velocity_window_seconds: 600,
            rules_disabled: Vec::new(),
            prefetch: 8,
            redis_url: None,
        }
    }
}

fn currency_amounts(entries: &[(&str, i64)]) -> CurrencyAmounts {
    CurrencyAmounts(
        entries
            .iter()
            .map(|(code, major)| (currency(code), *major))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// A known currency by code; panics on a typo in a test.
pub fn currency(code: &str) -> Currency {
    Currency::from_code(code).expect("tests name known currencies")
}

/// A config for a worker on `prefix` and `redis_key_prefix`, listening on an ephemeral port.
pub fn test_config(prefix: &str, redis_key_prefix: &str, options: &TestOptions) -> Config {
    Config {
        amqp_url: amqp_url(),
        amqp_prefix: prefix.to_owned(),
        redis_url: options.redis_url.clone().unwrap_or_else(redis_url),
        redis_key_prefix: redis_key_prefix.to_owned(),
        token: infra::testing::test_token_config(),
        http: infra::server::HttpLimits::default(),
        listen_addr: "127.0.0.1:0".parse().expect("a literal socket address"),
        fraud: RulesConfig {
            fraud_amount_threshold: options.amount_threshold,
            fraud_amount_thresholds: currency_amounts(&options.amount_thresholds),
            fraud_velocity_limit: options.velocity_limit,
            fraud_velocity_limits: currency_amounts(&options.velocity_limits),
            fraud_velocity_window_seconds: options.velocity_window_seconds,
            fraud_rules_disabled: DisabledRules(options.rules_disabled.clone()),
        },
        fraud_prefetch: options.prefetch,
        log_format: infra::telemetry::LogFormat::Pretty,
    }
}

/// A decision as a test receives it: the message and its AMQP properties.
#[derive(Debug, Clone)]
pub struct ReceivedDecision {
    pub message: DecisionMessage,
    pub message_id: Option<String>,
    pub correlation_id_header: Option<String>,
    pub causation_id_header: Option<String>,
    pub properties: BasicProperties,
}

/// A dead-lettered message: its body and the reason header.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub reason: Option<String>,
}

/// A running fraud worker with a connection of the test's own.
pub struct TestApp {
    pub address: String,
    pub topology: Topology,
    pub prefix: String,
    pub redis_key_prefix: String,
    pub config: Config,
    connection: Connection,
    /// Publishes events (confirm mode) and reads queues.
    channel: Channel,
    decisions: lapin::Consumer,
    /// Decisions received while waiting for another one.
    pending: Vec<ReceivedDecision>,
    signer: JwtSigner,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
    /// Set by [`TestApp::cleanup`]; otherwise dropping the app (a failed test) cleans up.
    cleaned: bool,
}

/// Starts a worker on a fresh topology and Redis key prefix and returns once it consumes.
pub async fn spawn_app(options: &TestOptions) -> Result<TestApp> {
    init_test_logging();
    let id = Uuid::new_v4().simple().to_string();
    let prefix = format!("test-{id}");
    let redis_key_prefix = format!("test:{id}:fraud");
    let config = test_config(&prefix, &redis_key_prefix, options);
    let (address, shutdown, handle) = start(config.clone()).await?;
    let topology = config.topology();
    let connection = infra::amqp::connect(&config.amqp_url).await?;
    let channel = infra::amqp::confirm_channel(&connection).await?;
    let decisions = channel
        .basic_consume(
            topology.decisions_queue().as_str().into(),
            "fraud-worker-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the decisions queue was declared by the worker");
    Ok(TestApp {
        address,
        topology,
        prefix,
        redis_key_prefix,
        config,
        connection,
        channel,
        decisions,
        pending: Vec::new(),
        signer: JwtSigner::new(&infra::testing::test_token_config())?,
        shutdown: Some(shutdown),
        handle: Some(handle),
        cleaned: false,
    })
}

type Started = (String, oneshot::Sender<()>, JoinHandle<Result<()>>);

async fn start(config: Config) -> Result<Started> {
    let app = App::build(config).await?;
    let address = format!("http://127.0.0.1:{}", app.port());
    let (shutdown, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok((address, shutdown, handle))
}

impl TestApp {
    /// A token for `subject` with `roles`, valid for ten minutes.
    pub fn token(&self, subject: Uuid, roles: &[Role]) -> String {
        self.signer
            .mint(subject, roles, Utc::now().timestamp(), 600)
            .expect("the test secret signs")
    }

    /// Stops gracefully and waits for the consumer and the server to finish.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Starts the worker again on the same topology and Redis keys (after [`TestApp::stop`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let (address, shutdown, handle) = start(self.config.clone()).await?;
        self.address = address;
        self.shutdown = Some(shutdown);
        self.handle = Some(handle);
        Ok(())
    }

    /// Publishes a message to the events exchange as the relay would, with a confirm.
    pub async fn publish_event(&self, message: &EventMessage) {
        let body = serde_json::to_vec(message).expect("an event message serialises");
        self.publish_raw(&body, &message.event_id.to_string()).await;
    }

    /// Publishes any body with the `transaction.created` routing key.
    pub async fn publish_raw(&self, body: &[u8], message_id: &str) {
        let properties =
            infra::amqp::persistent_json(message_id, "test", message_id, FieldTable::default());
        infra::amqp::publish_confirmed(
            &self.channel,
            &self.topology.events_exchange(),
            TRANSACTION_CREATED_KEY,
            body,
            properties,
        )
        .await
        .expect("the broker confirms a test message");
    }

    /// The next decision for `transaction_id`, waiting at most `timeout`. Decisions for other
    /// transactions that arrive meanwhile are kept for later calls.
    pub async fn decision_for(
        &mut self,
        transaction_id: TransactionId,
        timeout: Duration,
    ) -> Option<ReceivedDecision> {
        if let Some(index) = self
            .pending
            .iter()
            .position(|decision| decision.message.transaction_id == transaction_id)
        {
            return Some(self.pending.remove(index));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.decisions.next()).await;
            let delivery = match next {
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(error))) => panic!("the decisions consumer failed: {error}"),
                Ok(None) | Err(_) => return None,
            };
            let header = |name| infra::amqp::header_str(&delivery.properties, name);
            let received = ReceivedDecision {
                message: serde_json::from_slice(&delivery.data)
                    .expect("the worker publishes valid decision messages"),
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned()),
                correlation_id_header: header(CORRELATION_ID_HEADER),
                causation_id_header: header(CAUSATION_ID_HEADER),
                properties: delivery.properties.clone(),
            };
            if received.message.transaction_id == transaction_id {
                return Some(received);
            }
            self.pending.push(received);
        }
    }

    /// Publishes `message` and waits (at most ten seconds) for its decision.
    pub async fn decide(&mut self, message: &EventMessage) -> ReceivedDecision {
        self.publish_event(message).await;
        let transaction_id = TransactionId(
            message
                .aggregate_id
                .parse()
                .expect("test events carry their transaction id"),
        );
        self.decision_for(transaction_id, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no decision for {transaction_id} within 10 s"))
    }

    /// Takes up to `count` messages from `queue`, waiting at most `timeout` for them to arrive.
    pub async fn take_messages(
        &self,
        queue: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<DeadLetter> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut taken = Vec::new();
        while taken.len() < count && tokio::time::Instant::now() < deadline {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("the queue exists");
            match got {
                Some(message) => taken.push(DeadLetter {
                    reason: infra::amqp::header_str(
                        &message.delivery.properties,
                        DEAD_LETTER_REASON_HEADER,
                    ),
                    body: message.delivery.data,
                }),
                None => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
        taken
    }

    /// `(messages ready, consumers)` of an existing queue.
    pub async fn queue_state(&self, queue: &str) -> (u32, u32) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let state = self
            .channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("the queue exists");
        (state.message_count(), state.consumer_count())
    }

    /// Polls `queue` until `check` holds for its `(messages ready, consumers)`, at most `timeout`.
    pub async fn wait_for_queue(
        &self,
        queue: &str,
        timeout: Duration,
        check: impl Fn(u32, u32) -> bool,
    ) -> (u32, u32) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (messages, consumers) = self.queue_state(queue).await;
            if check(messages, consumers) || tokio::time::Instant::now() >= deadline {
                return (messages, consumers);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the worker, deletes the test's topology and Redis keys, closes the connection.
    pub async fn cleanup(mut self) {
        self.stop().await;
        self.topology
            .delete(&self.channel)
            .await
            .expect("the test topology can be deleted");
        let _ = self.connection.close(200, "test done".into()).await;
        delete_redis_keys(&self.redis_key_prefix)
            .await
            .expect("the test's Redis keys can be deleted");
        self.cleaned = true;
    }
}

impl Drop for TestApp {
    /// A test that failed never reached [`TestApp::cleanup`]: delete its topology and keys
    /// anyway, best effort, on a thread with a runtime of its own (the test's is unwinding).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let topology = self.topology.clone();
        let redis_key_prefix = self.redis_key_prefix.clone();
        infra::tasks::block_on_own_runtime(async move {
            let _ = infra::amqp::delete_topology(&amqp_url(), &topology).await;
            let _ = delete_redis_keys(&redis_key_prefix).await;
        });
    }
}

/// Deletes every Redis key under `prefix`.
pub async fn delete_redis_keys(prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(redis_url())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut connection)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    Ok(())
}

/// A payment for a test event.
#[derive(Debug, Clone)]
pub struct TestPayment {
    pub transaction_id: TransactionId,
    pub kind: TransactionKind,
    pub amount: String,
    pub currency: &'static str,
    pub source_account_id: Option<AccountId>,
    pub destination_account_id: Option<AccountId>,
    pub created_at: DateTime<Utc>,
}

impl TestPayment {
    fn new(
        kind: TransactionKind,
        amount: &str,
        currency: &'static str,
        source: Option<AccountId>,
        destination: Option<AccountId>,
    ) -> Self {
        TestPayment {
            transaction_id: TransactionId(Uuid::new_v4()),
            kind,
            amount: amount.to_owned(),
            currency,
            source_account_id: source,
            destination_account_id: destination,
            created_at: Utc::now(),
        }
    }

    pub fn deposit(amount: &str, currency: &'static str, destination: AccountId) -> Self {
        TestPayment::new(
            TransactionKind::Deposit,
            amount,
            currency,
            None,
            Some(destination),
        )
    }

    pub fn withdrawal(amount: &str, currency: &'static str, source: AccountId) -> Self {
        TestPayment::new(
            TransactionKind::Withdrawal,
            amount,
            currency,
            Some(source),
            None,
        )
    }

    pub fn transfer(
        amount: &str,
        currency: &'static str,
        source: AccountId,
        destination: AccountId,
    ) -> Self {
        TestPayment::new(
            TransactionKind::Transfer,
            amount,
            currency,
            Some(source),
            Some(destination),
        )
    }

    /// The `TransactionCreated` event message the relay would publish for this payment.
    pub fn event(&self, correlation_id: &str) -> EventMessage {
        let currency = currency(self.currency);
        let request = TransactionRequest::new(
            self.kind,
            Amount::parse(&self.amount, currency).expect("tests use valid amounts"),
            currency,
            self.source_account_id,
            self.destination_account_id,
            None,
        )
        .expect("tests build valid requests");
        let event = TransactionEvent::TransactionCreated {
            transaction_id: self.transaction_id,
            request_fingerprint: request.fingerprint(),
            request,
            initiated_by: CustomerId(Uuid::new_v4()),
            created_at: self.created_at,
        };
        let event_id = Uuid::now_v7();
        EventMessage {
            schema: EVENT_MESSAGE_SCHEMA,
            event_id,
            position: "1.1".to_owned(),
            recorded_at: self.created_at,
            aggregate_type: "transaction".to_owned(),
            aggregate_id: self.transaction_id.to_string(),
            sequence: 1,
            event_type: "TransactionCreated".to_owned(),
            event_version: "1".to_owned(),
            payload: serde_json::to_value(&event).expect("an event serialises"),
            metadata: json!({
                "correlation_id": correlation_id,
                "causation_id": event_id.to_string(),
                "actor": Uuid::new_v4().to_string(),
                "command_id": Uuid::now_v7().to_string(),
            }),
        }
    }
}
