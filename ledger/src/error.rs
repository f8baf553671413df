//! The one error enum of the CLI: why a command could not run (exit code 3). A check that ran
//! and found problems is not an error; it exits 1.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Projector(projector::Error),
    #[error(transparent)]
    Infra(#[from] infra::Error),
    #[error("{0}")]
    Usage(String),
    /// What the command needs is held by another process (the data directory's lock).
    #[error("{0}")]
    Busy(String),
    /// A part of `ledger serve` could not start (its error, as that part words it).
    #[error("{0}")]
    Start(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
