//! Wiring: check Redis (when the velocity rule needs it), connect to the broker and declare the
//! topology, bind the listener (port 0 allowed, for tests), then consume and serve until told to
//! stop.

use std::future::Future;
use std::sync::Arc;

use infra::auth::JwtVerifier;
use infra::bus::rabbit::{RabbitConsumer, RabbitConsumerSettings, RabbitPublisher};
use infra::server::HttpLimits;
use infra::tasks::{Workers, serve_until_stopped};
use lapin::Connection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handler::FraudRules;
use crate::http::{AppState, router};
use crate::velocity::{RedisCounters, VelocityCounters};

pub struct App {
    listener: TcpListener,
    /// The listener's bounds (`infra::server`).
    limits: HttpLimits,
    state: AppState,
    consumer: Arc<RabbitConsumer>,
    publisher: Arc<RabbitPublisher>,
    connection: Connection,
}

impl App {
    /// Connects and binds. Fails with a clear error on a bad address, an unreachable broker, or
    /// an unreachable Redis while the velocity rule is on.
    pub async fn build(config: Config) -> Result<App> {
        // Idempotent: `/metrics` renders the process-wide recorder, installed once.
        infra::telemetry::init_metrics();
        let topology = config.topology();
        let rules = Arc::new(config.rules());
        for warning in rules.warnings() {
            tracing::warn!(warning, "fraud rule configuration");
        }
        let counter = Arc::new(RedisCounters::new(
            &config.redis_url,
            &config.redis_key_prefix,
        )?);
        if rules.velocity.enabled && !counter.ping().await {
            return Err(config_error(format!(
                "Redis at {} does not answer, and the velocity rule keeps its counters there \
                 (switch it off with FRAUD_RULES_DISABLED=velocity)",
                infra::telemetry::redact_url(&config.redis_url)
            )));
        }
        // Named after who we are (`fraud-worker <prefix>`), so an operator can tell the
        // worker's connections apart in the broker's tools.
        let name = format!("fraud-worker {}", config.amqp_prefix);
        let publisher = Arc::new(RabbitPublisher::new(
            &config.amqp_url,
            &format!("{name} decisions"),
            topology.decisions_exchange(),
            infra::amqp::FRAUD_DECISION_KEY,
        ));
        let fraud_rules = FraudRules::new(rules.clone(), counter.clone(), publisher.clone());
        let mut settings = RabbitConsumerSettings::new(
            &config.amqp_url,
            topology.clone(),
            topology.fraud_queue(),
            &name,
        );
        settings.prefetch = config.fraud_prefetch;
        settings.connected_gauge = Some("fraud_broker_connected");
        let consumer = Arc::new(RabbitConsumer::new(settings, Arc::new(fraud_rules)));
        let connection = consumer.connect().await?;
        let state = AppState {
            rules,
            verifier: Arc::new(JwtVerifier::new(&config.token)?),
            broker: consumer.link(),
            queue: topology.fraud_queue(),
            counter,
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|error| {
                config_error(format!("cannot listen on {}: {error}", config.listen_addr))
            })?;
        Ok(App {
            listener,
            limits: config.http,
            state,
            consumer,
            publisher,
            connection,
        })
    }

    /// The bound port (useful with `LISTEN_ADDR=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(0)
    }

    /// Consumes and serves until `shutdown` resolves, then stops taking requests and messages,
    /// lets in-flight ones finish, and closes the channels and the connection.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        let publisher = self.publisher.clone();
        let consumer = self.consumer.clone();
        let consuming = cancel.clone();
        workers.spawn("consumer", async move {
            consumer.run(Some(self.connection), consuming).await;
            publisher.close().await;
        });
        // The consumer only ends by itself if it failed: serving then stops too, so the process
        // exits instead of looking healthy while evaluating nothing.
        serve_until_stopped(
            self.listener,
            self.limits,
            router(self.state),
            workers,
            shutdown,
        )
        .await
        .map_err(Error::Infra)
    }
}

fn config_error(message: String) -> Error {
    Error::Infra(infra::Error::Config(message))
}
