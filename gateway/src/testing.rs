//! Starting the gateway for integration tests and benchmarks: the real router on
//! `127.0.0.1:0` against a database the caller provides (a scratch one), upstream addresses of
//! the test's choosing, a clock the test can move, and a clean stop. Logs print only with
//! `TEST_LOG=1`.

use std::time::Duration;

use infra::auth::{JwtSigner, Role};
use reqwest::Url;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::limiter::Clock;
use crate::routes::RoutingTable;
use crate::startup::App;

pub use infra::testing::{TEST_JWT_SECRET, admin_url, init_test_logging};

/// An address where nothing listens: port 1, privileged and unused. (A port the system hands
/// out and takes back is not closed for long: a parallel test may bind it next.)
pub fn closed_port_url() -> String {
    "http://127.0.0.1:1".to_owned()
}

/// What a test may change about the gateway it starts.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Upstream addresses; `None` is a closed port.
    pub command_api_url: Option<String>,
    pub query_api_url: Option<String>,
    pub fraud_worker_url: Option<String>,
    pub routes: RoutingTable,
    /// `(ADMIN_USERNAME, ADMIN_PASSWORD)`.
    pub admin: Option<(String, String)>,
    pub login_failures_per_username: u32,
    pub login_failures_per_address: u32,
    pub login_attempts_per_address: u32,
    pub login_failure_window_seconds: u64,
    pub registrations_per_address: u32,
    pub upstream_timeout_seconds: u64,
    pub upstream_connections_max: u32,
    /// Access tokens of the gateway's own minting: a long life by default, so that a slow test
    /// machine never sees a token expire mid-test; tests of role changes set the real bound.
    pub access_token_ttl_seconds: u64,
    pub trusted_proxies: crate::clients::TrustedProxies,
    pub http: infra::server::HttpLimits,
    pub clock: Clock,
    /// Password hashing with other bounds; the default ones when `None`.
    pub passwords: Option<crate::passwords::Passwords>,
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            command_api_url: None,
            query_api_url: None,
            fraud_worker_url: None,
            routes: RoutingTable::default(),
            admin: None,
            login_failures_per_username: 10,
            login_failures_per_address: 100,
            login_attempts_per_address: crate::config::LOGIN_ATTEMPTS_PER_ADDRESS,
            login_failure_window_seconds: 60,
            registrations_per_address: crate::config::REGISTRATIONS_PER_ADDRESS,
            upstream_timeout_seconds: 30,
            upstream_connections_max: crate::config::UPSTREAM_CONNECTIONS_MAX,
            access_token_ttl_seconds: 600,
            trusted_proxies: crate::clients::TrustedProxies::default(),
            http: infra::server::HttpLimits::default(),
            clock: Clock::System,
            passwords: None,
        }
    }
}

/// A config for `database_url` listening on an ephemeral port.
pub fn test_config(database_url: &str, options: &TestOptions) -> Result<Config> {
    let url = |address: &Option<String>| -> Result<Url> {
        let text = address.clone().unwrap_or_else(closed_port_url);
        Url::parse(&text).map_err(|error| Error::config(format!("bad test URL {text}: {error}")))
    };
    Ok(Config {
        database_url: database_url.to_owned(),
        database_max_connections: 4,
        token: infra::testing::test_token_config(),
        jwt_ttl_seconds: 900,
        access_token_ttl_seconds: options.access_token_ttl_seconds,
        listen_addr: "127.0.0.1:0".parse().expect("a literal socket address"),
        metrics_addr: "127.0.0.1:0".parse().expect("a literal socket address"),
        http: options.http,
        trusted_proxies: options.trusted_proxies.clone(),
        command_api_url: url(&options.command_api_url)?,
        query_api_url: url(&options.query_api_url)?,
        fraud_worker_url: url(&options.fraud_worker_url)?,
        gateway_routes: options.routes.clone(),
        upstream_timeout_seconds: options.upstream_timeout_seconds,
        upstream_connect_timeout_ms: 2_000,
        upstream_idle_timeout_seconds: crate::config::UPSTREAM_IDLE_TIMEOUT_SECONDS,
        upstream_connections_max: options.upstream_connections_max,
        login_failures_per_username: options.login_failures_per_username,
        login_failures_per_address: options.login_failures_per_address,
        login_attempts_per_address: options.login_attempts_per_address,
        login_failure_window_seconds: options.login_failure_window_seconds,
        registrations_per_address: options.registrations_per_address,
        registration_window_seconds: crate::config::REGISTRATION_WINDOW_SECONDS,
        admin_username: options.admin.as_ref().map(|(username, _)| username.clone()),
        admin_password: options
            .admin
            .as_ref()
            .map(|(_, password)| SecretString::from(password.clone())),
        log_format: infra::telemetry::LogFormat::Pretty,
    })
}

/// A running gateway.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// The metrics listener, `http://127.0.0.1:PORT`.
    pub metrics_address: String,
    pub pool: PgPool,
    signer: JwtSigner,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
}

/// Starts the gateway against `database_url` (migrating it) and returns once it listens.
pub async fn spawn_app(database_url: &str, options: &TestOptions) -> Result<TestApp> {
    init_test_logging();
    let config = test_config(database_url, options)?;
    let app = App::build_with(config, options.clock.clone(), options.passwords.clone()).await?;
    let address = format!("http://127.0.0.1:{}", app.port());
    let metrics_address = format!("http://127.0.0.1:{}", app.metrics_port());
    let pool = app.pool();
    let (shutdown, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok(TestApp {
        address,
        metrics_address,
        pool,
        signer: JwtSigner::new(&infra::testing::test_token_config())?,
        shutdown: Some(shutdown),
        handle: Some(handle),
    })
}

impl TestApp {
    /// A token for `subject` with `roles`, valid for ten minutes.
    pub fn token(&self, subject: Uuid, roles: &[Role]) -> String {
        self.signer
            .mint(subject, roles, chrono::Utc::now().timestamp(), 600)
            .expect("the test secret signs")
    }

    /// Stops gracefully, waiting at most ten seconds for in-flight requests.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
    }
}
