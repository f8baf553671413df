//! The one error enum of the fraud worker. Nothing here reaches a client except through the
//! rules endpoint (whose only failures are the extractor's 401 and the role check's 403), so the
//! variants name the step that failed for the logs and for a message's retry reason.

/// Failures of the fraud worker. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration, the broker, the listener: shared infrastructure.
    #[error(transparent)]
    Infra(#[from] infra::Error),
    /// Redis refused or failed a command of the velocity counter.
    #[error("Redis error while {context}")]
    Redis {
        context: &'static str,
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something the counter's scripts never return.
    #[error("unexpected Redis reply while {context}: {detail}")]
    RedisReply {
        context: &'static str,
        detail: String,
    },
    /// SQLite refused or failed a statement of the velocity counters (embedded mode); an
    /// overflowing window sum is one.
    #[error("database error while {context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A window's total would leave i64 (embedded mode): the payment is not counted.
    #[error("the velocity window's total overflows 64 bits")]
    Overflow,
    /// A batch of velocity counts failed as a whole (embedded mode): the reason, shared by every
    /// count of the batch; each is retried.
    #[error("counting payments failed: {message}")]
    Batch { message: String },
    /// A step did not finish within its bound.
    #[error("timed out after {timeout_ms} ms while {context}")]
    Timeout {
        context: &'static str,
        timeout_ms: u128,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what we were doing to a Redis error.
pub trait RedisContext<T> {
    fn context(self, context: &'static str) -> Result<T>;
}

impl<T> RedisContext<T> for std::result::Result<T, redis::RedisError> {
    fn context(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Redis { context, source })
    }
}

/// Bounds `future` by `timeout`, naming the step in the error.
pub async fn within<T>(
    timeout: std::time::Duration,
    context: &'static str,
    future: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, future)
        .await
        .map_err(|_| Error::Timeout {
            context,
            timeout_ms: timeout.as_millis(),
        })?
}
