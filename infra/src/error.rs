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
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
    #[error("RabbitMQ error while {context}: {message}")]
    Broker {
        context: &'static str,
        message: String,
    },
    #[error("stored event at position {position} is malformed: {problem}")]
    MalformedLogRow { position: i64, problem: String },
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
