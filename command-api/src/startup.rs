//! Wiring: connect and migrate, build the stores, the saga and the router, bind the listener
//! (port 0 allowed, for tests), then serve until told to stop.

use std::future::Future;
use std::sync::Arc;

use infra::amqp::Topology;
use infra::auth::JwtVerifier;
use infra::bus::rabbit::{RabbitConsumer, RabbitConsumerSettings};
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

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::checkpoints;
use crate::config::Config;
use crate::decision_consumer::DecisionHandler;
use crate::decisions::FraudDecisions;
use crate::error::{Error, Result};
use crate::http::{AppState, router};
use crate::relay::{Relay, RelaySettings};
use crate::saga::Saga;
use crate::state::{FollowerState, PgFollowerState};
use crate::store::AggregateStore;

/// command-api's own schema (SPEC §2): the event store, snapshots and saga state.
pub const SCHEMA: &str = "command_api";

/// The event store's table as other services (projector, CLI) name it.
pub const EVENTS_TABLE: &str = "command_api.events";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct App {
    listener: TcpListener,
    /// The listener's bounds (`infra::server`).
    limits: HttpLimits,
    state: AppState,
    saga: Arc<Saga>,
    relay: Arc<Relay>,
    consumer: Arc<RabbitConsumer>,
    leadership: Arc<dyn Leadership>,
    follower_state: Arc<dyn FollowerState>,
    background_log: Arc<dyn EventLog>,
    pools: Vec<PgPool>,
    follow_settings: FollowSettings,
}

impl App {
    /// Connects, migrates and binds. Fails with a clear error on a bad database or address.
    pub async fn build(config: Config) -> Result<App> {
        // Before connecting anywhere: a store this build cannot use fails at once.
        config.event_store.validate()?;
        // Idempotent: `/metrics` renders the process-wide recorder, installed once.
        infra::telemetry::init_metrics();
        // Requests and background work (saga, relay, lag) read through pools of their own, so a
        // burst of requests never starves the followers, nor the reverse. Appends go through
        // the event log's committer, on a session of its own.
        let requests = infra::db::connect(
            &config.database_url,
            SCHEMA,
            config.database_max_connections,
            "requests",
        )
        .await?;
        migrate(&requests).await?;
        let background = infra::db::connect_background(
            &config.database_url,
            SCHEMA,
            config.background_max_connections,
            "background",
        )
        .await?;
        let session = infra::db::connect_options(&config.database_url, SCHEMA)?;
        // The log is PostgreSQL's by default, or KurrentDB's (`EVENT_STORE`); the saga state,
        // checkpoints and leadership stay in PostgreSQL either way.
        let (log, background_log): (Arc<dyn EventLog>, Arc<dyn EventLog>) =
            match config.event_store.open_kurrentdb().await? {
                // One multiplexed gRPC client serves requests and background work alike.
                Some(log) => (log.clone(), log),
                None => {
                    let log = PgEventLog::open(
                        requests.clone(),
                        PgEventLogOptions::writer(
                            SCHEMA,
                            infra::db::named(session.clone(), "committer"),
                        ),
                    )
                    .await?;
                    let background_log: Arc<dyn EventLog> =
                        Arc::new(log.reading_from(background.clone()));
                    (Arc::new(log), background_log)
                }
            };
        let follower_state: Arc<dyn FollowerState> =
            Arc::new(PgFollowerState::new(background.clone()));
        let accounts = Arc::new(AggregateStore::<AccountAggregate>::new(log.clone()));
        let transactions = Arc::new(AggregateStore::<TransactionAggregate>::new(log.clone()));
        let saga = Arc::new(Saga::new(
            accounts.clone(),
            transactions.clone(),
            background_log.clone(),
            follower_state.clone(),
            config.saga_settings(),
        ));
        let topology = Topology::new(&config.amqp_prefix)?;
        let relay = Arc::new(Relay::new(
            background_log.clone(),
            follower_state.clone(),
            RelaySettings {
                amqp_url: config.amqp_url.clone(),
                topology: topology.clone(),
                window: config.relay_window,
            },
        ));
        let mut settings = RabbitConsumerSettings::new(
            &config.amqp_url,
            topology.clone(),
            topology.decisions_queue(),
            &format!("command-api {}", config.amqp_prefix),
        );
        settings.prefetch = config.decision_prefetch;
        let consumer = Arc::new(RabbitConsumer::new(
            settings,
            Arc::new(DecisionHandler::new(FraudDecisions::new(
                transactions.clone(),
                saga.decision_timeout(),
            ))),
        ));
        let state = AppState {
            accounts,
            transactions,
            log,
            verifier: Arc::new(JwtVerifier::new(&config.token)?),
            broker_connected: consumer.link().connected_flag(),
            customer_top_ups: config.customer_top_ups,
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| {
                infra::Error::Config(format!("cannot listen on {}: {error}", config.listen_addr))
            })?;
        Ok(App {
            listener,
            limits: config.http,
            state,
            saga,
            relay,
            consumer,
            leadership: Arc::new(PgLeadership::new(infra::db::named(session, "leadership"))),
            follower_state,
            background_log,
            pools: vec![requests, background],
            follow_settings: config.follow_settings(),
        })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    /// The entry point of fraud decisions.
    pub fn decisions(&self) -> FraudDecisions {
        FraudDecisions::new(
            self.state.transactions.clone(),
            self.saga.decision_timeout(),
        )
    }

    pub fn saga(&self) -> Arc<Saga> {
        self.saga.clone()
    }

    /// The pool requests read with.
    pub fn pool(&self) -> PgPool {
        self.pools[0].clone()
    }

    /// Every pool of the service (a test that kills it closes their sessions).
    pub fn pools(&self) -> Vec<PgPool> {
        self.pools.clone()
    }

    /// The event log requests append to.
    pub fn log(&self) -> Arc<dyn EventLog> {
        self.state.log.clone()
    }

    /// Serves HTTP and runs the saga, the relay and the decision consumer until `shutdown`
    /// resolves; then stops taking requests and messages, lets in-flight ones finish, stops the
    /// saga and relay after their current batch, closes the broker channels and the pools. A
    /// worker that stops on its own stops the service too, with an error.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        workers.spawn(
            "saga",
            follow(
                self.saga.clone(),
                self.leadership.clone(),
                self.background_log.subscribe(),
                self.follow_settings,
                cancel.clone(),
            ),
        );
        workers.spawn(
            "relay",
            follow(
                self.relay.clone(),
                self.leadership.clone(),
                self.background_log.subscribe(),
                self.follow_settings,
                cancel.clone(),
            ),
        );
        workers.spawn(
            "decision consumer",
            self.consumer.clone().run(None, cancel.clone()),
        );
        workers.spawn(
            "lag reporter",
            checkpoints::report_lag(
                self.background_log.clone(),
                self.follower_state.clone(),
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
        served.map_err(Error::Infra)
    }
}

/// Applies command-api's migrations to its schema.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    infra::db::migrate(pool, SCHEMA, &MIGRATOR).await?;
    Ok(())
}

/// Applies only command-api's migrations older than `version`: the schema an earlier release
/// left, for tests of what a later migration does to it.
#[cfg(feature = "testing")]
pub async fn migrate_before(pool: &PgPool, version: i64) -> Result<()> {
    let older = Migrator {
        migrations: std::borrow::Cow::Owned(
            MIGRATOR
                .migrations
                .iter()
                .filter(|migration| migration.version < version)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    };
    infra::db::migrate(pool, SCHEMA, &older).await?;
    Ok(())
}
