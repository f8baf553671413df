//! `ledger serve` (SPEC §10): the whole ledger in one process, on SQLite in a data directory,
//! with an in-process bus and cache.
//!
//! It builds the very parts the four services run, each on the embedded implementation of its
//! seam: the event log ([`SqliteEventLog`]), the followers' state, the read models, the
//! transaction cache (moka), the bus (the fraud rules follow the committed log and hand their
//! decisions straight to the decision handler), the fraud counters, identity, and leadership
//! (the lock on DIR makes this process the only one; inside it, [`LocalLeadership`]). The
//! public router is the gateway's edge in front of the command, query and fraud routers, in
//! process: the same paths, roles, problem codes and headers as the four services. No part
//! below knows which mode it runs in.

pub mod data_dir;
pub mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use clap::{Args, Parser};
use command_api::aggregates::{AccountAggregate, TransactionAggregate};
use command_api::decision_consumer::DecisionHandler;
use command_api::decisions::FraudDecisions;
use command_api::saga::{Saga, SagaSettings};
use command_api::state::{FollowerState, SqliteFollowerState};
use command_api::store::AggregateStore;
use infra::auth::JwtVerifier;
use infra::bus::local::{LocalPublisher, LogConsumer, LogConsumerSettings, SqliteBusStore};
use infra::codec::{TRANSACTION_CREATED, TRANSACTION_STREAM};
use infra::eventlog::committer::CommitterSettings;
use infra::eventlog::sqlite::SqliteEventLog;
use infra::eventlog::{EventLog, LogFilter};
use infra::follow::{FollowSettings, follow};
use infra::http::{HealthReport, HealthRounds, not_found};
use infra::leader::{Leadership, LocalLeadership};
use infra::server::HttpLimits;
use infra::tasks::{Workers, serve_until_stopped};
use infra::telemetry::LogFormat;
use secrecy::ExposeSecret;
use sqlx::SqlitePool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::data_dir::{DataDir, Holder};
use crate::error::{Error, Result};

/// Connections reads take from the SQLite file (queries, loads, followers). Writes go through
/// the one connection of [`WRITE_CONNECTIONS`].
const READ_CONNECTIONS: u32 = 8;

/// Connections every writer of the SQLite file shares: the event log's committer, the
/// followers' state, identity, the bus's checkpoints, the fraud counters. SQLite takes one
/// writer at a time anyway; with one connection they wait their turn in the pool's queue, in
/// order, rather than in SQLite's busy handler, which sleeps up to 100 ms between tries (with
/// four, the busy handler's sleeps held the embedded benchmark to ~350 settled transfers/s).
const WRITE_CONNECTIONS: u32 = 1;

/// Transaction events the saga reads per batch: more transactions per round, so each of its
/// appends carries more of them through the one write connection.
const SAGA_BATCH_SIZE: usize = 4_096;

/// The fraud rules' consumer on the embedded bus: its checkpoint and poison records.
const FRAUD_CONSUMER: &str = "fraud-rules";

/// Messages the fraud rules handle at once. Each waits twice for a group commit (its velocity
/// count, then its decision's append), so the number in flight is what those commits can share:
/// at the consumer's default of 16 the embedded benchmark's backlog drained at about 250/s.
const FRAUD_CONCURRENCY: usize = 256;

/// Events the fraud rules' consumer reads per batch: four rounds of [`FRAUD_CONCURRENCY`], so the
/// wait for a batch's slowest message and its checkpoint is shared by more messages.
const FRAUD_BATCH: usize = 1_024;

/// How long an idle follower waits without a wake-up. Every commit of this process wakes them:
/// this is only the fallback.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The data directory: the SQLite file, the secrets of a first try, the lock.
    #[arg(long, env = "LEDGER_DATA", default_value = "ledger-data")]
    pub data: PathBuf,

    /// Where the public API listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Where `/metrics` listens, off the public listener.
    #[arg(
        long = "metrics-listen",
        env = "METRICS_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,

    /// `enabled` lets customers deposit into their own accounts (sandboxes only).
    #[arg(long, env = "CUSTOMER_TOP_UPS", default_value = "disabled",
          value_parser = command_api::config::parse_top_ups)]
    pub customer_top_ups: bool,

    /// Seconds without a fraud decision before a transaction is rejected.
    #[arg(long, env = "FRAUD_DECISION_TIMEOUT_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub fraud_decision_timeout_seconds: u64,

    /// The fraud rules' thresholds, as the fraud worker takes them.
    #[command(flatten)]
    pub fraud: fraud_worker::config::RulesConfig,

    /// The listener's bounds, as every service takes them.
    #[command(flatten)]
    pub http: HttpLimits,
}

