//! Wiring: connect to the event log and the read database, migrate, create the first
//! generation of each projection, start one runner per projection, serve the query API.

use std::future::Future;
use std::sync::Arc;

use infra::auth::JwtVerifier;
use infra::eventlog::EventLog;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::follow::{FollowSettings, follow};
use infra::leader::{Leadership, PgLeadership};
use infra::server::HttpLimits;
use infra::tasks::{Workers, serve_until_stopped};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, RedisCache};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::generations;
use crate::http::trail::LogEventTrail;
use crate::http::{AppState, Positions, router};
use crate::model::ProjectionName;
use crate::runner::Projector;
use crate::store::PgReadModels;
use infra::error::DatabaseContext;

/// The projector's own schema (SPEC §2).
pub const SCHEMA: &str = "projector";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Connects to the read database, migrates it and makes sure every projection has a live
/// generation. The CLI calls this too.
pub async fn connect_read_models(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = infra::db::connect(url, SCHEMA, max_connections, "read models").await?;
    infra::db::migrate(&pool, SCHEMA, &MIGRATOR).await?;
    generations::ensure(&pool).await?;
    Ok(pool)
}

/// Opens read models the projector (or a rebuild) already set up, for jobs that only read them:
/// every session is read-only, so an auditor's SELECT-only role is enough. It checks rather than
/// creates: a database where the projector never ran is an error saying what is missing.
pub async fn open_read_models(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = infra::db::connect_read_only(url, SCHEMA, max_connections, "read models").await?;
    let not_set_up = |what: String| {
        Error::Job(format!(
            "the read models in schema {SCHEMA} are not set up ({what}); start the projector \
             once, or run `ledger rebuild`"
        ))
    };
    let migrations: Option<String> =
        // Qualified: unqualified, a role without USAGE on the schema would find nothing and be
        // told to set up what exists.
        sqlx::query_scalar(&format!("SELECT to_regclass('{SCHEMA}._sqlx_migrations')::text"))
            .fetch_one(&pool)
            .await
            .context("looking for the read models' migrations")?;
    if migrations.is_none() {
        return Err(not_set_up("no migrations were applied".to_owned()));
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&pool)
            .await
            .context("reading the read models' migrations")?;
    if let Some(missing) = MIGRATOR.iter().find(|migration| {
        !migration.migration_type.is_down_migration() && !applied.contains(&migration.version)
    }) {
        return Err(not_set_up(format!(
            "migration {} ({}) is not applied",
            missing.version, missing.description
        )));
    }
    let registered: Vec<String> = sqlx::query_scalar("SELECT name FROM projections")
        .fetch_all(&pool)
        .await
        .context("reading the projections")?;
    if let Some(missing) = ProjectionName::ALL
        .into_iter()
        .find(|name| !registered.iter().any(|known| known == name.as_str()))
    {
        return Err(not_set_up(format!(
            "projection {missing} has no generation"
        )));
    }
    Ok(pool)
}

pub struct App {
    listener: TcpListener,
    /// The listener's bounds (`infra::server`).
    limits: HttpLimits,
    state: AppState,
    projector: Arc<Projector>,
    log: Arc<dyn EventLog>,
    leadership: Arc<dyn Leadership>,
    background: PgPool,
    /// The queries' pool of the read models.
    pool: PgPool,
    pools: Vec<PgPool>,
    follow_settings: FollowSettings,
}

