//! The embedded mode: the release `ledger serve` (the whole ledger in one process on SQLite,
//! SPEC §10) on a data directory of its own, its ports chosen by the OS, its bootstrap admin and
//! JWT secret from env, JSON logs to files. No PostgreSQL, RabbitMQ or Redis is involved; the
//! run's C1 still measures PostgreSQL, so the ratios stay comparable with the distributed mode's.
//!
//! Starting it measures the two figures only this mode has: the time from spawning the process
//! to the first 200 of `/health` on an existing directory (it is started once on a fresh
//! directory, stopped, and started again on it), and its resident memory 5 s after that 200,
//! before any other request.
//!
//! The SQL that knows the files' layout (the lag, a 202's durability, the seeded log's bulk
//! insert) is here and nowhere else: [`LOWEST_LIVE_CHECKPOINT`], [`FIRST_EVENT_AFTER`],
//! [`EXISTING_TRANSACTIONS`] and [`insert_rows`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use crate::distributed::{SEEDED_ACCOUNTS, random_secret};
use crate::figures::{Figure, Run, Target, Unit};
use crate::service::Service;
use crate::system::{CleanUp, Login, SeededLog, SystemUnderTest};

/// How long `ledger serve` may take to answer its first `/health`: migrations and the admin's
/// argon2 hash happen first.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// How often the log (for the port) and `/health` are asked while timing a start: the
/// resolution of the start-up figure.
const START_POLL: Duration = Duration::from_millis(5);

/// How long the process is left alone after its first 200 before its memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(5);

/// Grace before a `ledger serve` that does not stop is killed: longer than its own drain.
const STOP_GRACE: Duration = Duration::from_secs(40);

/// Read-only connections of each probe pool: the lag sampler and the durability check, one
/// query at a time each.
const PROBE_CONNECTIONS: u32 = 2;

/// Transaction ids per query of the durability check (one JSON array parameter).
const DURABILITY_CHUNK: usize = 10_000;

/// Rows per INSERT of the seeded log: 9 parameters each, well under SQLite's 32,766.
const INSERT_CHUNK: usize = 1_000;

/// Warnings and errors of `ledger serve`'s logs quoted on stderr after the run.
const WARNINGS_SHOWN: usize = 10;

/// Targets of issue 10 for `ledger serve`.
const SETTLED_MIN: f64 = 1_000.0;
const IDLE_RSS_MAX_MB: f64 = 50.0;
const HEALTHY_MAX_MS: f64 = 1_000.0;

/// The lowest log position every live projection has applied (`read-models.db`): the
/// projector's checkpoint of each projection's live generation, whose `tx_id` is the SQLite
/// log's `position` (a `LogPosition` is `(position, 0)` there). NULL before the projector has
/// written any.
const LOWEST_LIVE_CHECKPOINT: &str = "
    SELECT min(c.tx_id) FROM projections p
    JOIN checkpoints c ON c.projection = p.name AND c.generation = p.live_generation";

/// When the first event after a position was written (`ledger.db`), as `LogReader::lag` finds
/// it: RFC 3339 text in UTC.
const FIRST_EVENT_AFTER: &str =
    "SELECT recorded_at FROM events WHERE position > ?1 ORDER BY position LIMIT 1";

/// Which of the given transaction ids (a JSON array) have their first event
/// (`TransactionCreated`) in the log.
const EXISTING_TRANSACTIONS: &str = "
    SELECT aggregate_id FROM events
    WHERE aggregate_type = 'transaction' AND sequence = 1
      AND aggregate_id IN (SELECT value FROM json_each(?1))";

/// `ledger serve` on a data directory of its own.
pub struct Embedded {
    /// Holds `data`, `seeded` and `logs`; removed by the clean-up.
    root: PathBuf,
    data: PathBuf,
    logs: PathBuf,
    service: Option<Service>,
    /// Read-only connections to `data/ledger.db` and `data/read-models.db`.
    events: Option<SqlitePool>,
    read_models: Option<SqlitePool>,
    base_url: String,
    admin: Login,
    secret: String,
    tokens: infra::auth::TokenConfig,
    /// How each start went, for [`SystemUnderTest::report_start`].
    starts: Starts,
}