/// Runs `ledger serve` until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> Result<bool> {
    let started = Instant::now();
    infra::telemetry::init_tracing(args.log_format);
    infra::telemetry::init_metrics();
    let dir = DataDir::lock(&args.data, Holder::Serve)?;
    let secrets = secrets::load_or_create(dir.path(), secrets::FromEnvironment::read())?;
    let app = build(&args, &dir, &secrets).await?;
    let port = app
        .listener
        .local_addr()
        .map_or(0, |address| address.port());
    let metrics_port = app
        .metrics_listener
        .local_addr()
        .map_or(0, |address| address.port());
    release_start_up_memory();
    tracing::info!(port, data = %dir.path().display(), "ledger listening");
    tracing::info!(port = metrics_port, "ledger metrics listening");
    let host = match args.listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        ip => ip.to_string(),
    };
    eprintln!(
        "ledger serve: the API is on http://{host}:{port} (data in {}, started in {} ms)\n{}",
        dir.path().display(),
        started.elapsed().as_millis(),
        secrets.announcement(&format!("http://{host}:{port}"))
    );
    app.run(infra::telemetry::shutdown_signal()).await?;
    tracing::info!("ledger stopped");
    drop(dir);
    Ok(true)
}

/// Hands the memory freed during start-up back to the OS. Checking the bootstrap admin's password
/// (argon2: 19 MiB per hash) frees a block that mimalloc keeps for reuse until its arena is next
/// active, so an idle `serve` would hold it for good (49 MB instead of 33 MB, 5 s after start).
fn release_start_up_memory() {
    // SAFETY: `mi_collect` takes no pointers; it only purges the allocator's free pages, which
    // no live allocation uses.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Everything `serve` runs, built and bound.
struct App {
    listener: TcpListener,
    metrics_listener: TcpListener,
    limits: HttpLimits,
    public: Router,
    saga: Arc<Saga>,
    projector: Arc<projector::runner::Projector>,
    fraud: Arc<LogConsumer>,
    log: Arc<dyn EventLog>,
    leadership: Arc<dyn Leadership>,
    pools: Vec<SqlitePool>,
}

async fn build(args: &ServeArgs, dir: &DataDir, secrets: &secrets::Secrets) -> Result<App> {
    // Checked here first: clap's own message would quote the secret.
    infra::auth::parse_secret(secrets.jwt_secret.expose_secret())
        .map_err(|problem| Error::Usage(format!("JWT_SECRET {problem}")))?;
    // The edge's settings as the gateway reads them (JWT_ISSUER, JWT_AUDIENCE, token
    // lifetimes, login limits, TRUSTED_PROXIES, ...), with this directory's secret; its
    // database and upstream URLs are never contacted here.
    let gateway_config = gateway::config::Config::try_parse_from([
        "ledger serve",
        "--jwt-secret",
        secrets.jwt_secret.expose_secret(),
    ])
    .map_err(|error| Error::Usage(format!("JWT_SECRET or the edge's settings: {error}")))?;
    let verifier = Arc::new(JwtVerifier::new(&gateway_config.token)?);

    // Storage: one SQLite file in DIR.
    let readers = infra::sqlite::pool(
        infra::sqlite::options(&dir.database(), true),
        READ_CONNECTIONS,
    )
    .await?;
    let writers = infra::sqlite::pool(
        infra::sqlite::writer_options(&dir.database(), true),
        WRITE_CONNECTIONS,
    )
    .await?;
    let log: Arc<dyn EventLog> = Arc::new(
        SqliteEventLog::open(
            readers.clone(),
            Some(writers.clone()),
            CommitterSettings::default(),
        )
        .await?,
    );
    let follower_state: Arc<dyn FollowerState> = Arc::new(
        SqliteFollowerState::open(writers.clone())
            .await
            .map_err(command_error)?,
    );
    let leadership: Arc<dyn Leadership> = Arc::new(LocalLeadership::default());

    // The write side.
    let accounts = Arc::new(AggregateStore::<AccountAggregate>::new(log.clone()));
    let transactions = Arc::new(AggregateStore::<TransactionAggregate>::new(log.clone()));
    let saga = Arc::new(Saga::new(
        accounts.clone(),
        transactions.clone(),
        log.clone(),
        follower_state,
        SagaSettings {
            batch_size: SAGA_BATCH_SIZE,
            concurrency: command_api::saga::CONCURRENCY_DEFAULT,
            decision_timeout: chrono::TimeDelta::seconds(
                i64::try_from(args.fraud_decision_timeout_seconds).unwrap_or(i64::MAX),
            ),
        },
    ));
    let commands = command_api::http::AppState {
        accounts,
        transactions: transactions.clone(),
        log: log.clone(),
        verifier: verifier.clone(),
        // No broker here: the embedded bus is this process.
        broker_connected: Arc::new(AtomicBool::new(true)),
        customer_top_ups: args.customer_top_ups,
    };

    // The read side.
    let models: Arc<dyn projector::store::ReadModels> = Arc::new(
        projector::store::SqliteReadModels::open_file(&dir.read_models(), READ_CONNECTIONS)
            .await
            .map_err(Error::Projector)?,
    );
    let cache: Arc<projector::cache::Cache> = Arc::new(projector::cache::MemoryCache::new(
        projector::cache::MEMORY_CACHE_ENTRIES,
        Duration::from_secs(60),
    ));
    let projector = Arc::new(projector::runner::Projector::new(
        models.clone(),
        log.clone(),
        Some(cache.clone()),
        projector::runner::ProjectorSettings {
            batch_size: projector::runner::BATCH_SIZE_DEFAULT,
        },
    ));
    let positions = Arc::new(projector::http::positions::Positions::new(
        models.clone(),
        log.clone(),
        Some(projector.applied()),
        projector::http::positions::WAITERS_MAX,
    ));
    let queries = projector::http::AppState {
        models,
        trail: Arc::new(projector::http::trail::LogEventTrail::new(log.clone())),
        cache: Some(cache),
        verifier: verifier.clone(),
        runners_healthy: vec![projector.health_flag()],
        positions,
    };

    // The fraud rules on the embedded bus: they follow the committed log from a checkpoint
    // and hand each decision to the decision handler, which appends it before the checkpoint
    // moves.
    let decisions = Arc::new(DecisionHandler::new(FraudDecisions::new(
        transactions,
        saga.decision_timeout(),
    )));
    let rules = Arc::new(args.fraud.rules());
    let counters: Arc<dyn fraud_worker::velocity::VelocityCounters> = Arc::new(
        fraud_worker::velocity::SqliteCounters::open(writers.clone())
            .await
            .map_err(fraud_error)?,
    );
    let fraud_rules = Arc::new(fraud_worker::handler::FraudRules::new(
        rules.clone(),
        counters,
        Arc::new(LocalPublisher::new(decisions)),
    ));
    let bus = SqliteBusStore::open(writers.clone()).await?;
    let fraud = Arc::new(LogConsumer::new(
        log.clone(),
        bus.clone(),
        fraud_rules,
        LogConsumerSettings {
            concurrency: FRAUD_CONCURRENCY,
            batch: FRAUD_BATCH,
            ..LogConsumerSettings::new(
                FRAUD_CONSUMER,
                LogFilter::event(TRANSACTION_STREAM, TRANSACTION_CREATED),
            )
        },
    ));
    let fraud_routes =
        fraud_worker::http::rules_routes().with_state(fraud_worker::http::RulesState {
            rules,
            verifier: verifier.clone(),
        });

    // The edge: identity on SQLite, in front of the three routers.
    let identities: Arc<dyn gateway::identity::Identities> = Arc::new(
        gateway::identity::SqliteIdentities::open(writers.clone())
            .await
            .map_err(gateway_error)?,
    );
    let passwords = gateway::passwords::Passwords::new()
        .await
        .map_err(gateway_error)?;
    gateway::startup::ensure_admin(
        &*identities,
        &passwords,
        Some(&secrets.admin_username),
        Some(&secrets.admin_password),
    )
    .await
    .map_err(gateway_error)?;
    let inner = Router::new()
        .merge(command_api::http::routes().with_state(commands))
        .merge(projector::http::routes().with_state(queries))
        .merge(fraud_routes)
        .fallback(not_found);
    let edge = gateway::http::AppState::new(
        &gateway_config,
        identities.clone(),
        passwords,
        gateway::limiter::Clock::System,
        gateway::http::Upstreams::InProcess(inner),
    )
    .map_err(gateway_error)?;
    let health = Health {
        readers: readers.clone(),
        bus,
        projector: projector.health_flag(),
        rounds: Arc::default(),
    };
    let own = Router::new()
        .route("/health", get(health_report))
        .with_state(health);
    let public = gateway::http::edge_router(edge, own);

    let listener = bind(args.listen, "--listen").await?;
    let metrics_listener = bind(args.metrics_listen, "--metrics-listen").await?;
    Ok(App {
        listener,
        metrics_listener,
        limits: args.http,
        public,
        saga,
        projector,
        fraud,
        log,
        leadership,
        pools: vec![readers, writers],
    })
}

impl App {
    /// Serves and runs the followers until `shutdown`; then stops taking requests, lets those
    /// in flight finish, stops the followers after their current batch, closes the database.
    async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let cancel = CancellationToken::new();
        let settings = FollowSettings {
            poll_interval: POLL_INTERVAL,
        };
        let mut workers = Workers::new(cancel.clone());
        workers.spawn(
            "saga",
            follow(
                self.saga.clone(),
                self.leadership.clone(),
                self.log.subscribe(),
                settings,
                cancel.clone(),
            ),
        );
        workers.spawn(
            "projector",
            follow(
                self.projector.clone(),
                self.leadership.clone(),
                self.log.subscribe(),
                settings,
                cancel.clone(),
            ),
        );
        workers.spawn("fraud rules", self.fraud.clone().run(cancel.clone()));

        let metrics = tokio::spawn(infra::server::serve(
            self.metrics_listener,
            self.limits,
            gateway::http::metrics_router(),
            cancel.clone().cancelled_owned(),
        ));
        let served =
            serve_until_stopped(self.listener, self.limits, self.public, workers, shutdown).await;
        cancel.cancel();
        let _ = metrics.await;
        for pool in self.pools {
            pool.close().await;
        }
        served.map_err(Error::Infra)
    }
}

