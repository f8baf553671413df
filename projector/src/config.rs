//! The projector's configuration, read from the environment (SPEC §6) once, at start. A bad
//! value fails here, naming the variable, never at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infra::auth::TokenConfig;
use infra::server::HttpLimits;
use infra::telemetry::{LogFormat, redact_url};

use infra::follow::FollowSettings;

use crate::runner::ProjectorSettings;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "projector",
    version,
    about = "The ledger's read side: read models, cache and the query API."
)]
pub struct Config {
    /// PostgreSQL holding the event log (command-api's `command_api.events`, read only).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/ledger?sslmode=disable"
    )]
    pub database_url: String,

    /// PostgreSQL holding the read models (schema `projector`); `DATABASE_URL` when unset.
    #[arg(long, env = "READ_DATABASE_URL")]
    pub read_database_url: Option<String>,

    /// The event log's table, schema-qualified.
    #[arg(long, env = "EVENTS_TABLE", default_value = "command_api.events", value_parser = parse_table)]
    pub events_table: String,

    /// Redis, for the transaction cache (optional at run time: down means degraded).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Prefix of every cache key.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "ledger")]
    pub redis_key_prefix: String,

    /// Seconds a cached transaction lives.
    #[arg(long, env = "CACHE_TTL_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub cache_ttl_seconds: u64,

    /// Where the query API listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8082")]
    pub listen_addr: SocketAddr,

    /// The token secret, issuer and audience shared with the gateway.
    #[command(flatten)]
    pub token: TokenConfig,

    /// The listener's header, body and idle timeouts and its connection bound.
    #[command(flatten)]
    pub http: HttpLimits,

    /// Which store holds the event log (`EVENT_STORE=postgres|kurrentdb`, `KURRENTDB_URL`).
    #[command(flatten)]
    pub event_store: infra::eventlog::choice::EventStoreConfig,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,

    /// Connections queries read with (read models and the event log's audit trail each).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(2..=500))]
    pub database_max_connections: u32,

    /// Connections the projector's batches and lag reporter use (read models and event log
    /// each): apart from the queries', so a burst of reads never stalls the projections.
    #[arg(long, env = "BACKGROUND_MAX_CONNECTIONS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(2..=100))]
    pub background_max_connections: u32,

    /// Events the projector reads per batch; each projection applies them in one transaction.
    #[arg(long, env = "PROJECTOR_BATCH_SIZE", default_value_t = crate::runner::BATCH_SIZE_DEFAULT,
          value_parser = clap::value_parser!(usize))]
    pub projector_batch_size: usize,

    /// Milliseconds an idle projector waits without a wake-up (a `NOTIFY` from command-api)
    /// before looking at the log anyway.
    #[arg(long, env = "LOG_POLL_INTERVAL_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub log_poll_interval_ms: u64,

    /// Reads waiting at once for the read side to reach their `X-Ledger-Position`; further
    /// ones are answered 503 at once.
    #[arg(long, env = "POSITION_WAITERS_MAX", default_value_t = crate::http::positions::WAITERS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub position_waiters_max: u32,
}

/// Checks a `schema.table` name, since it is spliced into SQL.
pub fn parse_table(text: &str) -> Result<String, String> {
    let valid = |part: &str| infra::db::validate_schema(part).is_ok();
    match text.split_once('.') {
        Some((schema, table)) if valid(schema) && valid(table) => Ok(text.to_owned()),
        _ => Err("must be a schema-qualified table such as command_api.events".to_owned()),
    }
}

impl Config {
    pub fn read_database_url(&self) -> &str {
        self.read_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }

    pub fn projector_settings(&self) -> ProjectorSettings {
        ProjectorSettings {
            batch_size: self.projector_batch_size.clamp(1, 100_000),
        }
    }

    pub fn follow_settings(&self) -> FollowSettings {
        FollowSettings {
            poll_interval: Duration::from_millis(self.log_poll_interval_ms),
        }
    }

    /// The configuration as it may be logged: passwords and the secret are hidden.
    pub fn redacted(&self) -> String {
        format!(
            "database_url={} read_database_url={} events_table={} redis_url={} redis_key_prefix={} \
             cache_ttl_seconds={} listen_addr={} database_max_connections={} \
             background_max_connections={} projector_batch_size={} log_poll_interval_ms={} \
             position_waiters_max={} {} {} {}",
            redact_url(&self.database_url),
            redact_url(self.read_database_url()),
            self.events_table,
            redact_url(&self.redis_url),
            self.redis_key_prefix,
            self.cache_ttl_seconds,
            self.listen_addr,
            self.database_max_connections,
            self.background_max_connections,
            self.projector_batch_size,
            self.log_poll_interval_ms,
            self.position_waiters_max,
            self.token.describe(),
            self.http.describe(),
            self.event_store.redacted(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-secret-that-is-long-enough-for-hs256-signing";

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let error = Config::try_parse_from(["projector", "--jwt-secret", "short"])
            .expect_err("a short secret is refused");
        assert!(error.to_string().contains("32 bytes"), "{error}");
        let error = Config::try_parse_from([
            "projector",
            "--jwt-secret",
            SECRET,
            "--events-table",
            "events; DROP TABLE x",
        ])
        .expect_err("an unqualified or odd table is refused");
        assert!(error.to_string().contains("events-table"), "{error}");
        let error = Config::try_parse_from([
            "projector",
            "--jwt-secret",
            SECRET,
            "--cache-ttl-seconds",
            "0",
        ])
        .expect_err("a zero TTL is refused");
        assert!(error.to_string().contains("cache-ttl-seconds"), "{error}");
    }

    #[test]
    fn the_read_database_defaults_to_the_event_database() {
        let config = Config::try_parse_from(["projector", "--jwt-secret", SECRET])
            .expect("defaults are valid");
        assert_eq!(config.read_database_url(), config.database_url);
    }
}
