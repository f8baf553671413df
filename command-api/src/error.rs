//! The one error enum of command-api, rendered as problem+json. Each variant's doc names its
//! status; infrastructure failures are opaque 500s whose cause is logged by the middleware.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use infra::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: the request is malformed; `code` says how.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 403: the caller's roles do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// 403 `top_ups_disabled`: a customer deposit while `CUSTOMER_TOP_UPS` is `disabled`.
    #[error("customers cannot deposit here: money enters through an operator (the payment rail)")]
    TopUpsDisabled,
    /// 404: the resource does not exist, or belongs to someone else.
    #[error("{detail}")]
    NotFound { code: &'static str, detail: String },
    /// 422: well-formed but not acceptable (currency mismatch, same account, reused key).
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String },
    /// 500: the event store failed.
    #[error("event store failure while {context}: {message}")]
    Store {
        context: &'static str,
        message: String,
    },
    /// 500: a write kept conflicting beyond the retry bound.
    #[error("writing to {stream} kept conflicting after {attempts} attempts")]
    ConflictsExhausted { stream: String, attempts: u32 },
    /// 500: a stream holds an event this version cannot read.
    #[error("stored event {event_type} v{event_version} of {stream} cannot be read: {problem}")]
    UnreadableEvent {
        stream: String,
        event_type: String,
        event_version: String,
        problem: String,
    },
    /// 500: shared infrastructure (database, configuration).
    #[error(transparent)]
    Infra(#[from] infra::Error),
    /// 500: a database statement failed.
    #[error("database error while {context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Error::BadRequest {
            code,
            detail: detail.into(),
        }
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Unprocessable {
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
        match error {
            Error::BadRequest { code, detail } => {
                Problem::new(StatusCode::BAD_REQUEST, code, detail)
            }
            Error::Forbidden(detail) => Problem::new(StatusCode::FORBIDDEN, "forbidden", detail),
            Error::TopUpsDisabled => Problem::new(
                StatusCode::FORBIDDEN,
                "top_ups_disabled",
                Error::TopUpsDisabled.to_string(),
            ),
            Error::NotFound { code, detail } => Problem::new(StatusCode::NOT_FOUND, code, detail),
            Error::Unprocessable { code, detail } => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
            }
            Error::Infra(infra::Error::Overloaded { what, retry_after }) => Problem::unavailable(
                "overloaded",
                format!("{what} is full; retry with the same Idempotency-Key"),
                retry_after,
            ),
            Error::Infra(infra::Error::CommitFailed(message)) => {
                // The outcome is unknown; a retry with the same key finds it either way.
                Problem::unavailable(
                    "commit_outcome_unknown",
                    "the event store did not confirm the write; retry with the same \
                     Idempotency-Key",
                    std::time::Duration::from_secs(1),
                )
                .with_internal(message)
            }
            internal => Problem::internal(&internal),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