/// What the two starts measured.
#[derive(Default)]
struct Starts {
    /// Spawn → first 200 of `/health` on the fresh directory.
    fresh: Duration,
    /// The same on the existing directory: the figure.
    existing: Duration,
    /// VmRSS of the second start, [`IDLE_BEFORE_RSS`] after its first 200, in bytes.
    idle_rss: u64,
    /// What the process itself said about each start (`started in N ms`).
    said: Vec<String>,
}

impl Embedded {
    fn environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LEDGER_DATA", self.data.display().to_string()),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("ADMIN_USERNAME", self.admin.username.clone()),
            ("ADMIN_PASSWORD", self.admin.password.clone()),
            ("JWT_SECRET", self.secret.clone()),
            ("LOG_FORMAT", "json".to_owned()),
        ]
    }

    /// Spawns `ledger serve` (log `ledger-<number>.log`) and waits for the first 200 of its
    /// `/health`: returns the time from just before the spawn.
    async fn start_timed(&mut self, number: usize) -> anyhow::Result<Duration> {
        let environment = self.environment();
        let label = format!("ledger-{number}");
        let started = Instant::now();
        let service = Service::start_with("ledger", &label, &self.logs, &environment, &["serve"])?;
        let service = self.service.insert(service);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building an HTTP client")?;
        let mut port = None;
        loop {
            if port.is_none() {
                port = service.logged_port_now();
            }
            if let Some(port) = port {
                let answer = client
                    .get(format!("http://127.0.0.1:{port}/health"))
                    .send()
                    .await;
                if answer.is_ok_and(|response| response.status() == reqwest::StatusCode::OK) {
                    let healthy = started.elapsed();
                    self.base_url = format!("http://127.0.0.1:{port}");
                    return Ok(healthy);
                }
            }
            if !service.is_running() {
                bail!(
                    "ledger serve exited before /health answered 200; its log ends:\n{}",
                    service.log_tail()
                );
            }
            ensure!(
                started.elapsed() < HEALTHY_WITHIN,
                "ledger serve did not answer 200 on /health within {HEALTHY_WITHIN:?}; its log \
                 ends:\n{}",
                service.log_tail()
            );
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// What the running process printed about its start (`started in N ms`).
    fn said_about_start(&self) -> String {
        let log = self.service.as_ref().map(Service::log).unwrap_or_default();
        log.lines()
            .find_map(|line| {
                let (_, rest) = line.split_once("started in ")?;
                rest.split_once(')').map(|(said, _)| said.to_owned())
            })
            .unwrap_or_else(|| "nothing".to_owned())
    }

    /// Says on stderr how many warnings and errors every start of `ledger serve` logged, with
    /// the first few: a run's figures can look fine while the log shows trouble.
    fn tell_warnings(&self) {
        let mut found = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for line in text.lines() {
                let Ok(parsed) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if matches!(parsed["level"].as_str(), Some("WARN" | "ERROR")) {
                    found.push(line.to_owned());
                }
            }
        }
        eprintln!("  ledger serve logged {} warnings and errors", found.len());
        for line in found.iter().take(WARNINGS_SHOWN) {
            eprintln!("    {line}");
        }
    }

    /// Starts on the fresh directory, stops, starts again on it, timing that start and reading
    /// the idle memory; then waits until `/health` says ok and opens the probes.
    async fn start_twice(&mut self) -> anyhow::Result<()> {
        self.starts.fresh = self.start_timed(1).await?;
        self.starts.said.push(self.said_about_start());
        self.stop_services().await?;
        self.starts.existing = self.start_timed(2).await?;
        tokio::time::sleep(IDLE_BEFORE_RSS).await;
        let pid = self.service.as_ref().context("ledger serve runs")?.id();
        self.starts.idle_rss = resident_bytes(pid)?;
        self.starts.said.push(self.said_about_start());
        wait_ok(&self.base_url).await?;
        let (events, read_models) = (
            self.data.join("ledger.db"),
            self.data.join("read-models.db"),
        );
        self.events = Some(read_only(&events).await?);
        self.read_models = Some(read_only(&read_models).await?);
        Ok(())
    }

    fn probes(&self) -> anyhow::Result<(&SqlitePool, &SqlitePool)> {
        match (&self.events, &self.read_models) {
            (Some(events), Some(read_models)) => Ok((events, read_models)),
            _ => bail!("the probes are not open"),
        }
    }
}

/// VmRSS of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kilobytes = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("/proc/<pid>/status has no VmRSS line")?;
    Ok(kilobytes * 1_024)
}

