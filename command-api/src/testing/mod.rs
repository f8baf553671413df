//! Starting command-api for integration tests and benchmarks: a scratch database per test, the
//! real router and saga on `127.0.0.1:0`, a clean stop. Logs print only with `TEST_LOG=1`.

use std::sync::Arc;

use infra::auth::{JwtSigner, Role};
use infra::db::ScratchDatabase;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::Config;
use crate::decisions::FraudDecisions;
use crate::error::Result;
use crate::saga::Saga;
use crate::startup::App;

pub mod harness;

pub use infra::testing::{TEST_JWT_SECRET, admin_url, amqp_url, init_test_logging};

/// Deletes a test's RabbitMQ topology.
pub async fn delete_topology(prefix: &str) -> Result<()> {
    let topology = infra::amqp::Topology::new(prefix)?;
    infra::amqp::delete_topology(&amqp_url(), &topology).await?;
    Ok(())
}

/// What a test may change about the app it starts.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The RabbitMQ topology's prefix: each test its own.
    pub amqp_prefix: String,
    pub decision_timeout_seconds: u64,
    pub saga_concurrency: usize,
    /// Events per saga batch: the kill tests also run with large ones.
    pub saga_batch_size: usize,
    pub database_max_connections: u32,
    /// `CUSTOMER_TOP_UPS`: off, as in production, unless a test is about the sandbox.
    pub customer_top_ups: bool,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            amqp_prefix: format!("test-{}", Uuid::new_v4().simple()),
            decision_timeout_seconds: 300,
            saga_concurrency: 16,
            saga_batch_size: 512,
            database_max_connections: 8,
            customer_top_ups: false,
        }
    }
}

/// A running command-api.
pub struct TestApp {
    pub address: String,
    pub database_url: String,
    pub pool: PgPool,
    pub decisions: FraudDecisions,
    pub saga: Arc<Saga>,
    log: Arc<dyn infra::eventlog::EventLog>,
    pools: Vec<PgPool>,
    signer: JwtSigner,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
}

/// A config for `database_url` listening on an ephemeral port.
pub fn test_config(database_url: &str, options: &TestOptions) -> Config {
    Config {
        event_store: infra::eventlog::choice::EventStoreConfig::default(),
        database_url: database_url.to_owned(),
        amqp_url: amqp_url(),
        amqp_prefix: options.amqp_prefix.clone(),
        relay_window: 512,
        decision_prefetch: 64,
        listen_addr: "127.0.0.1:0".parse().expect("a literal socket address"),
        token: infra::testing::test_token_config(),
        http: infra::server::HttpLimits::default(),
        fraud_decision_timeout_seconds: options.decision_timeout_seconds,
        log_format: infra::telemetry::LogFormat::Pretty,
        database_max_connections: options.database_max_connections,
        background_max_connections: 4,
        saga_concurrency: options.saga_concurrency,
        saga_batch_size: options.saga_batch_size,
        // Tests do not wait a production poll interval when a wake-up is missed.
        log_poll_interval_ms: 20,
        customer_top_ups: options.customer_top_ups,
    }
}

/// Starts command-api against `database_url` (migrating it) and returns once it listens.
pub async fn spawn_app(database_url: &str, options: &TestOptions) -> Result<TestApp> {
    init_test_logging();
    let app = App::build(test_config(database_url, options)).await?;
    let address = format!("http://127.0.0.1:{}", app.port());
    let pool = app.pool();
    let pools = app.pools();
    let log = app.log();
    let decisions = app.decisions();
    let saga = app.saga();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok(TestApp {
        address,
        database_url: database_url.to_owned(),
        pool,
        decisions,
        saga,
        log,
        pools,
        signer: JwtSigner::new(&infra::testing::test_token_config())?,
        shutdown: Some(shutdown),
        handle: Some(handle),
    })
}

/// A scratch database and an app on it.
pub async fn spawn_app_on_scratch(options: &TestOptions) -> Result<(ScratchDatabase, TestApp)> {
    let database = ScratchDatabase::create(&admin_url()).await?;
    let app = spawn_app(&database.url(), options).await?;
    Ok((database, app))
}

/// A writer of the event log in `database_url`'s `command_api` schema, on `pool`, with a
/// committer of its own: what another command-api instance appends through.
pub async fn writer_log(pool: &PgPool, database_url: &str) -> Arc<dyn infra::eventlog::EventLog> {
    let log = infra::eventlog::postgres::PgEventLog::open(
        pool.clone(),
        infra::eventlog::postgres::PgEventLogOptions::writer(
            crate::startup::SCHEMA,
            infra::db::connect_options(database_url, crate::startup::SCHEMA).expect("options"),
        ),
    )
    .await
    .expect("the log opens");
    Arc::new(log)
}

impl TestApp {
    /// The event log the app appends to.
    pub fn log(&self) -> Arc<dyn infra::eventlog::EventLog> {
        self.log.clone()
    }

    /// A token for `subject` with `roles`, valid for ten minutes.
    pub fn token(&self, subject: Uuid, roles: &[Role]) -> String {
        self.signer
            .mint(subject, roles, chrono::Utc::now().timestamp(), 600)
            .expect("the test secret signs")
    }

    /// Stops gracefully and waits for the saga and server to finish.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Stops abruptly, as a killed process would: the server and saga tasks are aborted
    /// wherever they are.
    pub async fn kill(&mut self) {
        self.shutdown.take();
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
        for pool in &self.pools {
            pool.close().await;
        }
    }
}
