//! The one error enum of the projector, rendered as problem+json. Infrastructure failures are
//! opaque 500s whose cause the request middleware logs.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use infra::problem::Problem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: a malformed query, cursor, page size or position header; `code` says which.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: String },
    /// 403: the caller's roles do not allow this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the resource does not exist, or belongs to someone else.
    #[error("{0}")]
    NotFound(String),
    /// 400 `position_unreachable`: the position is beyond the log's head, so no projection
    /// will ever reach it; refused at once instead of waited for.
    #[error(
        "X-Ledger-Position {wanted} is beyond the head of the log: no write of this ledger returned it"
    )]
    PositionUnreachable { wanted: String },
    /// 503 `too_many_waiting_reads` (with `Retry-After`): the bound on reads waiting for a
    /// position is reached.
    #[error("too many reads are waiting for the read side; retry shortly")]
    TooManyWaitingReads,
    /// 503: the read side did not reach the position the caller asked for in time.
    #[error("the read side has not reached position {wanted} yet (it is at {reached})")]
    PositionNotReached { wanted: String, reached: String },
    /// 500: a stored event cannot be projected (unreadable, or it breaks the domain's rules).
    #[error("event at {position} of {stream} cannot be projected: {problem}")]
    Unprojectable {
        position: String,
        stream: String,
        problem: String,
    },
    /// 500: a read-model row cannot be read back.
    #[error("read model {table} holds an unreadable row: {problem}")]
    CorruptRow {
        table: &'static str,
        problem: String,
    },
    /// Operator errors of the rebuild and verify jobs (a rebuild already running, an unknown
    /// projection).
    #[error("{0}")]
    Job(String),
    /// 500: shared infrastructure: a database statement (`infra::error::DatabaseContext`
    /// names the step), configuration.
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
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Error::BadRequest { code, detail } => Problem::bad_request(code, detail),
            Error::Forbidden(detail) => Problem::new(StatusCode::FORBIDDEN, "forbidden", detail),
            Error::NotFound(detail) => Problem::not_found(detail),
            Error::PositionUnreachable { .. } => {
                Problem::bad_request("position_unreachable", self.to_string())
            }
            Error::TooManyWaitingReads => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_waiting_reads",
                self.to_string(),
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            Error::PositionNotReached { .. } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "position_not_reached",
                self.to_string(),
            )
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            other => Problem::internal(&other),
        }
        .into_response()
    }
}
