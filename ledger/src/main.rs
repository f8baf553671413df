//! `ledger`: the operator CLI of SPEC §7.
//!
//! - `replay`: fold the log (or one transaction's or account's part of it) through the domain, up
//!   to a position or a time, printing an audit trail (text or JSON lines).
//! - `rebuild`: rebuild projections into fresh tables beside the live ones, then switch.
//! - `verify`: the SPEC §8 audit plus every read-model row compared with the log.
//! - `token`: mint a JWT with `JWT_SECRET`.
//! - `migrate-log`: copy the event log into another store (SQLite of the embedded mode, or
//!   KurrentDB) in commit order, resumable, and verify counts and a digest.
//!
//! Exit codes: 0 success; 1 the check found a problem (violations, differences); 2 bad usage;
//! 3 the job could not run (database unreachable, another rebuild running, …).

mod error;
mod migrate;
mod replay;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use infra::auth::{JwtSigner, Role, TokenConfig};
use infra::eventlog::EventLog;
use infra::eventlog::choice::EventStoreConfig;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use projector::model::ProjectionName;
use projector::rebuild::{RebuildOptions, RebuildProgress};
use uuid::Uuid;

use crate::error::{Error, Result};

/// mimalloc instead of the system allocator: under `ledger serve`'s load, glibc's malloc and
/// free (arena locks, consolidation of freed chunks) took about a quarter of the process's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_FOUND_PROBLEMS: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "ledger",
    version,
    about = "Operator tools of the ledger: replay for audits, projection rebuilds, verification, tokens.",
    after_help = "Exit codes: 0 success; 1 the check found a problem; 2 bad usage; 3 the job could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the event log and the read models are.
#[derive(Debug, Clone, Args)]
struct Databases {
    /// PostgreSQL holding the event log.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@localhost:5432/ledger?sslmode=disable"
    )]
    database_url: String,

    /// PostgreSQL holding the read models; `DATABASE_URL` when unset.
    #[arg(long, env = "READ_DATABASE_URL")]
    read_database_url: Option<String>,

    /// The event log's table, schema-qualified.
    #[arg(long, env = "EVENTS_TABLE", default_value = "command_api.events",
          value_parser = projector::config::parse_table)]
    events_table: String,

    /// The data directory of `ledger serve` (SQLite) instead of PostgreSQL: when given, the
    /// URLs above are not used.
    #[arg(long)]
    data: Option<std::path::PathBuf>,

    /// Which store holds the event log (`EVENT_STORE`, `KURRENTDB_URL`).
    #[command(flatten)]
    event_store: EventStoreConfig,
}

impl Databases {
    fn read_url(&self) -> &str {
        self.read_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }

    /// The event log, read-only: no command of this tool writes to it.
    async fn events_pool(&self) -> Result<sqlx::PgPool> {
        Ok(infra::db::connect_read_only(
            &self.database_url,
            projector::startup::SCHEMA,
            4,
            "events",
        )
        .await?)
    }

    /// The event log to read, from the chosen store, read-only.
    async fn event_log(&self) -> Result<Arc<dyn EventLog>> {
        if let Some(log) = self.event_store.open_kurrentdb().await? {
            return Ok(log);
        }
        Ok(Arc::new(
            PgEventLog::open(
                self.events_pool().await?,
                PgEventLogOptions {
                    listen: false,
                    ..PgEventLogOptions::reader(&self.events_table)
                },
            )
            .await?,
        ))
    }

    /// Refuses commands that still read PostgreSQL's event table directly.
    fn postgres_log_only(&self, command: &str) -> Result<()> {
        self.event_store.validate()?;
        if self.event_store.is_kurrentdb() {
            return Err(Error::Usage(format!(
                "`ledger {command}` reads the PostgreSQL event table; with EVENT_STORE=kurrentdb \
                 use `ledger rebuild` (which reads through the event log), or copy the log back"
            )));
        }
        Ok(())
    }

    /// The read models, to rebuild them: migrated and set up if need be.
    async fn read_pool(&self) -> Result<sqlx::PgPool> {
        Ok(projector::startup::connect_read_models(self.read_url(), 6).await?)
    }

