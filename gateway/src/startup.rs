//! Wiring: connect and migrate the schema `gateway`, ensure the configured admin, build the
//! proxy and the router, bind the listener (port 0 allowed, for tests), then serve until told
//! to stop.

use std::future::Future;
use std::sync::Arc;

use infra::auth::{JwtSigner, JwtVerifier};
use infra::tasks::{Workers, serve_until_stopped};
use secrecy::SecretString;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::{AppState, router};
use crate::identity::Users;
use crate::limiter::{Clock, LoginLimiter};
use crate::passwords::Passwords;
use crate::proxy::Proxy;

/// The gateway's own schema (SPEC §2): the identities.
pub const SCHEMA: &str = "gateway";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct App {
    listener: TcpListener,
    state: AppState,
}

impl App {
    /// Connects, migrates, ensures the admin and binds, with the system clock.
    pub async fn build(config: Config) -> Result<App> {
        App::build_with_clock(config, Clock::System).await
    }

    /// [`App::build`] with the clock the login limiter reads (tests move a manual one).
    pub async fn build_with_clock(config: Config, clock: Clock) -> Result<App> {
        // Idempotent: `/metrics` renders the process-wide recorder, installed once.
        infra::telemetry::init_metrics();
        let pool = infra::db::connect(
            &config.database_url,
            SCHEMA,
            config.database_max_connections,
        )
        .await?;
        migrate(&pool).await?;
        let users = Users::new(pool.clone());
        let passwords = Passwords::new().await?;
        ensure_admin(&config, &users, &passwords).await?;
        let state = AppState {
            pool,
            users,
            passwords,
            limiter: Arc::new(LoginLimiter::new(config.login_limits(), clock)),
            signer: Arc::new(JwtSigner::new(&config.jwt_secret)?),
            verifier: Arc::new(JwtVerifier::new(&config.jwt_secret)?),
            token_ttl_seconds: i64::try_from(config.jwt_ttl_seconds)
                .map_err(|_| Error::config("JWT_TTL_SECONDS is out of range"))?,
            routes: Arc::new(config.gateway_routes.clone()),
            proxy: Proxy::new(&config)?,
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| {
                Error::config(format!("cannot listen on {}: {error}", config.listen_addr))
            })?;
        Ok(App { listener, state })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    pub fn pool(&self) -> PgPool {
        self.state.pool.clone()
    }

    /// Serves until `shutdown` resolves, then stops taking connections, lets in-flight
    /// requests (and the bodies they stream) finish, and closes the pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        // The gateway has no background workers; the empty set keeps the shared shutdown path.
        let workers = Workers::new(CancellationToken::new());
        let pool = self.state.pool.clone();
        let served =
            serve_until_stopped(self.listener, router(self.state), workers, shutdown).await;
        pool.close().await;
        served.map_err(Error::Infra)
    }
}

/// Applies the gateway's migrations to its schema.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    infra::db::migrate(pool, SCHEMA, &MIGRATOR).await?;
    Ok(())
}

/// With `ADMIN_USERNAME` and `ADMIN_PASSWORD`, makes sure that admin exists with that password
/// and the admin role; logs what it did, never the password.
async fn ensure_admin(config: &Config, users: &Users, passwords: &Passwords) -> Result<()> {
    let (Some(username), Some(password)) = (&config.admin_username, &config.admin_password) else {
        tracing::info!("no ADMIN_USERNAME/ADMIN_PASSWORD: no admin user is ensured");
        return Ok(());
    };
    let hash = passwords.hash(SecretString::clone(password)).await?;
    let (admin, created) = users.ensure_admin(username, &hash).await?;
    tracing::info!(
        customer_id = %admin.customer_id,
        username = %admin.username,
        created,
        "admin user ensured with the configured password"
    );
    Ok(())
}
