//! The one interface between the measurements and whatever runs the ledger: how the system under
//! test is started on storage of its own, where requests go, who funds the accounts, how the
//! projection lag and the durability of a 202 are observed, how a large log is seeded for the
//! rebuild, and how everything is stopped and removed.
//!
//! [`crate::distributed::Distributed`] implements it for the four release binaries behind the
//! gateway over PostgreSQL, RabbitMQ and Redis; [`crate::embedded::Embedded`] for `ledger serve`
//! (one process on SQLite in a data directory, one base URL, an admin from env). The
//! measurements in `phases.rs` only see this trait.

use std::path::PathBuf;
use std::time::Duration;

use uuid::Uuid;

use crate::figures::{Run, Target};

/// A username and password the gateway (or the single process) accepts at
/// `POST /api/v1/auth/token`.
#[derive(Debug, Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
}

/// A seeded log ready for the `ledger` CLI.
pub struct SeededLog {
    /// Events written.
    pub events: usize,
    /// Time to generate them through the domain.
    pub generated: Duration,
    /// Time to insert them in bulk.
    pub inserted: Duration,
    /// The environment under which `ledger rebuild` and `ledger verify` work on this log.
    pub cli_environment: Vec<(&'static str, String)>,
    /// Arguments after `rebuild` or `verify` that name this log (`--data DIR`).
    pub cli_arguments: Vec<String>,
}

/// What a clean-up kept or could not remove, for the report.
#[derive(Debug, Default)]
pub struct CleanUp {
    /// Things kept on purpose (`BENCH_KEEP=1`), to print.
    pub kept: Vec<String>,
    /// Things that could not be removed, to print as errors.
    pub failures: Vec<String>,
}

/// A running ledger the benchmark measures.
pub trait SystemUnderTest: Sized {
    /// The target for the spread phase's settled transfers/s.
    const SETTLED_TARGET: Target = Target::AtLeastTimesC1(0.08);

    /// Starts the whole system on storage nobody else uses, with a bootstrap admin, and waits
    /// until it answers.
    async fn start() -> anyhow::Result<Self>;

    /// Figures of the start itself (how long it took, memory), pushed before any phase's.
    fn report_start(&self, _run: &mut Run) {}

    /// The one base URL every request goes to (`http://127.0.0.1:<port>`).
    fn base_url(&self) -> &str;

    /// The identity that funds the benchmark's accounts with deposits (an admin or an
    /// operator may deposit).
    fn funding_login(&self) -> &Login;

    /// The system's token settings: access tokens live 30 s, so the benchmark turns each
    /// login's token into a long one with the same claims, as `ledger token` would mint.
    fn token_config(&self) -> &infra::auth::TokenConfig;

    /// The age of the oldest committed event that some live projection has not applied yet;
    /// zero when every projection is caught up.
    async fn oldest_unprojected_age(&self) -> anyhow::Result<Duration>;

    /// Which of `ids` name no transaction in the log: a 202 that was not durable.
    async fn missing_transactions(&self, ids: &[Uuid]) -> anyhow::Result<Vec<Uuid>>;

    /// Stops the services (gracefully), leaving their storage for the checks and the clean-up.
    /// Fails if one of them had already exited on its own.
    async fn stop_services(&mut self) -> anyhow::Result<()>;

    /// Writes a log of at least `events` domain-valid events into fresh storage of its own, in
    /// bulk, for `ledger rebuild` and `ledger verify`.
    async fn seed_log(&mut self, events: usize) -> anyhow::Result<SeededLog>;

    /// The services' log files, for a look after a failure.
    fn logs(&self) -> PathBuf;

    /// Removes everything the system created (databases, queues and exchanges, Redis keys, log
    /// files), or keeps it all when `keep`.
    async fn clean_up(self, keep: bool) -> CleanUp;
}
