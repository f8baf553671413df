//! Wiring: connect and migrate, build the stores, the saga and the router, bind the listener
//! (port 0 allowed, for tests), then serve until told to stop.

use std::future::Future;
use std::sync::Arc;

use infra::amqp::Topology;
use infra::auth::JwtVerifier;
use infra::log::LogReader;
use infra::tasks::{Workers, serve_until_stopped};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::checkpoints;
use crate::config::Config;
use crate::decision_consumer::{ConsumerSettings, DecisionConsumer};
use crate::decisions::FraudDecisions;
use crate::error::{Error, Result};
use crate::http::{AppState, router};
use crate::relay::{Relay, RelaySettings};
use crate::saga::Saga;
use crate::store::AggregateStore;

/// command-api's own schema (SPEC §2): the event store, snapshots and saga state.
pub const SCHEMA: &str = "command_api";

/// The event store's table as other services (projector, CLI) name it.
pub const EVENTS_TABLE: &str = "command_api.events";

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct App {
    listener: TcpListener,
    state: AppState,
    saga: Arc<Saga>,
    relay: Arc<Relay>,
    consumer: Arc<DecisionConsumer>,
    lock_options: PgConnectOptions,
}

impl App {
    /// Connects, migrates and binds. Fails with a clear error on a bad database or address.
    pub async fn build(config: Config) -> Result<App> {
        // Idempotent: `/metrics` renders the process-wide recorder, installed once.
        infra::telemetry::init_metrics();
        let pool = infra::db::connect(
            &config.database_url,
            SCHEMA,
            config.database_max_connections,
        )
        .await?;
        migrate(&pool).await?;
        let lock_options = infra::db::connect_options(&config.database_url, SCHEMA)?;
        let accounts = Arc::new(AggregateStore::<AccountAggregate>::new(pool.clone()));
        let transactions = Arc::new(AggregateStore::<TransactionAggregate>::new(pool.clone()));
        let saga = Arc::new(Saga::new(
            accounts.clone(),
            transactions.clone(),
            pool.clone(),
            config.saga_settings(),
        ));
        let topology = Topology::new(&config.amqp_prefix)?;
        let relay = Arc::new(Relay::new(
            pool.clone(),
            RelaySettings {
                amqp_url: config.amqp_url.clone(),
                topology: topology.clone(),
                window: config.relay_window,
                poll_interval: config.saga_settings().poll_interval,
            },
        ));
        let consumer = Arc::new(DecisionConsumer::new(
            FraudDecisions::new(transactions.clone()),
            ConsumerSettings {
                amqp_url: config.amqp_url.clone(),
                topology,
                prefetch: config.decision_prefetch,
            },
        ));
        let state = AppState {
            accounts,
            transactions,
            pool,
            verifier: Arc::new(JwtVerifier::new(&config.jwt_secret)?),
            broker_connected: consumer.connection_flag(),
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| {
                infra::Error::Config(format!("cannot listen on {}: {error}", config.listen_addr))
            })?;
        Ok(App {
            listener,
            state,
            saga,
            relay,
            consumer,
            lock_options,
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
        FraudDecisions::new(self.state.transactions.clone())
    }

    pub fn saga(&self) -> Arc<Saga> {
        self.saga.clone()
    }

    pub fn pool(&self) -> PgPool {
        self.state.pool.clone()
    }

    /// Serves HTTP and runs the saga, the relay and the decision consumer until `shutdown`
    /// resolves; then stops taking requests and messages, lets in-flight ones finish, stops the
    /// saga and relay after their current batch, closes the broker channels and the pool. A
    /// worker that stops on its own stops the service too, with an error.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        workers.spawn(
            "saga",
            self.saga
                .clone()
                .run(self.lock_options.clone(), cancel.clone()),
        );
        workers.spawn(
            "relay",
            self.relay
                .clone()
                .run(self.lock_options.clone(), cancel.clone()),
        );
        workers.spawn(
            "decision consumer",
            self.consumer.clone().run(cancel.clone()),
        );
        workers.spawn(
            "lag reporter",
            checkpoints::report_lag(
                self.state.pool.clone(),
                LogReader::new(self.state.pool.clone(), "events"),
                cancel.clone(),
            ),
        );
        let pool = self.state.pool.clone();
        let served =
            serve_until_stopped(self.listener, router(self.state), workers, shutdown).await;
        pool.close().await;
        served.map_err(Error::Infra)
    }
}

/// Applies command-api's migrations to its schema.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    infra::db::migrate(pool, SCHEMA, &MIGRATOR).await?;
    Ok(())
}