    /// The read models, to read them only (`verify`): SELECT privileges are enough.
    async fn read_only_read_pool(&self) -> Result<sqlx::PgPool> {
        Ok(projector::startup::open_read_models(self.read_url(), 4).await?)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole ledger in one process on a data directory (SQLite, in-process bus and
    /// cache): the public API of SPEC §5 on --listen, /metrics on --metrics-listen.
    Serve(serve::ServeArgs),
    /// Replay the log through the domain for an audit: the whole log, one transaction or one
    /// account, up to a position or a time. Events that break an invariant are reported.
    Replay(replay::ReplayArgs),
    /// Rebuild projections from the log into fresh tables beside the live ones, in bounded
    /// batches, then switch atomically. Resumable: run it again after an interruption.
    Rebuild {
        #[command(flatten)]
        databases: Databases,
        /// Projections to rebuild (accounts, transactions, account_history); all when none.
        projections: Vec<String>,
        /// Events per batch (each batch is one transaction).
        #[arg(long, default_value_t = 5_000,
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch_size: u32,
        /// Discard an interrupted rebuild's tables and start over instead of resuming.
        #[arg(long)]
        restart: bool,
        /// The projector's Redis, whose transaction cache is flushed after `transactions` is
        /// rebuilt (a rebuild that fixes a fold must not leave the old rows cached).
        #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// The projector's cache key prefix.
        #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "ledger")]
        redis_key_prefix: String,
    },
    /// Recompute every balance from the log, check the invariants of SPEC §8, and compare every
    /// read-model row with the replayed state. Lists in-flight transactions; exits 1 on any
    /// violation or difference.
    Verify {
        #[command(flatten)]
        databases: Databases,
        /// Differences printed in full (all are counted).
        #[arg(long, default_value_t = 50)]
        show: usize,
    },
    /// Copy the event log, in commit order, into another store: the SQLite log of the embedded
    /// mode in a data directory, or KurrentDB. Resumable: run it again after an interruption.
    /// Ends by comparing counts and a SHA-256 digest of both logs (exit 1 when they differ).
    /// Copies the events only: identity, fraud counters and read models are NOT copied (rebuild
    /// the read models from the copy with `ledger rebuild`).
    MigrateLog {
        /// The source: PostgreSQL's event log (stop command-api first: a log that grows during
        /// the copy does not match its copy).
        #[command(flatten)]
        databases: Databases,
        /// Copy into the embedded mode's SQLite event log in this data directory.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "to_kurrentdb",
            conflicts_with = "to_kurrentdb"
        )]
        to_data: Option<PathBuf>,
        /// Copy into KurrentDB at this connection string (needs the `kurrentdb` feature).
        #[arg(long, value_name = "URL")]
        to_kurrentdb: Option<String>,
        /// The stream prefix in the target KurrentDB.
        #[arg(long, default_value = "ledger")]
        to_kurrentdb_stream_prefix: String,
        /// Events read and appended per batch.
        #[arg(long, default_value_t = 2_000,
              value_parser = clap::value_parser!(u32).range(1..=50_000))]
        batch_size: u32,
        /// Append at most this many events in this run, then stop (without verifying): a copy
        /// in slices; run again to go on.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        max_events: Option<u64>,
    },
    /// Mint a bearer token signed with JWT_SECRET, for operators and tests.
    Token {
        /// The subject: a customer id (the accounts' owner_id).
        #[arg(long)]
        sub: Uuid,
        /// A role: customer, operator, admin or auditor; repeat for several.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// Lifetime in seconds.
        #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 900,
              value_parser = clap::value_parser!(i64).range(1..=31_536_000))]
        ttl: i64,
        /// The secret, issuer and audience the services verify tokens with.
        #[command(flatten)]
        token: TokenConfig,
    },
}

