//! The HTTP edge shared by every service: a JSON body extractor whose every rejection is
//! problem+json, the correlation-id middleware (accept or create, echo, log, measure), the
//! `/health` report and the `/metrics` endpoint.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use uuid::Uuid;

use crate::problem::{InternalError, Problem};

/// Largest request body any service accepts (SPEC §5: 1 MiB).
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// The correlation header of SPEC §5.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Longest accepted caller-supplied correlation id.
const CORRELATION_ID_CHARS_MAX: usize = 128;

/// A JSON request body. Bad JSON, unknown fields (the target types deny them), a wrong content
/// type and oversized bodies all answer problem+json.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || mime.to_ascii_lowercase().ends_with("+json")
            });
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    payload_too_large()
                } else if crate::server::is_body_timeout(&rejection) {
                    request_timeout()
                } else {
                    // The reader's own words name hyper's internals; the caller needs only this.
                    Problem::bad_request("invalid_body", "the request body could not be read")
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserialises a JSON body, naming what was wrong with it.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(bytes).map_err(|error| {
        let message = error.to_string();
        let code = if message.starts_with("unknown field") {
            "unknown_field"
        } else {
            "invalid_body"
        };
        Problem::bad_request(code, format!("the JSON body is invalid: {message}"))
    })
}

/// 413 for bodies over [`BODY_BYTES_MAX`].
pub fn payload_too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request bodies are limited to {BODY_BYTES_MAX} bytes"),
    )
}

/// 408 for a body that did not arrive within the listener's body timeout (`crate::server`).
pub fn request_timeout() -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request body did not arrive in time",
    )
}

/// The request's correlation id, in the request extensions for handlers to copy into event
/// metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationId(pub String);

/// A caller's correlation id is kept if it is 1–128 characters of `[A-Za-z0-9._-]`.
pub fn valid_correlation_id(text: &str) -> bool {
    (1..=CORRELATION_ID_CHARS_MAX).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn correlation_id_of(headers: &HeaderMap) -> String {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|text| valid_correlation_id(text))
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned)
}

/// Middleware for every route: takes or creates the correlation id, runs the request inside a
/// span that carries it (so every log line of the request has it), echoes it, logs one line per
/// request at `info` (and the hidden cause of any 500 at `error`), and records request metrics.
pub async fn observe_requests(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let correlation_id = correlation_id_of(request.headers());
    request
        .extensions_mut()
        .insert(CorrelationId(correlation_id.clone()));
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        correlation_id = %correlation_id,
        method = %method,
        route = %route,
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    let elapsed = started.elapsed();
    span.in_scope(|| {
        if let Some(InternalError(cause)) = response.extensions().get::<InternalError>() {
            tracing::error!(error.cause_chain = %cause, "request failed");
        }
        tracing::info!(
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "request served"
        );
    });
    let labels = [
        ("method", method.to_string()),
        ("route", route),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels[..2])
        .record(elapsed.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

/// A dependency's state in `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Ok,
    Down,
}

/// The `/health` answer of SPEC §5: `ok` when every dependency is up, `degraded` (still 200)
/// when only optional ones are down, 503 when a required one is down.
#[derive(Debug, Default)]
pub struct HealthReport {
    checks: BTreeMap<&'static str, CheckStatus>,
    required_down: bool,
    optional_down: bool,
}

impl HealthReport {
    pub fn required(mut self, name: &'static str, up: bool) -> Self {
        self.required_down |= !up;
        self.checks.insert(
            name,
            if up {
                CheckStatus::Ok
            } else {
                CheckStatus::Down
            },
        );
        self
    }

    pub fn optional(mut self, name: &'static str, up: bool) -> Self {
        self.optional_down |= !up;
        self.checks.insert(
            name,
            if up {
                CheckStatus::Ok
            } else {
                CheckStatus::Down
            },
        );
        self
    }
}

impl IntoResponse for HealthReport {
    fn into_response(self) -> Response {
        let (status, word) = match (self.required_down, self.optional_down) {
            (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "down"),
            (false, true) => (StatusCode::OK, "degraded"),
            (false, false) => (StatusCode::OK, "ok"),
        };
        let body = serde_json::json!({ "status": word, "checks": self.checks });
        (status, axum::Json(body)).into_response()
    }
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics_endpoint() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}

/// Longest plain-text error body [`problem_json_everywhere`] turns into a problem's detail.
const PLAIN_ERROR_BYTES_MAX: usize = 1024;

/// Makes every error answer problem+json (SPEC §5). The routes' own errors already are; what is
/// left are axum's extractor rejections (a path that is not UTF-8 once decoded, a query string
/// that does not parse), which answer `text/plain`. Their text becomes the problem's detail,
/// with a code by status.
pub async fn problem_json_everywhere(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_none_or(|value| value.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, PLAIN_ERROR_BYTES_MAX)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        _ if status.is_server_error() => "internal_error",
        _ => "invalid_request",
    };
    let detail = if text.is_empty() || status.is_server_error() {
        status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_owned()
    } else {
        text
    };
    let mut problem = Problem::new(status, code, detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().append(name, value.clone());
        }
    }
    problem
}

