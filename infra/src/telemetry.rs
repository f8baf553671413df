//! Logging and metrics set-up: JSON (or pretty) logs through `tracing`, filtered by `RUST_LOG`,
//! and one process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::error::{Error, Result};

/// `LOG_FORMAT`: `json` for machines (the default), `pretty` for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

impl LogFormat {
    /// For a clap `value_parser`.
    pub fn parse_arg(text: &str) -> std::result::Result<Self, String> {
        LogFormat::parse(text).map_err(|error| error.to_string())
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            other => Err(Error::Config(format!(
                "LOG_FORMAT must be json or pretty, not {other:?}"
            ))),
        }
    }
}

/// Installs the global subscriber. Safe to call more than once (tests): later calls do nothing.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _already_set = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer()).try_init(),
    };
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The bounds of every duration histogram (`*_seconds`): 0.5 ms to 10 s, about 2–2.5× apart,
/// so one transfer's stages (milliseconds) and a stalled dependency (seconds) both show.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The bounds of the histograms that count things per batch (events per group commit, counts
/// per velocity batch): powers of two up to the largest batch.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The histograms that are sizes, not durations.
const SIZE_HISTOGRAMS: &[&str] = &["event_log_batch_events", "fraud_velocity_batch_size"];

/// A recorder that renders every histogram as a Prometheus histogram (`_bucket{le=…}`, `_sum`,
/// `_count`), which an operator can aggregate across instances and over any range; without
/// buckets the exporter renders rolling summaries, which cannot be.
fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new().set_buckets(SECONDS_BUCKETS);
    for name in SIZE_HISTOGRAMS {
        builder = builder.and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), SIZE_BUCKETS)
        });
    }
    // Only empty bounds are refused, and these are constants.
    builder.unwrap_or_else(|_| PrometheusBuilder::new())
}

/// Installs the process-wide Prometheus recorder once; later calls reuse it.
pub fn init_metrics() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        builder().install_recorder().unwrap_or_else(|_| {
            // Another recorder is already installed in this process (possible only in tests
            // that embed several services); keep a detached one so rendering still works.
            builder().build_recorder().handle()
        })
    })
}

/// The current metrics in the Prometheus text format.
pub fn render_metrics() -> String {
    init_metrics().render()
}

/// Hides the password of a connection URL (database, broker, cache) before it is logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Query parameters whose values are secrets wherever they appear: a client that puts a
/// password or a token in a URL must not get it written to the logs too.
const SECRET_QUERY_KEYS: [&str; 9] = [
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "access_token",
    "refresh_token",
    "api_key",
    "apikey",
];

/// Hides the values of secret-looking query parameters (`password=***`) in a URL, a path with
/// a query string, or text that quotes one (an HTTP client's error message), and a connection
/// URL's password ([`redact_url`]). For anything about to be logged that carries a URL.
pub fn redact_secrets(text: &str) -> String {
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(index) = rest.find(['?', '&']) {
        let (before, after) = rest.split_at(index + 1);
        redacted.push_str(before);
        let end = after
            .find(|c: char| c == '&' || c == '#' || c == ')' || c.is_whitespace())
            .unwrap_or(after.len());
        let (pair, remainder) = after.split_at(end);
        match pair.split_once('=') {
            Some((key, _value)) if is_secret_key(key) => {
                redacted.push_str(key);
                redacted.push_str("=***");
            }
            _ => redacted.push_str(pair),
        }
        rest = remainder;
    }
    redacted.push_str(rest);
    redact_url(&redacted)
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_QUERY_KEYS
        .iter()
        .any(|secret| key == *secret || key.ends_with(&format!("_{secret}")))
}

/// Resolves on Ctrl-C or SIGTERM: the start of a graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("saga_batch_seconds").record(0.003);
            metrics::histogram!("event_log_batch_events").record(100.0);
        });
        let text = handle.render();
        assert!(
            text.contains("# TYPE saga_batch_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("saga_batch_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("saga_batch_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("event_log_batch_events_bucket{le=\"64\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("event_log_batch_events_bucket{le=\"128\"} 1"),
            "{text}"
        );
        assert!(!text.contains("quantile="), "{text}");
    }

    #[test]
    fn secrets_in_query_strings_are_hidden() {
        // Proves a password or token sent in a query string never reaches a log line.
        assert_eq!(
            redact_secrets("/api/v1/accounts?password=hunter2&page_size=5"),
            "/api/v1/accounts?password=***&page_size=5"
        );
        assert_eq!(
            redact_secrets(
                "error sending request for url (http://127.0.0.1:8081/x?a=1&Access_Token=abc#f)"
            ),
            "error sending request for url (http://127.0.0.1:8081/x?a=1&Access_Token=***#f)"
        );
        assert_eq!(redact_secrets("/plain/path"), "/plain/path");
        assert_eq!(
            redact_secrets("/x?user_password=p&token"),
            "/x?user_password=***&token"
        );
    }

    #[test]
    fn passwords_are_hidden_in_logged_urls() {
        assert_eq!(
            redact_url("postgres://ledger:s3cret@db:5432/ledger"),
            "postgres://ledger:***@db:5432/ledger"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@localhost/ledger"),
            "postgres://postgres@localhost/ledger"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
