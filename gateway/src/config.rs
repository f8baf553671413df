//! The gateway's configuration, read from the environment (SPEC §6) once, at start. A bad value
//! fails here, naming the variable, never at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infra::telemetry::{LogFormat, redact_url};
use reqwest::Url;
use secrecy::SecretString;

use crate::limiter::LoginLimits;
use crate::routes::{DEFAULT_ROUTES, RoutingTable, Upstream};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "The ledger's edge: identity, tokens, roles and the reverse proxy to the services."
)]
pub struct Config {
    /// PostgreSQL holding the identities (schema `gateway`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/ledger",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Size of the database connection pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=500))]
    pub database_max_connections: u32,

    /// HS256 secret tokens are signed with; at least 32 bytes.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = infra::auth::parse_secret)]
    pub jwt_secret: SecretString,

    /// Lifetime of the tokens `POST /api/v1/auth/token` issues.
    #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub jwt_ttl_seconds: u64,

    /// Where the gateway listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// command-api, which takes the writes.
    #[arg(long, env = "COMMAND_API_URL", default_value = "http://127.0.0.1:8081", value_parser = parse_upstream_url)]
    pub command_api_url: Url,

    /// The projector's query API, which takes the reads.
    #[arg(long, env = "QUERY_API_URL", default_value = "http://127.0.0.1:8082", value_parser = parse_upstream_url)]
    pub query_api_url: Url,

    /// The fraud worker's HTTP API.
    #[arg(long, env = "FRAUD_WORKER_URL", default_value = "http://127.0.0.1:8083", value_parser = parse_upstream_url)]
    pub fraud_worker_url: Url,

    /// The routing table (docs/gateway.md): `[METHODS] PREFIX -> TARGET [roles=ROLES]` entries
    /// separated by `;` or newlines.
    #[arg(long, env = "GATEWAY_ROUTES", default_value = DEFAULT_ROUTES, value_parser = RoutingTable::parse)]
    pub gateway_routes: RoutingTable,

    /// Longest wait for an upstream's response headers before answering 504; also the longest
    /// pause between two chunks of a response body.
    #[arg(long, env = "UPSTREAM_TIMEOUT_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub upstream_timeout_seconds: u64,

    /// Longest wait for a TCP connection to an upstream before answering 503.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub upstream_connect_timeout_ms: u64,

    /// Failed logins allowed per username per window.
    #[arg(long, env = "LOGIN_FAILURES_PER_USERNAME", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub login_failures_per_username: u32,

    /// Failed logins allowed per client address per window.
    #[arg(long, env = "LOGIN_FAILURES_PER_ADDRESS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub login_failures_per_address: u32,

    /// Length of the failed-login window.
    #[arg(long, env = "LOGIN_FAILURE_WINDOW_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub login_failure_window_seconds: u64,

    /// The administrator ensured at every start (with `ADMIN_PASSWORD`); no admin when unset.
    #[arg(long, env = "ADMIN_USERNAME", requires = "admin_password", value_parser = parse_username)]
    pub admin_username: Option<String>,

    /// The administrator's password, 12–128 characters.
    #[arg(long, env = "ADMIN_PASSWORD", hide_env_values = true, requires = "admin_username",
          value_parser = parse_password)]
    pub admin_password: Option<SecretString>,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "json", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,
}

impl Config {
    /// The address of `upstream`.
    pub fn upstream_url(&self, upstream: Upstream) -> &Url {
        match upstream {
            Upstream::CommandApi => &self.command_api_url,
            Upstream::Projector => &self.query_api_url,
            Upstream::FraudWorker => &self.fraud_worker_url,
        }
    }

    pub fn login_limits(&self) -> LoginLimits {
        LoginLimits {
            per_username: self.login_failures_per_username,
            per_address: self.login_failures_per_address,
            window: Duration::from_secs(self.login_failure_window_seconds),
        }
    }

