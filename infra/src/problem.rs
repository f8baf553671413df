//! `application/problem+json` (RFC 9457) responses with a stable machine `code`.
//!
//! Every service renders its errors through [`Problem`]. Internal errors answer an opaque 500 and
//! carry the real error in a response extension ([`InternalError`]) that the request middleware
//! logs, so rendering has no side effects.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A problem document, ready to render.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// The stable machine code, e.g. `idempotency_key_reused`.
    pub code: &'static str,
    pub detail: String,
    /// Extra response headers (`WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The real cause of a 500, for the logs only.
    pub internal: Option<String>,
}

/// The body, as RFC 9457 names its members.
#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
}

/// An error and its causes on one line, `outer: inner: root`, for logs and retry reasons.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

/// The real error behind an opaque 500, attached to the response for the logging middleware.
#[derive(Debug, Clone)]
pub struct InternalError(pub String);

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            headers: Vec::new(),
            internal: None,
        }
    }

    /// An opaque 500 that logs `error` with its cause chain.
    pub fn internal(error: &(dyn std::error::Error + 'static)) -> Self {
        Problem {
            internal: Some(cause_chain(error)),
            ..Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the server failed to handle the request; it has been logged",
            )
        }
    }

    /// Attaches the real cause for the logs (the answer stays as it is).
    pub fn with_internal(mut self, cause: impl Into<String>) -> Self {
        self.internal = Some(cause.into());
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 400 `invalid_request` with a detail.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 503 with `Retry-After`: a bounded queue is full or a dependency failed with an unknown
    /// outcome; the same request again (with its idempotency key) is safe.
    pub fn unavailable(
        code: &'static str,
        detail: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        let seconds = retry_after.as_secs().max(1).to_string();
        let problem = Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail);
        match HeaderValue::from_str(&seconds) {
            Ok(value) => problem.with_header(header::RETRY_AFTER, value),
            Err(_) => problem,
        }
    }

    /// 404 `not_found`: also the answer for other people's resources.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = ProblemBody {
            kind: format!("urn:ledger:problem:{}", self.code),
            title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            json,
        )
            .into_response();
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        if let Some(internal) = self.internal {
            response.extensions_mut().insert(InternalError(internal));
        }
        response
    }
}
