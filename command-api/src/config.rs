//! command-api's configuration, read from the environment (SPEC §6) once, at start. A bad value
//! fails here, naming the variable, never at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::TimeDelta;
use clap::Parser;
use infra::auth::TokenConfig;
use infra::eventlog::choice::EventStoreConfig;
use infra::server::HttpLimits;
use infra::telemetry::{LogFormat, redact_url};

use infra::follow::FollowSettings;

use crate::saga::SagaSettings;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "command-api",
    version,
    about = "The ledger's write side: commands, event store and saga."
)]
pub struct Config {
    /// PostgreSQL holding the event store (schema `command_api`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/ledger?sslmode=disable"
    )]
    pub database_url: String,

    /// RabbitMQ, for the relay and the decision consumer.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f"
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name (one topology per prefix).
    #[arg(long, env = "AMQP_PREFIX", default_value = "ledger")]
    pub amqp_prefix: String,

    /// Events the relay publishes before waiting for their confirms.
    #[arg(long, env = "RELAY_WINDOW", default_value_t = 512,
          value_parser = parse_count::<10_000>)]
    pub relay_window: usize,

    /// Unacknowledged fraud decisions in flight per instance.
    #[arg(long, env = "DECISION_PREFETCH", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=1_000))]
    pub decision_prefetch: u16,

    /// Where the HTTP API listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    pub listen_addr: SocketAddr,

    /// The token secret, issuer and audience shared with the gateway.
    #[command(flatten)]
    pub token: TokenConfig,

    /// The listener's header, body and idle timeouts and its connection bound.
    #[command(flatten)]
    pub http: HttpLimits,

    /// Which store holds the event log (`EVENT_STORE=postgres|kurrentdb`, `KURRENTDB_URL`).
    #[command(flatten)]
    pub event_store: EventStoreConfig,

    /// `enabled` lets customers deposit into their own accounts ("simulated top-ups", for
    /// sandboxes); `disabled` leaves deposits to operators and admins (SPEC §5).
    #[arg(long, env = "CUSTOMER_TOP_UPS", default_value = "disabled", value_parser = parse_top_ups)]
    pub customer_top_ups: bool,

    /// Seconds without a fraud decision before a transaction is rejected (`fraud_check_timeout`).
    #[arg(long, env = "FRAUD_DECISION_TIMEOUT_SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub fraud_decision_timeout_seconds: u64,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,

    /// Connections requests read with (stream loads on a cache miss, `/health`).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(2..=500))]
    pub database_max_connections: u32,

    /// Connections the saga, the relay and the lag reporter read and record with.
    #[arg(long, env = "BACKGROUND_MAX_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(2..=100))]
    pub background_max_connections: u32,

    /// Streams the saga loads concurrently when they are not in its cache.
    #[arg(long, env = "SAGA_CONCURRENCY", default_value_t = crate::saga::CONCURRENCY_DEFAULT,
          value_parser = parse_count::<1_024>)]
    pub saga_concurrency: usize,

    /// Events the saga reads per batch.
    #[arg(long, env = "SAGA_BATCH_SIZE", default_value_t = crate::saga::BATCH_SIZE_DEFAULT,
          value_parser = parse_count::<10_000>)]
    pub saga_batch_size: usize,

    /// Milliseconds an idle follower waits without a wake-up before looking at the log anyway.
    #[arg(long, env = "LOG_POLL_INTERVAL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub log_poll_interval_ms: u64,
}

impl Config {
    pub fn saga_settings(&self) -> SagaSettings {
        SagaSettings {
            batch_size: self.saga_batch_size,
            concurrency: self.saga_concurrency,
            decision_timeout: TimeDelta::seconds(
                i64::try_from(self.fraud_decision_timeout_seconds).unwrap_or(i64::MAX),
            ),
        }
    }

    pub fn follow_settings(&self) -> FollowSettings {
        FollowSettings {
            poll_interval: Duration::from_millis(self.log_poll_interval_ms),
        }
    }

    /// The configuration as it may be logged: the database password and the secret are hidden.
    pub fn redacted(&self) -> String {
        format!(
            "database_url={} amqp_url={} amqp_prefix={} listen_addr={} fraud_decision_timeout_seconds={} \
             database_max_connections={} background_max_connections={} saga_concurrency={} \
             saga_batch_size={} relay_window={} log_poll_interval_ms={} customer_top_ups={} {} {} {}",
            redact_url(&self.database_url),
            redact_url(&self.amqp_url),
            self.amqp_prefix,
            self.listen_addr,
            self.fraud_decision_timeout_seconds,
            self.database_max_connections,
            self.background_max_connections,
            self.saga_concurrency,
            self.saga_batch_size,
            self.relay_window,
            self.log_poll_interval_ms,
            if self.customer_top_ups {
                "enabled"
            } else {
                "disabled"
            },
            self.token.describe(),
            self.http.describe(),
            self.event_store.redacted(),
        )
    }
}

/// A count from 1 to `MAX`.
fn parse_count<const MAX: usize>(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|count| (1..=MAX).contains(count))
        .ok_or_else(|| format!("must be a whole number from 1 to {MAX}"))
}

/// `CUSTOMER_TOP_UPS`: `enabled` or `disabled`.
pub fn parse_top_ups(text: &str) -> Result<bool, String> {
    match text {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        _ => Err("must be enabled or disabled".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let error = Config::try_parse_from(["command-api", "--jwt-secret", "short"])
            .expect_err("a short secret is refused");
        assert!(error.to_string().contains("32 bytes"), "{error}");
        let error = Config::try_parse_from([
            "command-api",
            "--jwt-secret",
            "a-secret-that-is-long-enough-for-hs256-signing",
            "--fraud-decision-timeout-seconds",
            "0",
        ])
        .expect_err("a zero timeout is refused");
        assert!(
            error.to_string().contains("fraud-decision-timeout-seconds"),
            "{error}"
        );
        let error = Config::try_parse_from([
            "command-api",
            "--jwt-secret",
            "a-secret-that-is-long-enough-for-hs256-signing",
            "--customer-top-ups",
            "yes",
        ])
        .expect_err("only enabled or disabled");
        assert!(error.to_string().contains("customer-top-ups"), "{error}");
    }

    #[test]
    fn customer_top_ups_are_off_unless_enabled() {
        // Proves the SPEC §5 default: customers cannot create money unless a sandbox says so.
        let config = Config::try_parse_from([
            "command-api",
            "--jwt-secret",
            "a-secret-that-is-long-enough-for-hs256-signing",
        ])
        .expect("defaults parse");
        assert!(!config.customer_top_ups);
        assert_eq!(config.token.jwt_issuer, "ledger");
        assert_eq!(config.token.jwt_audience, "ledger-api");
        assert_eq!(config.http, HttpLimits::default());
    }
}