/// The layers every service's router gets, innermost first: every error as problem+json,
/// request observation (correlation id, log line, metrics), panics turned into an opaque
/// problem+json 500, the 1 MiB body limit. Add them after the routes and fallbacks, before
/// `with_state`.
pub fn service_layers<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
) -> axum::Router<S> {
    router
        .layer(axum::middleware::from_fn(problem_json_everywhere))
        .layer(axum::middleware::from_fn(observe_requests))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_panic| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the server failed to handle the request; it has been logged",
            )
            .into_response()
        }))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
}

/// The fallback for routes that exist but not with this method: 405 problem+json.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

/// The fallback for unknown paths: 404 problem+json.
pub async fn not_found() -> Problem {
    Problem::not_found("no such route")
}

/// How long a public `/health` answer is reused: a second. `/health` is public and
/// unauthenticated and asks every dependency; reused, a flood of it costs at most one round of
/// checks a second, and a load balancer probing every few seconds still sees fresh news.
pub const HEALTH_REUSED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The last round of a `/health`'s checks, reused for [`HEALTH_REUSED_FOR`]: one round at a
/// time, and concurrent callers share it.
pub struct HealthRounds<T> {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, T)>>,
}

impl<T> Default for HealthRounds<T> {
    fn default() -> Self {
        HealthRounds {
            last: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T: Clone> HealthRounds<T> {
    /// The last round's result if it started less than [`HEALTH_REUSED_FOR`] ago, else the
    /// result of a new `round`.
    pub async fn get<F: std::future::Future<Output = T>>(&self, round: impl FnOnce() -> F) -> T {
        let mut last = self.last.lock().await;
        if let Some((started, result)) = last.as_ref()
            && started.elapsed() < HEALTH_REUSED_FOR
        {
            return result.clone();
        }
        let started = tokio::time::Instant::now();
        let result = round().await;
        *last = Some((started, result.clone()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_validated() {
        assert!(valid_correlation_id("abc-123_X.y"));
        assert!(valid_correlation_id(&"a".repeat(128)));
        assert!(!valid_correlation_id(&"a".repeat(129)));
        assert!(!valid_correlation_id(""));
        assert!(!valid_correlation_id("has space"));
        assert!(!valid_correlation_id("semi;colon"));
    }

    #[test]
    fn health_is_degraded_only_for_optional_dependencies() {
        let degraded = HealthReport::default()
            .required("database", true)
            .optional("cache", false)
            .into_response();
        assert_eq!(degraded.status(), StatusCode::OK);
        let down = HealthReport::default()
            .required("database", false)
            .optional("cache", true)
            .into_response();
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
