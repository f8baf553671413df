//! The gateway's configuration, read from the environment (SPEC §6) once, at start. A bad value
//! fails here, naming the variable, never at the first request.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use infra::auth::{ACCESS_TOKEN_TTL_SECONDS_MAX, TokenConfig};
use infra::server::HttpLimits;
use infra::telemetry::{LogFormat, redact_url};
use reqwest::Url;
use secrecy::SecretString;

use crate::clients::TrustedProxies;
use crate::limiter::LoginLimits;
use crate::routes::{DEFAULT_ROUTES, RoutingTable, Upstream};

/// Access tokens live 30 s: with the verifiers' 15 s leeway a role change reaches every route,
/// the services behind the gateway included, within 45 s (SPEC §5 asks for 60). Clients renew
/// them with their refresh token, which costs a database read and no password hashing.
pub const ACCESS_TOKEN_TTL_SECONDS: u64 = 30;

/// Shortest access token lifetime: below it clients spend more time refreshing than working.
const ACCESS_TOKEN_TTL_SECONDS_MIN: u64 = 5;

/// Successful or not, 300 logins per address per window (5 a second): a busy office behind one
/// address logs in far less often, since clients refresh instead; a loop that burns argon2 time
/// hits it within a minute.
pub const LOGIN_ATTEMPTS_PER_ADDRESS: u32 = 300;

/// 20 registrations per address per window (an hour): a family or a small office signing up;
/// not a script minting accounts.
pub const REGISTRATIONS_PER_ADDRESS: u32 = 20;

/// The registration window: an hour, so a patient script gets 480 accounts a day per address,
/// not 28,800.
pub const REGISTRATION_WINDOW_SECONDS: u64 = 3_600;

/// The gateway forgets an idle upstream connection after 60 s: sooner than the services close
/// one (`HTTP_IDLE_TIMEOUT_SECONDS`, 90), so it never sends a request down a connection the
/// service is closing at that moment.
pub const UPSTREAM_IDLE_TIMEOUT_SECONDS: u64 = 60;

