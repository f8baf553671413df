//! Wiring: connect and migrate the schema `gateway`, ensure the configured bootstrap admin
//! (refusing to start when its name belongs to someone else), build the proxy and the routers,
//! bind the public listener and the metrics listener (port 0 allowed, for tests), then serve
//! both until told to stop.

use std::future::Future;
use std::sync::Arc;

use infra::server::HttpLimits;
use infra::tasks::{Workers, serve_until_stopped};
use secrecy::SecretString;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::{AppState, Upstreams, metrics_router, router};
use crate::identity::{AdminEnsured, Identities, PgIdentities};
use crate::limiter::Clock;
use crate::passwords::Passwords;
use crate::proxy::Proxy;

/// The gateway's own schema (SPEC §2): the identities.
pub const SCHEMA: &str = "gateway";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct App {
    listener: TcpListener,
    metrics_listener: TcpListener,
    limits: HttpLimits,
    pool: PgPool,
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
            "requests",
        )
        .await?;
        migrate(&pool).await?;
        let identities = PgIdentities::new(pool.clone());
        let passwords = match passwords {
            Some(passwords) => passwords,
            None => Passwords::new().await?,
        };
        ensure_admin(
            &identities,
            &passwords,
            config.admin_username.as_deref(),
            config.admin_password.as_ref(),
        )
        .await?;
        let upstreams = Upstreams::Proxy(Proxy::new(&config)?);
        let state = AppState::new(&config, Arc::new(identities), passwords, clock, upstreams)?;
        let listener = bind(config.listen_addr, "LISTEN_ADDR").await?;
        let metrics_listener = bind(config.metrics_addr, "METRICS_ADDR").await?;
        Ok(App {
            listener,
            metrics_listener,
            limits: config.http,
            pool,
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
        self.pool.clone()
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
        let pool = self.pool;
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

/// With `ADMIN_USERNAME` and `ADMIN_PASSWORD` (`username`, `password`), makes sure that
/// bootstrap admin exists with that password and the admin role; logs what it did, never the
/// password. When the name belongs to a user the gateway did not create as its bootstrap admin
/// (a customer who registered it first), refuses to start and names the conflict: granting it
/// admin would hand the ledger to whoever registered the name. `ledger serve` calls it too.
pub async fn ensure_admin(
    identities: &dyn Identities,
    passwords: &Passwords,
    username: Option<&str>,
    password: Option<&SecretString>,
) -> Result<()> {
    let (Some(username), Some(password)) = (username, password) else {
        tracing::info!("no ADMIN_USERNAME/ADMIN_PASSWORD: no admin user is ensured");
        return Ok(());
    };
    let hash = passwords.hash(SecretString::clone(password)).await?;
    match identities.ensure_admin(username, &hash).await? {
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
             {}",
            identities.how_to_mark_bootstrap_admin(customer_id)
        ))),
    }
}