/// Waits until `/health` says ok (every required part up, the projections too).
async fn wait_ok(base_url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let answer = client.get(format!("{base_url}/health")).send().await;
        let status = match answer {
            Ok(response) => response.json::<Value>().await.unwrap_or_default()["status"].clone(),
            Err(_) => Value::Null,
        };
        if status == "ok" {
            return Ok(());
        }
        ensure!(
            started.elapsed() < HEALTHY_WITHIN,
            "ledger serve did not report ok within {HEALTHY_WITHIN:?} (last: {status})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pool of read-only connections to the SQLite file at `path`, as `ledger verify` opens one.
async fn read_only(path: &Path) -> anyhow::Result<SqlitePool> {
    infra::sqlite::pool(
        infra::sqlite::options(path, false).read_only(true),
        PROBE_CONNECTIONS,
    )
    .await
    .with_context(|| format!("opening {} read-only", path.display()))
}

/// Inserts the builder's events into the SQLite event log's `events` table in chunks of
/// [`INSERT_CHUNK`] rows, in order, so `position` follows the builder's order as the log's
/// committer would assign it. The columns the committer fills itself are filled here: a fresh
/// event id, the time of the chunk.
async fn insert_rows(
    pool: &SqlitePool,
    builder: &infra::testing::log_builder::LogBuilder,
) -> anyhow::Result<()> {
    let metadata = builder.metadata.to_string();
    for chunk in builder.rows.chunks(INSERT_CHUNK) {
        let recorded_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata, event_id, recorded_at) ",
        );
        insert.push_values(chunk, |mut values, row| {
            values
                .push_bind(row.aggregate_type)
                .push_bind(row.aggregate_id.as_str())
                .push_bind(row.sequence)
                .push_bind(row.event_type)
                .push_bind("1")
                .push_bind(row.payload.to_string())
                .push_bind(metadata.as_str())
                .push_bind(Uuid::new_v4().to_string())
                .push_bind(recorded_at.as_str());
        });
        insert
            .build()
            .execute(pool)
            .await
            .context("inserting generated events")?;
    }
    Ok(())
}

impl SystemUnderTest for Embedded {
    const SETTLED_TARGET: Target = Target::AtLeast(SETTLED_MIN);

