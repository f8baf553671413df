//! The one error enum of the infrastructure crate.

/// Failures of the shared infrastructure. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("database error while {context}")]
    Database {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations of schema {schema} failed")]
    Migration {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("RabbitMQ error while {context}: {message}")]
    Broker {
        context: &'static str,
        message: String,
    },
    /// A bus consumer's handler could not handle a message now (it is delivered again later),
    /// or a message could not be handed to its consumer.
    #[error("bus error while {context}: {message}")]
    Bus {
        context: &'static str,
        message: String,
    },
    #[error("stored event at position {position} is malformed: {problem}")]
    MalformedLogRow { position: i64, problem: String },
    /// A bounded queue stayed full past its deadline: refuse, and say when to come back.
    #[error("{what} is full; try again in {} s", retry_after.as_secs().max(1))]
    Overloaded {
        what: &'static str,
        retry_after: std::time::Duration,
    },
    /// An event log write failed; whether it committed is unknown (a retry is safe).
    #[error("event log write failed: {0}")]
    CommitFailed(String),
    /// KurrentDB answered a read with an error, or with a record the ledger cannot decode.
    #[error("KurrentDB: {0}")]
    EventStore(String),
    /// The database would not make commits durable (`synchronous_commit = off`).
    #[error("PostgreSQL runs with synchronous_commit = {0}: a 202 would not be durable")]
    NotDurable(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what we were doing to a database error.
pub trait DatabaseContext<T> {
    fn context(self, context: &'static str) -> Result<T>;
}

impl<T> DatabaseContext<T> for std::result::Result<T, sqlx::Error> {
    fn context(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Database { context, source })
    }
}