fn parse_role(text: &str) -> std::result::Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("unknown role {text:?}: {}", Role::list()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FOUND_PROBLEMS),
        Err(Error::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(error) => {
            eprintln!("error: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs a command; `Ok(false)` means it ran and found problems.
async fn run(command: Command) -> Result<bool> {
    match command {
        Command::Serve(args) => serve::run(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Rebuild {
            databases,
            projections,
            batch_size,
            restart,
            redis_url,
            redis_key_prefix,
        } => {
            let cache = (redis_url, redis_key_prefix);
            rebuild(&databases, &projections, batch_size, restart, &cache).await
        }
        Command::Verify { databases, show } => {
            if databases.data.is_none() {
                databases.postgres_log_only("verify")?;
            }
            verify(&databases, show).await
        }
        Command::MigrateLog {
            databases,
            to_data,
            to_kurrentdb,
            to_kurrentdb_stream_prefix,
            batch_size,
            max_events,
        } => {
            let target = match (to_data, to_kurrentdb) {
                (Some(directory), _) => Target::Data(directory),
                (None, Some(url)) => Target::KurrentDb(EventStoreConfig {
                    event_store: infra::eventlog::choice::EventStoreKind::KurrentDb,
                    kurrentdb_url: Some(url),
                    kurrentdb_stream_prefix: to_kurrentdb_stream_prefix,
                }),
                (None, None) => {
                    return Err(Error::Usage(
                        "say where to copy the log: --to-data DIR or --to-kurrentdb URL".to_owned(),
                    ));
                }
            };
            migrate_log(&databases, target, batch_size as usize, max_events).await
        }
        Command::Token {
            sub,
            roles,
            ttl,
            token,
        } => {
            let signer = JwtSigner::new(&token)?;
            let token = signer.mint(sub, &roles, chrono::Utc::now().timestamp(), ttl)?;
            println!("{token}");
            Ok(true)
        }
    }
}

pub(crate) fn bar(length: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn rebuild(
    databases: &Databases,
    projections: &[String],
    batch_size: u32,
    restart: bool,
    (redis_url, redis_key_prefix): &(String, String),
) -> Result<bool> {
    let names: Vec<ProjectionName> = if projections.is_empty() {
        ProjectionName::ALL.to_vec()
    } else {
        projections
            .iter()
            .map(|text| {
                text.parse::<ProjectionName>()
                    .map_err(|error| Error::Usage(error.to_string()))
            })
            .collect::<Result<_>>()?
    };
    if let Some(data) = &databases.data {
        return rebuild_embedded(data, &names, batch_size, restart).await;
    }
    databases.event_store.validate()?;
    let read_pool = databases.read_pool().await?;
    let log = databases.event_log().await?;
    let progress = rebuild_bar(&names);
    let summary = projector::rebuild::rebuild(
        &read_pool,
        &*log,
        &names,
        RebuildOptions {
            batch_size: batch_size as usize,
            restart,
        },
        |step| show_rebuild_step(&progress, step),
    )
    .await;
    progress.finish_and_clear();
    print_rebuild(&summary?);
    if names.contains(&ProjectionName::Transactions) {
        flush_cache(redis_url, redis_key_prefix).await;
    }
    Ok(true)
}

/// `ledger rebuild --data DIR`: takes DIR's lock, so it is refused while `ledger serve` runs
/// there (its in-process cache could not be told), and `serve` is refused while it runs.
async fn rebuild_embedded(
    data: &std::path::Path,
    names: &[ProjectionName],
    batch_size: u32,
    restart: bool,
) -> Result<bool> {
    serve::data_dir::database_of(data)?;
    let dir = serve::data_dir::DataDir::lock(data, serve::data_dir::Holder::Rebuild)?;
    let log = open_embedded_log(data).await?;
    let models = projector::store::SqliteReadModels::open_file(&dir.read_models(), 4).await?;
    let progress = rebuild_bar(names);
    let summary = projector::rebuild::rebuild_in(
        &models,
        &log,
        names,
        RebuildOptions {
            batch_size: batch_size as usize,
            restart,
        },
        |step| show_rebuild_step(&progress, step),
    )
    .await;
    progress.finish_and_clear();
    print_rebuild(&summary?);
    Ok(true)
}

/// DIR's event log, read-only: no command of this tool writes to it.
async fn open_embedded_log(
    data: &std::path::Path,
) -> Result<infra::eventlog::sqlite::SqliteEventLog> {
    let database = serve::data_dir::database_of(data)?;
    let pool =
        infra::sqlite::pool(infra::sqlite::options(&database, false).read_only(true), 4).await?;
    Ok(infra::eventlog::sqlite::SqliteEventLog::open(
        pool,
        None,
        infra::eventlog::committer::CommitterSettings::default(),
    )
    .await?)
}

fn rebuild_bar(names: &[ProjectionName]) -> ProgressBar {
    let progress = bar(
        0,
        "rebuild [{elapsed_precise}] {bar:40} {pos}/{len} positions ({per_sec}, eta {eta}) {msg}",
    );
    progress.set_message(
        names
            .iter()
            .map(|name| name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    progress
}

fn show_rebuild_step(progress: &ProgressBar, step: RebuildProgress) {
    match step {
        RebuildProgress::Started { resumed_at, head } => {
            progress.set_length(u64::try_from(head.index).unwrap_or(0));
            progress.set_position(u64::try_from(resumed_at.index).unwrap_or(0));
        }
        RebuildProgress::Applied { position, .. } => {
            let at = u64::try_from(position.index).unwrap_or(0);
            if at > progress.length().unwrap_or(0) {
                progress.set_length(at);
            }
            progress.set_position(at);
        }
        RebuildProgress::Switching => progress.set_message("switching"),
    }
}

fn print_rebuild(summary: &projector::rebuild::RebuildSummary) {
    let seconds = summary.elapsed.as_secs_f64();
    for report in &summary.projections {
        println!(
            "{}: generation {} is live (replaced {})",
            report.projection, report.generation, report.replaced_generation,
        );
    }
    println!(
        "{} events in {:.1} s ({:.0} events/s)",
        summary.events,
        seconds,
        summary.events as f64 / seconds.max(1e-9),
    );
}

/// Deletes the projector's cached transactions after their projection was rebuilt. Redis being
/// away is a warning, not a failure: the entries expire within the cache TTL anyway.
async fn flush_cache(url: &str, prefix: &str) {
    use projector::cache::TransactionCache;
    let flushed = match projector::cache::RedisCache::new(url, prefix, 60) {
        Ok(cache) => tokio::time::timeout(Duration::from_secs(30), cache.flush())
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|result| result.map_err(|error| error.to_string())),
        Err(error) => Err(error.to_string()),
    };
    match flushed {
        Ok(deleted) => println!("transaction cache flushed ({deleted} entries)"),
        Err(error) => eprintln!(
            "warning: the transaction cache could not be flushed ({error}); its entries expire \
             within the projector's CACHE_TTL_SECONDS"
        ),
    }
}

async fn verify(databases: &Databases, show: usize) -> Result<bool> {
    let progress = bar(
        0,
        "verify [{elapsed_precise}] {spinner} {pos} events folded ({per_sec})",
    );
    let report = if let Some(data) = &databases.data {
        // Read-only connections: it can run beside a live `ledger serve`.
        let log = open_embedded_log(data).await?;
        let read_models = serve::data_dir::read_models_of(data)?;
        let pool = infra::sqlite::pool(
            infra::sqlite::options(&read_models, false).read_only(true),
            4,
        )
        .await?;
        let models = projector::store::SqliteReadModels::open_read_only(pool).await?;
        projector::verify::verify_in(&models, &projector::store::LogSource(&log), &mut |events| {
            progress.set_position(events)
        })
        .await
    } else {
        let read_pool = databases.read_only_read_pool().await?;
        let events_pool = databases.events_pool().await?;
        projector::verify::verify(
            &read_pool,
            &events_pool,
            &databases.events_table,
            &mut |events| progress.set_position(events),
        )
        .await
    };
    progress.finish_and_clear();
    let report = report?;
    let audit = &report.audit;
    println!("events folded: {}", report.events);
    println!(
        "transactions: {} confirmed, {} rejected, {} in flight",
        audit.transactions_confirmed,
        audit.transactions_rejected,
        audit.in_flight.len()
    );
    println!("customer accounts: {}", audit.accounts.len());
    for (currency, balance) in &audit.world_balances_minor {
        println!(
            "world account {currency}: {}",
            domain::format_minor(*balance, *currency)
        );
    }
    for (name, generation, position, rows) in &report.projections {
        println!("read model {name}: generation {generation}, at {position}, {rows} rows compared");
    }
    for id in &audit.in_flight {
        println!("in flight (not an error): transaction {id}");
    }
    for violation in &audit.violations {
        let at = violation
            .sequence
            .map(|sequence| format!(" #{sequence}"))
            .unwrap_or_default();
        println!("VIOLATION {}{at}: {}", violation.stream, violation.problem);
    }
    for difference in report.differences.iter().take(show) {
        println!(
            "DIFFERENCE {} {}:\n  expected {}\n  found    {}",
            difference.projection,
            difference.key,
            difference.expected.as_deref().unwrap_or("no row"),
            difference.found.as_deref().unwrap_or("no row"),
        );
    }
    if report.differences.len() > show {
        println!("… and {} more differences", report.differences.len() - show);
    }
    if report.is_clean() {
        println!("OK: invariants hold and every read model equals the replayed log");
        Ok(true)
    } else {
        println!(
            "FAILED: {} violations, {} read-model differences",
            audit.violations.len(),
            report.differences.len()
        );
        Ok(false)
    }
}

/// Where `migrate-log` copies to.
enum Target {
    Data(PathBuf),
    KurrentDb(EventStoreConfig),
}

async fn migrate_log(
    databases: &Databases,
    target: Target,
    batch: usize,
    max_events: Option<u64>,
) -> Result<bool> {
    databases.postgres_log_only("migrate-log")?;
    if let Target::KurrentDb(config) = &target {
        config.validate()?;
    }
    let source = databases.event_log().await?;
    // Held until the copy ends: `ledger serve` cannot start on a log being written.
    let mut _lock = None;
    let (target, name): (Arc<dyn EventLog>, String) = match target {
        Target::Data(directory) => {
            let dir = serve::data_dir::DataDir::lock(&directory, serve::data_dir::Holder::Migrate)?;
            let path = dir.database();
            let log = infra::eventlog::sqlite::SqliteEventLog::open_file(&path, 2).await?;
            _lock = Some(dir);
            (Arc::new(log), path.display().to_string())
        }
        Target::KurrentDb(config) => {
            let log = config.open_kurrentdb().await?.ok_or_else(|| {
                Error::Usage("--to-kurrentdb needs a KurrentDB connection string".to_owned())
            })?;
            let prefix = config.kurrentdb_stream_prefix.clone();
            (log, format!("KurrentDB (streams {prefix}-*)"))
        }
    };
    println!("copying the event log into {name}");
    println!(
        "note: only the event log is copied; identity (customers, credentials), fraud counters, \
         read models and checkpoints are not (rebuild the read models with `ledger rebuild`)"
    );
    let progress = bar(
        0,
        "copy [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec}, eta {eta})",
    );
    let summary = migrate::copy(
        &*source,
        &*target,
        batch,
        max_events,
        &mut |step| match step {
            migrate::CopyProgress::Started {
                already_there,
                estimate,
            } => {
                progress.set_length(estimate.max(already_there));
                if already_there > 0 {
                    progress.println(format!(
                        "resuming: the target holds the first {already_there} events already"
                    ));
                }
            }
            migrate::CopyProgress::Copied { copied } => {
                if copied > progress.length().unwrap_or(0) {
                    progress.set_length(copied);
                }
                progress.set_position(copied);
            }
        },
    )
    .await;
    progress.finish_and_clear();
    let summary = summary?;
    println!(
        "copied: {} events appended now, {} there before, {} appends recognised as done",
        summary.appended, summary.already_there, summary.duplicates
    );
    if summary.stopped_early {
        println!("stopped at --max-events: run again to copy the rest (nothing verified yet)");
        return Ok(true);
    }
    let verifying = bar(
        0,
        "verify [{elapsed_precise}] {spinner} {pos} events digested",
    );
    let source_digest = migrate::digest(&*source, batch, &mut |n| verifying.set_position(n)).await;
    verifying.set_position(0);
    let target_digest = migrate::digest(&*target, batch, &mut |n| verifying.set_position(n)).await;
    verifying.finish_and_clear();
    let (source_digest, target_digest) = (source_digest?, target_digest?);
    println!(
        "source: {} events, sha256 {}",
        source_digest.events, source_digest.sha256
    );
    println!(
        "target: {} events, sha256 {}",
        target_digest.events, target_digest.sha256
    );
    if source_digest == target_digest {
        println!("OK: the target holds the same events in the same order");
        Ok(true)
    } else {
        println!("MISMATCH: the logs differ (was the source written to during the copy?)");
        Ok(false)
    }
}

impl From<projector::Error> for Error {
    fn from(error: projector::Error) -> Self {
        Error::Projector(error)
    }
}