impl App {
    pub async fn build(config: Config) -> Result<App> {
        // Before connecting anywhere: a store this build cannot use fails at once.
        config.event_store.validate()?;
        infra::telemetry::init_metrics();
        // Queries and the projector's batches each have pools of their own (read models and
        // event log), so a burst of reads never stalls the projections, nor the reverse.
        let pool = connect_read_models(config.read_database_url(), config.database_max_connections)
            .await?;
        let background = infra::db::connect_background(
            config.read_database_url(),
            SCHEMA,
            config.background_max_connections,
            "projections",
        )
        .await?;
        let events_pool = infra::db::connect(
            &config.database_url,
            SCHEMA,
            config.database_max_connections,
            "event reads",
        )
        .await?;
        let background_events = infra::db::connect_background(
            &config.database_url,
            SCHEMA,
            config.background_max_connections,
            "projections events",
        )
        .await?;
        let lock_options = infra::db::connect_options(config.read_database_url(), SCHEMA)?;
        let cache: Arc<Cache> = Arc::new(RedisCache::new(
            &config.redis_url,
            &config.redis_key_prefix,
            config.cache_ttl_seconds,
        )?);
        // Reads waiting for their position use small read-only pools of their own (checkpoints,
        // and the log's head), never the queries' or the projector's connections.
        let positions_pool = infra::db::connect_read_only(
            config.read_database_url(),
            SCHEMA,
            crate::http::positions::POOL_CONNECTIONS,
            "positions",
        )
        .await?;
        let positions_events = infra::db::connect_read_only(
            &config.database_url,
            SCHEMA,
            crate::http::positions::POOL_CONNECTIONS,
            "positions events",
        )
        .await?;
        // The log is PostgreSQL's by default, or KurrentDB's (`EVENT_STORE`): read models and
        // checkpoints stay in PostgreSQL either way; the audit trail reads the log.
        let (trail_log, positions_log, log): (
            Arc<dyn EventLog>,
            Arc<dyn EventLog>,
            Arc<dyn EventLog>,
        ) = match config.event_store.open_kurrentdb().await? {
            Some(log) => (log.clone(), log.clone(), log),
            None => {
                // Each reader on the pool of its own; only the projector's listens for
                // command-api's NOTIFY, the others are asked.
                let reader = |pool: &PgPool, listen: bool| {
                    PgEventLog::open(
                        pool.clone(),
                        PgEventLogOptions {
                            listen,
                            ..PgEventLogOptions::reader(&config.events_table)
                        },
                    )
                };
                (
                    Arc::new(reader(&events_pool, false).await?),
                    Arc::new(reader(&positions_events, false).await?),
                    Arc::new(reader(&background_events, true).await?),
                )
            }
        };
        let projector = Arc::new(Projector::new(
            Arc::new(PgReadModels::new(background.clone())),
            log.clone(),
            Some(cache.clone()),
            config.projector_settings(),
        ));
        let state = AppState {
            models: Arc::new(PgReadModels::new(pool.clone())),
            trail: Arc::new(LogEventTrail::new(trail_log)),
            cache: Some(cache),
            verifier: Arc::new(JwtVerifier::new(&config.token)?),
            runners_healthy: vec![projector.health_flag()],
            positions: Arc::new(Positions::new(
                Arc::new(PgReadModels::new(positions_pool.clone())),
                positions_log,
                Some(projector.applied()),
                config.position_waiters_max,
            )),
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| {
                infra::Error::Config(format!("cannot listen on {}: {error}", config.listen_addr))
            })?;
        Ok(App {
            listener,
            pool: pool.clone(),
            pools: vec![
                pool,
                background.clone(),
                events_pool,
                background_events,
                positions_pool,
                positions_events,
            ],
            limits: config.http,
            state,
            projector,
            log,
            leadership: Arc::new(PgLeadership::new(infra::db::named(
                lock_options,
                "leadership",
            ))),
            background,
            follow_settings: config.follow_settings(),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Every pool of the service (a test that kills it closes their sessions).
    pub fn pools(&self) -> Vec<PgPool> {
        self.pools.clone()
    }

    /// Serves the query API and runs the projector until `shutdown` resolves; the projector
    /// stops after its current batch.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        workers.spawn(
            "projector",
            follow(
                self.projector.clone(),
                self.leadership.clone(),
                self.log.subscribe(),
                self.follow_settings,
                cancel.clone(),
            ),
        );
        workers.spawn(
            "lag reporter",
            crate::runner::report_lag(
                Arc::new(PgReadModels::new(self.background.clone())),
                self.log.clone(),
                cancel.clone(),
            ),
        );
        let served = serve_until_stopped(
            self.listener,
            self.limits,
            router(self.state),
            workers,
            shutdown,
        )
        .await;
        for pool in self.pools {
            pool.close().await;
        }
        served.map_err(crate::Error::Infra)
    }
}