/// What `/health` looks at: the database, the bus (the fraud rules' checkpoints and poison),
/// and whether the projector's last batch succeeded. The cache is in process: it is up.
#[derive(Clone)]
struct Health {
    readers: SqlitePool,
    bus: SqliteBusStore,
    projector: Arc<AtomicBool>,
    /// The rounds of checks (database, bus), each reused for a second as the gateway's are:
    /// `/health` is public and unauthenticated, and a round takes connections queries read with.
    rounds: Arc<HealthRounds<(bool, bool)>>,
}

async fn health_report(State(health): State<Health>) -> HealthReport {
    let (database, bus) = health
        .rounds
        .get(|| async {
            tokio::join!(
                infra::sqlite::ping(&health.readers, Duration::from_secs(2)),
                health.bus.ping(Duration::from_secs(2)),
            )
        })
        .await;
    HealthReport::default()
        .required("database", database)
        .required("bus", bus)
        .required("cache", true)
        .optional(
            "projections",
            health.projector.load(std::sync::atomic::Ordering::Relaxed),
        )
}

async fn bind(address: SocketAddr, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|error| Error::Usage(format!("cannot listen on {address} ({flag}): {error}")))
}

fn command_error(error: command_api::Error) -> Error {
    Error::Start(error.to_string())
}

fn fraud_error(error: fraud_worker::Error) -> Error {
    Error::Start(error.to_string())
}

fn gateway_error(error: gateway::Error) -> Error {
    Error::Start(error.to_string())
}
