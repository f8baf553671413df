//! The one error enum of the gateway, rendered as problem+json. Each variant's doc names its
//! status; infrastructure failures are opaque 500s whose cause the request middleware logs.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infra::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: the request is malformed; `code` says how.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 401 `invalid_credentials`: unknown user or wrong password (one answer for both).
    #[error("the username or the password is wrong")]
    InvalidCredentials,
    /// 401 `invalid_refresh_token`: unknown, expired or ended session.
    #[error("the refresh token is unknown or has expired; log in again")]
    InvalidRefreshToken,
    /// 403 `user_disabled`: the user's role list is empty.
    #[error("this user is disabled")]
    UserDisabled,
    /// 401 or 403 from the token check at the edge, already rendered by `infra::auth`.
    #[error("{}", .0.detail)]
    Refused(Problem),
    /// 404: the resource or the route does not exist.
    #[error("{detail}")]
    NotFound { code: &'static str, detail: String },
    /// 405: the route exists, not with this method.
    #[error("this route does not accept that method")]
    MethodNotAllowed,
    /// 409 `username_taken`.
    #[error("the username is taken")]
    UsernameTaken,
    /// 408 `request_timeout`: the client did not send its body in time.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 400 `invalid_body`: the client's body broke off or was malformed (a bad chunk).
    #[error("the request body could not be read")]
    UnreadableBody,
    /// 413 `payload_too_large`: the body is over 1 MiB.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// 429 `too_many_login_failures`, with `Retry-After`.
    #[error("too many failed logins; retry in {retry_after_seconds} s")]
    TooManyLoginFailures { retry_after_seconds: u64 },
    /// 429 `too_many_login_attempts`, with `Retry-After`: logins per address, successes too.
    #[error("too many logins from this address; retry in {retry_after_seconds} s")]
    TooManyLoginAttempts { retry_after_seconds: u64 },
    /// 429 `too_many_registrations`, with `Retry-After`.
    #[error("too many registrations from this address; retry in {retry_after_seconds} s")]
    TooManyRegistrations { retry_after_seconds: u64 },
    /// 503 `hashing_busy`, with `Retry-After`: password hashing is saturated.
    #[error("the server is busy checking passwords; retry in a second")]
    HashingBusy,
    /// 502 `bad_gateway`: the upstream answered something unusable or broke the connection.
    /// `detail` (the client's error, URL redacted) is logged, never sent.
    #[error("{upstream} broke the exchange")]
    BadGateway {
        upstream: &'static str,
        detail: String,
    },
    /// 503 `upstream_unavailable`: the upstream refused or did not accept the connection, or
    /// every slot to it stayed busy. `detail` is logged, never sent.
    #[error("{upstream} is unavailable")]
    UpstreamUnavailable {
        upstream: &'static str,
        detail: String,
    },
    /// 504 `upstream_timeout`: the upstream did not answer in time.
    #[error("{upstream} did not answer within {timeout_seconds} s")]
    UpstreamTimeout {
        upstream: &'static str,
        timeout_seconds: u64,
    },
    /// 500: a database statement failed.
    #[error("database error while {context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// 500: password hashing failed (a bad stored hash, or the blocking task died).
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// 500: shared infrastructure (configuration, migrations, signing, the listener).
    #[error(transparent)]
    Infra(#[from] infra::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Error::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Error::NotFound {
            code,
            detail: detail.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::Infra(infra::Error::Config(message.into()))
    }
}

impl From<crate::limiter::Refusal> for Error {
    fn from(refusal: crate::limiter::Refusal) -> Self {
        use crate::limiter::Refusal;
        match refusal {
            Refusal::LoginFailures {
                retry_after_seconds,
            } => Error::TooManyLoginFailures {
                retry_after_seconds,
            },
            Refusal::LoginAttempts {
                retry_after_seconds,
            } => Error::TooManyLoginAttempts {
                retry_after_seconds,
            },
            Refusal::Registrations {
                retry_after_seconds,
            } => Error::TooManyRegistrations {
                retry_after_seconds,
            },
        }
    }
}

impl From<Problem> for Error {
    fn from(problem: Problem) -> Self {
        Error::Refused(problem)
    }
}

/// Attaches what we were doing to a database error.
pub trait DatabaseContext<T> {
    fn context(self, context: &'static str) -> Result<T>;
}

impl<T> DatabaseContext<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Database { context, source })
    }
}

impl From<Error> for Problem {
    fn from(error: Error) -> Problem {
        let detail = error.to_string();
        match error {
            Error::BadRequest { code, detail } => Problem::bad_request(code, detail),
            Error::InvalidCredentials => {
                Problem::new(StatusCode::UNAUTHORIZED, "invalid_credentials", detail)
            }
            Error::InvalidRefreshToken => {
                Problem::new(StatusCode::UNAUTHORIZED, "invalid_refresh_token", detail)
            }
            Error::UserDisabled => Problem::new(StatusCode::FORBIDDEN, "user_disabled", detail),
            Error::RequestTimeout => infra::http::request_timeout(),
            Error::UnreadableBody => Problem::bad_request("invalid_body", detail),
            Error::Refused(problem) => problem,
            Error::NotFound { code, detail } => Problem::new(StatusCode::NOT_FOUND, code, detail),
            Error::MethodNotAllowed => {
                Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", detail)
            }
            Error::UsernameTaken => Problem::new(StatusCode::CONFLICT, "username_taken", detail),
            Error::PayloadTooLarge => infra::http::payload_too_large(),
            Error::TooManyLoginFailures {
                retry_after_seconds,
            } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_login_failures",
                detail,
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds)),
            Error::TooManyLoginAttempts {
                retry_after_seconds,
            } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_login_attempts",
                detail,
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds)),
            Error::TooManyRegistrations {
                retry_after_seconds,
            } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_registrations",
                detail,
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds)),
            Error::HashingBusy => {
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "hashing_busy", detail)
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Error::BadGateway { .. } => {
                Problem::new(StatusCode::BAD_GATEWAY, "bad_gateway", detail)
            }
            Error::UpstreamUnavailable { .. } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                detail,
            ),
            Error::UpstreamTimeout { .. } => {
                Problem::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", detail)
            }
            internal @ (Error::Database { .. } | Error::Hashing(_) | Error::Infra(_)) => {
                Problem::internal(&internal)
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
