//! Wiring: connect and migrate the schema `gateway`, ensure the configured bootstrap admin
//! (refusing to start when its name belongs to someone else), build the proxy and the routers,
//! bind the public listener and the metrics listener (port 0 allowed, for tests), then serve
//! both until told to stop.

use std::future::Future;
use std::sync::Arc;

use infra::auth::{JwtSigner, JwtVerifier};
use infra::server::HttpLimits;
use infra::tasks::{Workers, serve_until_stopped};
use secrecy::SecretString;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::{AppState, HealthCache, metrics_router, router};
use crate::identity::{AdminEnsured, Users};
use crate::limiter::{Clock, LoginLimiter};
use crate::passwords::Passwords;
use crate::proxy::Proxy;

/// The gateway's own schema (SPEC §2): the identities.
pub const SCHEMA: &str = "gateway";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct App {
    listener: TcpListener,
    metrics_listener: TcpListener,
    limits: HttpLimits,
    state: AppState,
}

impl App {
    /// Connects, migrates, ensures the admin and binds, with the system clock.
    pub async fn build(config: Config) -> Result<App> {
        App::build_with(config, Clock::System, None).await
    }

    /// [`App::build`] with the clock the login limiter reads (tests move a manual one) and,
    /// optionally, password hashing of other bounds (tests fill a small queue).
    pub async fn build_with(
        config: Config,
        clock: Clock,
        passwords: Option<Passwords>,
    ) -> Result<App> {
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
        let passwords = match passwords {
            Some(passwords) => passwords,
            None => Passwords::new().await?,
        };
        ensure_admin(&config, &users, &passwords).await?;
        let state = AppState {
            pool,
            users,
            passwords,
            limiter: Arc::new(LoginLimiter::new(config.login_limits(), clock)),
            signer: Arc::new(JwtSigner::new(&config.token)?),
            verifier: Arc::new(JwtVerifier::new(&config.token)?),
            access_token_ttl_seconds: i64::try_from(config.access_token_ttl_seconds)
                .map_err(|_| Error::config("ACCESS_TOKEN_TTL_SECONDS is out of range"))?,
            session_lifetime: std::time::Duration::from_secs(config.jwt_ttl_seconds),
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            routes: Arc::new(config.gateway_routes.clone()),
            proxy: Proxy::new(&config)?,
            health: Arc::new(HealthCache::default()),
        };
        let listener = bind(config.listen_addr, "LISTEN_ADDR").await?;
        let metrics_listener = bind(config.metrics_addr, "METRICS_ADDR").await?;
        Ok(App {
            listener,
            metrics_listener,
            limits: config.http,
            state,
        })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    /// The bound metrics port (`METRICS_ADDR`).
    pub fn metrics_port(&self) -> u16 {
        self.metrics_listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    pub fn pool(&self) -> PgPool {
        self.state.pool.clone()
    }

    /// Serves both listeners until `shutdown` resolves, then stops taking connections, lets
    /// in-flight requests (and the bodies they stream) finish, and closes the pool.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let stop = CancellationToken::new();
        let metrics = tokio::spawn(infra::server::serve(
            self.metrics_listener,
            self.limits,
            metrics_router(),
            stop.clone().cancelled_owned(),
        ));
        // The gateway has no background workers; the empty set keeps the shared shutdown path.
        let workers = Workers::new(CancellationToken::new());
        let pool = self.state.pool.clone();
        let served = serve_until_stopped(
            self.listener,
            self.limits,
            router(self.state),
            workers,
            shutdown,
        )
        .await;
        stop.cancel();
        let _ = metrics.await;
        pool.close().await;
        served.map_err(Error::Infra)
    }
}

async fn bind(address: std::net::SocketAddr, variable: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|error| Error::config(format!("cannot listen on {address} ({variable}): {error}")))
}

/// Applies the gateway's migrations to its schema.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    infra::db::migrate(pool, SCHEMA, &MIGRATOR).await?;
    Ok(())
}

/// With `ADMIN_USERNAME` and `ADMIN_PASSWORD`, makes sure that bootstrap admin exists with that
/// password and the admin role; logs what it did, never the password. When the name belongs to
/// a user the gateway did not create as its bootstrap admin (a customer who registered it
/// first), refuses to start and names the conflict: granting it admin would hand the ledger to
/// whoever registered the name.
async fn ensure_admin(config: &Config, users: &Users, passwords: &Passwords) -> Result<()> {
    let (Some(username), Some(password)) = (&config.admin_username, &config.admin_password) else {
        tracing::info!("no ADMIN_USERNAME/ADMIN_PASSWORD: no admin user is ensured");
        return Ok(());
    };
    let hash = passwords.hash(SecretString::clone(password)).await?;
    match users.ensure_admin(username, &hash).await? {
        AdminEnsured::Ensured { admin, created } => {
            tracing::info!(
                customer_id = %admin.customer_id,
                username = %admin.username,
                created,
                "bootstrap admin ensured with the configured password"
            );
            Ok(())
        }
        AdminEnsured::Conflict { customer_id } => Err(Error::config(format!(
            "ADMIN_USERNAME {username:?} belongs to user {customer_id}, which this gateway did \
             not create as its bootstrap admin; refusing to start rather than make it an admin. \
             Choose another ADMIN_USERNAME, or, if that user is the intended admin, mark it: \
             UPDATE gateway.users SET bootstrap_admin = true WHERE customer_id = '{customer_id}'"
        ))),
    }
}
