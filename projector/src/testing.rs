//! Starting the projector for integration tests and benchmarks: against a test's scratch
//! database (the one its command-api writes), its own Redis key prefix, on `127.0.0.1:0`.
//! Logs print only with `TEST_LOG=1`.

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::Config;
use crate::error::Result;
use crate::startup::App;

pub use infra::testing::{TEST_JWT_SECRET, init_test_logging, redis_url};

/// What a test may change about the projector it starts.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Each test its own cache keys.
    pub redis_key_prefix: String,
    /// Another Redis (e.g. a closed port, for "Redis is down").
    pub redis_url: Option<String>,
    pub batch_size: usize,
    /// `POSITION_WAITERS_MAX`.
    pub position_waiters_max: u32,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            redis_key_prefix: format!("test-{}", Uuid::new_v4().simple()),
            redis_url: None,
            batch_size: 1_000,
            position_waiters_max: crate::http::positions::WAITERS_MAX,
        }
    }
}

pub fn test_config(database_url: &str, options: &TestOptions) -> Config {
    Config {
        event_store: infra::eventlog::choice::EventStoreConfig::default(),
        database_url: database_url.to_owned(),
        read_database_url: None,
        events_table: "command_api.events".to_owned(),
        redis_url: options.redis_url.clone().unwrap_or_else(redis_url),
        redis_key_prefix: options.redis_key_prefix.clone(),
        cache_ttl_seconds: 60,
        listen_addr: "127.0.0.1:0".parse().expect("a literal socket address"),
        token: infra::testing::test_token_config(),
        http: infra::server::HttpLimits::default(),
        log_format: infra::telemetry::LogFormat::Pretty,
        database_max_connections: 8,
        background_max_connections: 4,
        projector_batch_size: options.batch_size,
        // Tests do not wait a production poll interval when a wake-up is missed.
        log_poll_interval_ms: 20,
        position_waiters_max: options.position_waiters_max,
    }
}

/// A running projector.
pub struct TestProjector {
    pub address: String,
    pub pool: PgPool,
    pools: Vec<PgPool>,
    pub options: TestOptions,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
}

/// Starts the projector against `database_url` and returns once it listens.
pub async fn spawn_projector(database_url: &str, options: &TestOptions) -> Result<TestProjector> {
    init_test_logging();
    let app = App::build(test_config(database_url, options)).await?;
    let address = format!("http://127.0.0.1:{}", app.port());
    let pool = app.pool();
    let pools = app.pools();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok(TestProjector {
        address,
        pool,
        pools,
        options: options.clone(),
        shutdown: Some(shutdown),
        handle: Some(handle),
    })
}

impl TestProjector {
    /// Stops gracefully.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }

    /// Stops abruptly, wherever the runners are.
    pub async fn kill(&mut self) {
        self.shutdown.take();
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
        // Close the sessions, as a dead process's would be: a batch transaction the abort left
        // open would otherwise sit idle in its session, holding the cluster's visibility
        // horizon (and every test's followers) back until the idle timeout ends it.
        for pool in &self.pools {
            pool.close().await;
        }
    }

    /// Deletes this projector's cache keys.
    pub async fn flush_cache(&self) -> Result<u64> {
        use crate::cache::TransactionCache;
        let cache =
            crate::cache::RedisCache::new(&redis_url(), &self.options.redis_key_prefix, 60)?;
        cache.flush().await
    }
}