/// Requests in flight to one upstream at once, so connections per upstream: 256. The services'
/// `HTTP_MAX_CONNECTIONS` (1,024) holds four gateway instances at this bound; beyond it a
/// request waits up to `UPSTREAM_CONNECT_TIMEOUT_MS` for a slot, then gets 503.
pub const UPSTREAM_CONNECTIONS_MAX: u32 = 256;

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
        default_value = "postgres://postgres@localhost:5432/ledger?sslmode=disable",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Size of the database connection pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=500))]
    pub database_max_connections: u32,

    /// The token secret, issuer and audience, shared with the services.
    #[command(flatten)]
    pub token: TokenConfig,

    /// How long a login lasts: the lifetime of the refresh token `POST /api/v1/auth/token`
    /// issues, which renews access tokens until then.
    #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub jwt_ttl_seconds: u64,

    /// Lifetime of an access token; at most 45 s, so that a role change reaches every route
    /// within 60 s.
    #[arg(long, env = "ACCESS_TOKEN_TTL_SECONDS", default_value_t = ACCESS_TOKEN_TTL_SECONDS,
          value_parser = clap::value_parser!(u64)
              .range(ACCESS_TOKEN_TTL_SECONDS_MIN..=ACCESS_TOKEN_TTL_SECONDS_MAX))]
    pub access_token_ttl_seconds: u64,

    /// Where the gateway listens: the public API.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Where the gateway serves `/metrics`, off the public listener.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9080")]
    pub metrics_addr: SocketAddr,

    /// The public listener's header, body and idle timeouts and its connection bound.
    #[command(flatten)]
    pub http: HttpLimits,

    /// Proxies (addresses or CIDR ranges, comma separated) whose `X-Forwarded-For` names the
    /// client; from anyone else the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "", value_parser = TrustedProxies::parse)]
    pub trusted_proxies: TrustedProxies,

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

    /// Longest wait for a TCP connection to an upstream (or a free slot to it) before
    /// answering 503.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub upstream_connect_timeout_ms: u64,

    /// Seconds an idle upstream connection is kept for reuse; keep it below the services'
    /// `HTTP_IDLE_TIMEOUT_SECONDS`.
    #[arg(long, env = "UPSTREAM_IDLE_TIMEOUT_SECONDS", default_value_t = UPSTREAM_IDLE_TIMEOUT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub upstream_idle_timeout_seconds: u64,

    /// Requests in flight to one upstream at once.
    #[arg(long, env = "UPSTREAM_CONNECTIONS_MAX", default_value_t = UPSTREAM_CONNECTIONS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub upstream_connections_max: u32,

    /// Failed logins allowed per username from one client address per window: past it, that
    /// address (only) is refused for that username until the window ends.
    #[arg(long, env = "LOGIN_FAILURES_PER_USERNAME", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub login_failures_per_username: u32,

    /// Failed logins allowed per client address per window.
    #[arg(long, env = "LOGIN_FAILURES_PER_ADDRESS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub login_failures_per_address: u32,

    /// Logins allowed per client address per window, successful or not.
    #[arg(long, env = "LOGIN_ATTEMPTS_PER_ADDRESS", default_value_t = LOGIN_ATTEMPTS_PER_ADDRESS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub login_attempts_per_address: u32,

    /// Length of the login windows (failures and attempts).
    #[arg(long, env = "LOGIN_FAILURE_WINDOW_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub login_failure_window_seconds: u64,

    /// Registrations allowed per client address per registration window.
    #[arg(long, env = "REGISTRATIONS_PER_ADDRESS", default_value_t = REGISTRATIONS_PER_ADDRESS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub registrations_per_address: u32,

    /// Length of the registration window.
    #[arg(long, env = "REGISTRATION_WINDOW_SECONDS", default_value_t = REGISTRATION_WINDOW_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub registration_window_seconds: u64,

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
            failures_per_username: self.login_failures_per_username,
            failures_per_address: self.login_failures_per_address,
            attempts_per_address: self.login_attempts_per_address,
            window: Duration::from_secs(self.login_failure_window_seconds),
            registrations_per_address: self.registrations_per_address,
            registration_window: Duration::from_secs(self.registration_window_seconds),
        }
    }

    /// The configuration as it may be logged: passwords in URLs, the secret and the admin's
    /// password are hidden.
    pub fn redacted(&self) -> String {
        format!(
            "database_url={} database_max_connections={} jwt_ttl_seconds={} \
             access_token_ttl_seconds={} {} listen_addr={} metrics_addr={} {} trusted_proxies={} \
             command_api_url={} query_api_url={} fraud_worker_url={} gateway_routes=\"{}\" \
             upstream_timeout_seconds={} upstream_connect_timeout_ms={} \
             upstream_idle_timeout_seconds={} upstream_connections_max={} \
             login_failures_per_username={} login_failures_per_address={} \
             login_attempts_per_address={} login_failure_window_seconds={} \
             registrations_per_address={} registration_window_seconds={} admin_configured={}",
            redact_url(&self.database_url),
            self.database_max_connections,
            self.jwt_ttl_seconds,
            self.access_token_ttl_seconds,
            self.token.describe(),
            self.listen_addr,
            self.metrics_addr,
            self.http.describe(),
            self.trusted_proxies,
            redact_url(self.command_api_url.as_str()),
            redact_url(self.query_api_url.as_str()),
            redact_url(self.fraud_worker_url.as_str()),
            self.gateway_routes,
            self.upstream_timeout_seconds,
            self.upstream_connect_timeout_ms,
            self.upstream_idle_timeout_seconds,
            self.upstream_connections_max,
            self.login_failures_per_username,
            self.login_failures_per_address,
            self.login_attempts_per_address,
            self.login_failure_window_seconds,
            self.registrations_per_address,
            self.registration_window_seconds,
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
        assert_eq!(config.login_limits().failures_per_username, 10);
        assert_eq!(config.login_limits().failures_per_address, 100);
        assert_eq!(config.login_limits().window, Duration::from_secs(60));
        assert!(config.admin_username.is_none());
        assert_eq!(config.metrics_addr.to_string(), "127.0.0.1:9080");
        assert_eq!(config.access_token_ttl_seconds, 30);
        assert_eq!(config.token.jwt_issuer, "ledger");
        assert_eq!(config.token.jwt_audience, "ledger-api");
        assert_eq!(config.trusted_proxies, TrustedProxies::default());
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        let cases: [(&[&str], &str); 10] = [
            (
                &["--access-token-ttl-seconds", "46"],
                "access-token-ttl-seconds",
            ),
            (&["--trusted-proxies", "10.0.0.0/33"], "trusted-proxies"),
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
        let repetitive = "ab".repeat(20);
        let error = Config::try_parse_from(["gateway", "--jwt-secret", repetitive.as_str()])
            .expect_err("a secret of two distinct bytes is refused");
        assert!(error.to_string().contains("distinct"), "{error}");
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