    /// The configuration as it may be logged: passwords in URLs, the secret and the admin's
    /// password are hidden.
    pub fn redacted(&self) -> String {
        format!(
            "database_url={} database_max_connections={} jwt_ttl_seconds={} listen_addr={} \
             command_api_url={} query_api_url={} fraud_worker_url={} gateway_routes=\"{}\" \
             upstream_timeout_seconds={} upstream_connect_timeout_ms={} \
             login_failures_per_username={} login_failures_per_address={} \
             login_failure_window_seconds={} admin_configured={}",
            redact_url(&self.database_url),
            self.database_max_connections,
            self.jwt_ttl_seconds,
            self.listen_addr,
            redact_url(self.command_api_url.as_str()),
            redact_url(self.query_api_url.as_str()),
            redact_url(self.fraud_worker_url.as_str()),
            self.gateway_routes,
            self.upstream_timeout_seconds,
            self.upstream_connect_timeout_ms,
            self.login_failures_per_username,
            self.login_failures_per_address,
            self.login_failure_window_seconds,
            self.admin_username.is_some(),
        )
    }
}

/// An upstream's base URL: `http` or `https`, a host, no path beyond `/`, no query or fragment
/// (the gateway appends the request's path and query unchanged).
fn parse_upstream_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|error| format!("not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("must be an http:// or https:// URL with a host".to_owned());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err("must be a base URL without a path, query or fragment".to_owned());
    }
    Ok(url)
}

fn parse_username(text: &str) -> Result<String, String> {
    crate::identity::validate_username(text).map(|()| text.to_owned())
}

fn parse_password(text: &str) -> Result<SecretString, String> {
    let password = SecretString::from(text.to_owned());
    crate::identity::validate_password(&password).map(|()| password)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-secret-that-is-long-enough-for-hs256-signing";

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut arguments = vec!["gateway", "--jwt-secret", SECRET];
        arguments.extend_from_slice(extra);
        Config::try_parse_from(arguments)
    }

    #[test]
    fn defaults_are_the_specified_ones() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.listen_addr.port(), 8080);
        assert_eq!(config.jwt_ttl_seconds, 900);
        assert_eq!(config.command_api_url.as_str(), "http://127.0.0.1:8081/");
        assert_eq!(config.query_api_url.as_str(), "http://127.0.0.1:8082/");
        assert_eq!(config.fraud_worker_url.as_str(), "http://127.0.0.1:8083/");
        assert_eq!(config.gateway_routes, RoutingTable::default());
        assert_eq!(config.login_limits().per_username, 10);
        assert_eq!(config.login_limits().per_address, 100);
        assert_eq!(config.login_limits().window, Duration::from_secs(60));
        assert!(config.admin_username.is_none());
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let cases: [(&[&str], &str); 8] = [
            (&["--command-api-url", "ftp://x"], "command-api-url"),
            (&["--query-api-url", "http://x/path"], "query-api-url"),
            (&["--gateway-routes", "/x -> nowhere"], "gateway-routes"),
            (&["--jwt-ttl-seconds", "0"], "jwt-ttl-seconds"),
            (
                &[
                    "--admin-username",
                    "Bad Name",
                    "--admin-password",
                    "long enough pass",
                ],
                "admin-username",
            ),
            (
                &["--admin-username", "admin", "--admin-password", "short"],
                "admin-password",
            ),
            (&["--admin-username", "admin"], "admin-password"),
            (
                &["--upstream-timeout-seconds", "0"],
                "upstream-timeout-seconds",
            ),
        ];
        for (arguments, expected) in cases {
            let error = parse(arguments).expect_err("a bad value is refused");
            assert!(
                error.to_string().contains(expected),
                "{arguments:?}: {error}"
            );
        }
        let error = Config::try_parse_from(["gateway", "--jwt-secret", "short"])
            .expect_err("a short secret is refused");
        assert!(error.to_string().contains("32 bytes"), "{error}");
    }

    #[test]
    fn the_logged_configuration_hides_secrets() {
        let config = parse(&[
            "--database-url",
            "postgres://ledger:s3cret@db/ledger",
            "--admin-username",
            "root",
            "--admin-password",
            "a very long admin password",
        ])
        .expect("valid values parse");
        let logged = config.redacted();
        for secret in ["s3cret", "a very long admin password", SECRET] {
            assert!(!logged.contains(secret), "{logged}");
        }
    }
}