    async fn start() -> anyhow::Result<Self> {
        let root =
            std::env::temp_dir().join(format!("ledger-bench-embedded-{}", Uuid::new_v4().simple()));
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).context("creating the log directory")?;
        // Sixteen distinct bytes whatever the random part, as `ledger serve` requires.
        let secret = format!("GHIJKLMNOPQRSTUV{}", random_secret());
        let mut system = Embedded {
            data: root.join("data"),
            root,
            logs,
            service: None,
            events: None,
            read_models: None,
            base_url: String::new(),
            admin: Login {
                username: "bench-admin".to_owned(),
                password: random_secret(),
            },
            tokens: infra::auth::TokenConfig::with_secret(&secret),
            secret,
            starts: Starts::default(),
        };
        if let Err(error) = system.start_twice().await {
            let cleaned = system.clean_up(false).await;
            for failure in cleaned.failures {
                eprintln!("clean-up after a failed start: {failure}");
            }
            return Err(error.context("starting ledger serve"));
        }
        Ok(system)
    }

    fn report_start(&self, run: &mut Run) {
        run.push(
            Figure::new(
                "healthy after start, existing DIR",
                self.starts.existing.as_secs_f64() * 1_000.0,
                Unit::Millis,
            )
            .target(Target::AtMost(HEALTHY_MAX_MS)),
        );
        run.push(
            Figure::new(
                "idle RSS 5 s after healthy",
                self.starts.idle_rss as f64 / 1e6,
                Unit::Megabytes,
            )
            .target(Target::AtMost(IDLE_RSS_MAX_MB)),
        );
        run.push(Figure::new(
            "healthy after start, new DIR",
            self.starts.fresh.as_secs_f64() * 1_000.0,
            Unit::Millis,
        ));
        run.notes.push(format!(
            "start: spawn → first 200 of /health {:.0} ms on a new directory, {:.0} ms on the \
             same directory again; ledger serve said it started in {}; VmRSS {} kB {} s after \
             that 200",
            self.starts.fresh.as_secs_f64() * 1_000.0,
            self.starts.existing.as_secs_f64() * 1_000.0,
            self.starts.said.join(" and "),
            self.starts.idle_rss / 1_024,
            IDLE_BEFORE_RSS.as_secs()
        ));
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }

    fn funding_login(&self) -> &Login {
        &self.admin
    }

    fn token_config(&self) -> &infra::auth::TokenConfig {
        &self.tokens
    }

    async fn oldest_unprojected_age(&self) -> anyhow::Result<Duration> {
        let (events, read_models) = self.probes()?;
        let lowest: Option<i64> = sqlx::query_scalar(LOWEST_LIVE_CHECKPOINT)
            .fetch_one(read_models)
            .await
            .context("reading the live checkpoints")?;
        let Some(lowest) = lowest else {
            return Ok(Duration::ZERO);
        };
        let oldest: Option<String> = sqlx::query_scalar(FIRST_EVENT_AFTER)
            .bind(lowest)
            .fetch_optional(events)
            .await
            .context("reading the oldest unprojected event")?;
        let Some(oldest) = oldest else {
            return Ok(Duration::ZERO);
        };
        let recorded = DateTime::parse_from_rfc3339(&oldest)
            .with_context(|| format!("recorded_at {oldest:?} is not RFC 3339"))?;
        Ok((Utc::now() - recorded.with_timezone(&Utc))
            .to_std()
            .unwrap_or_default())
    }

    async fn missing_transactions(&self, ids: &[Uuid]) -> anyhow::Result<Vec<Uuid>> {
        let (events, _) = self.probes()?;
        let mut missing = Vec::new();
        for chunk in ids.chunks(DURABILITY_CHUNK) {
            let wanted: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let wanted = serde_json::to_string(&wanted).context("listing the ids")?;
            let found: HashSet<String> = sqlx::query_scalar(EXISTING_TRANSACTIONS)
                .bind(wanted)
                .fetch_all(events)
                .await
                .context("looking up accepted transactions")?
                .into_iter()
                .collect();
            missing.extend(chunk.iter().filter(|id| !found.contains(&id.to_string())));
        }
        Ok(missing)
    }

    async fn stop_services(&mut self) -> anyhow::Result<()> {
        let Some(service) = self.service.as_mut() else {
            return Ok(());
        };
        if !service.is_running() {
            bail!("ledger serve exited on its own:\n{}", service.log_tail());
        }
        service.stop(STOP_GRACE);
        self.tell_warnings();
        Ok(())
    }

    async fn seed_log(&mut self, events: usize) -> anyhow::Result<SeededLog> {
        let directory = self.root.join("seeded");
        std::fs::create_dir_all(&directory).context("creating the seeded log's directory")?;
        let log = infra::eventlog::sqlite::SqliteEventLog::open_file(
            &directory.join("ledger.db"),
            PROBE_CONNECTIONS,
        )
        .await
        .context("creating the seeded event log")?;
        let started = Instant::now();
        let builder = tokio::task::spawn_blocking(move || {
            infra::testing::log_builder::build_log(events, SEEDED_ACCOUNTS)
        })
        .await
        .context("generating the log")?;
        let generated = started.elapsed();
        let started = Instant::now();
        insert_rows(log.pool(), &builder).await?;
        let inserted = started.elapsed();
        let head = infra::eventlog::EventLog::head(&log)
            .await
            .context("reading the seeded log's head")?;
        ensure!(
            usize::try_from(head.commit).ok() == Some(builder.rows.len()),
            "the seeded log ends at {head:?}, not at its {} events",
            builder.rows.len()
        );
        log.pool().close().await;
        Ok(SeededLog {
            events: builder.rows.len(),
            generated,
            inserted,
            cli_environment: Vec::new(),
            cli_arguments: vec!["--data".to_owned(), directory.display().to_string()],
        })
    }

    fn logs(&self) -> PathBuf {
        self.logs.clone()
    }

    async fn clean_up(mut self, keep: bool) -> CleanUp {
        let mut report = CleanUp::default();
        if let Some(mut service) = self.service.take() {
            service.stop(STOP_GRACE);
        }
        for pool in [self.events.take(), self.read_models.take()]
            .into_iter()
            .flatten()
        {
            pool.close().await;
        }
        if keep {
            report.kept.push(format!(
                "data directory, seeded log and logs in {}",
                self.root.display()
            ));
            return report;
        }
        if let Err(error) = std::fs::remove_dir_all(&self.root) {
            report
                .failures
                .push(format!("{}: {error}", self.root.display()));
        }
        report
    }
}
