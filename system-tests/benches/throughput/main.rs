//! End-to-end throughput benchmark of the whole ledger (issue 9): `bench/throughput.sh`, or
//! `cargo build --release --bins && cargo bench -p system-tests --bench throughput`.
//!
//! Each run starts the system under test on storage of its own ([`system::SystemUnderTest`]:
//! the distributed mode is the four release binaries behind the gateway, the embedded mode
//! `ledger serve` on a data directory, with its start time and idle memory), measures PostgreSQL's
//! ceiling C1 with `../shared/bench/pg-ceiling.sh`, then, through the public API with JWTs:
//! spread and hot closed-loop POSTs and how fast they settle, one transfer's POST → final
//! latency, the projection lag under a paced load, GETs of one transaction, and (services
//! stopped) whether every 202 is in the log, then `ledger rebuild` and `ledger verify` over a
//! seeded log. It prints every figure with its ratio to the run's C1 and the target,
//! removes everything it created, and after all runs prints the medians.
//!
//! Environment: `BENCH_MODE` (`distributed` or `embedded`), `BENCH_RUNS` (3), `BENCH_SCALE`
//! (1.0: multiplies every phase's duration, for development), `BENCH_EVENTS` (1,000,000; 0 skips the rebuild), `BENCH_KEEP=1` (keep
//! databases, topology, keys and logs; `BENCH_KEEP_ON_FAILURE=1` only when a run fails),
//! `PG_CEILING_SCRIPT` (the C1 script), and the tests'
//! `TEST_DATABASE_URL`, `TEST_AMQP_URL`, `TEST_REDIS_URL`. Meaning of the figures:
//! `docs/benchmarks.md`.

mod api;
mod distributed;
mod embedded;
mod figures;
mod phases;
mod service;
mod system;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};

use crate::distributed::Distributed;
use crate::embedded::Embedded;
use crate::figures::Run;
use crate::system::SystemUnderTest;

/// Runs whose medians are printed.
const RUNS_DEFAULT: usize = 3;
/// The most runs one command makes: each takes minutes on this machine.
const RUNS_MAX: usize = 20;
/// Events of the seeded log the rebuild works on: the million.
const EVENTS_DEFAULT: usize = 1_000_000;
/// How long pgbench measures C1 (the script's own default).
pub const CEILING_DURATION: Duration = Duration::from_secs(15);
/// The shortest a scaled phase runs: below this a closed loop barely starts.
const PHASE_MIN: Duration = Duration::from_secs(2);
/// The longest stretch of the phases: ten times the durations is already an hour a run.
const SCALE_MAX: f64 = 10.0;

/// How the system under test runs. Each mode implements [`SystemUnderTest`].
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The four services behind the gateway over PostgreSQL, RabbitMQ and Redis.
    Distributed,
    /// `ledger serve`: one process on SQLite in a data directory.
    Embedded,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Distributed => "distributed",
            Mode::Embedded => "embedded",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Mode, String> {
        match text {
            "distributed" => Ok(Mode::Distributed),
            "embedded" => Ok(Mode::Embedded),
            other => Err(format!(
                "BENCH_MODE {other:?} is unknown: distributed or embedded"
            )),
        }
    }
}

/// What the command was asked to do.
pub struct Settings {
    mode: Mode,
    runs: usize,
    /// Multiplies every phase's duration.
    scale: f64,
    /// Events of the seeded log; 0 skips the rebuild.
    events: usize,
    /// Keep everything the runs created.
    keep: bool,
    /// Keep everything a failed run created.
    keep_on_failure: bool,
    ceiling_script: PathBuf,
}

fn variable<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{name}={text:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_environment() -> anyhow::Result<Settings> {
        let runs = variable("BENCH_RUNS", RUNS_DEFAULT)?;
        ensure!(
            (1..=RUNS_MAX).contains(&runs),
            "BENCH_RUNS must be 1 to {RUNS_MAX}"
        );
        let scale = variable("BENCH_SCALE", 1.0_f64)?;
        ensure!(
            scale > 0.0 && scale <= SCALE_MAX,
            "BENCH_SCALE must be in (0, {SCALE_MAX}]"
        );
        let mode = match std::env::var("BENCH_MODE") {
            Ok(text) => text.parse().map_err(anyhow::Error::msg)?,
            Err(_) => Mode::Distributed,
        };
        let default_script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/pg-ceiling.sh");
        let ceiling_script =
            std::env::var_os("PG_CEILING_SCRIPT").map_or(default_script, PathBuf::from);
        ensure!(
            ceiling_script.exists(),
            "{} is missing (set PG_CEILING_SCRIPT)",
            ceiling_script.display()
        );
        Ok(Settings {
            mode,
            runs,
            scale,
            events: variable("BENCH_EVENTS", EVENTS_DEFAULT)?,
            keep: variable("BENCH_KEEP", 0_u8)? == 1,
            keep_on_failure: variable("BENCH_KEEP_ON_FAILURE", 0_u8)? == 1,
            ceiling_script,
        })
    }

    /// `full` scaled by `BENCH_SCALE`, at least [`PHASE_MIN`].
    pub fn scaled(&self, full: Duration) -> Duration {
        full.mul_f64(self.scale).max(PHASE_MIN)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn command_output(program: &str, arguments: &[&str]) -> String {
    std::process::Command::new(program)
        .args(arguments)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run_all())
}

async fn run_all() -> anyhow::Result<()> {
    let settings = Settings::from_environment()?;
    let repository = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    println!("## Throughput benchmark ({} mode)\n", settings.mode.name());
    println!(
        "- commit {} ({} uncommitted changed files)",
        command_output("git", &["-C", repository, "rev-parse", "--short", "HEAD"]),
        command_output("git", &["-C", repository, "status", "--porcelain"])
            .lines()
            .filter(|line| !line.is_empty() && *line != "unknown")
            .count()
    );
    println!(
        "- machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        command_output("uname", &["-srm"])
    );
    println!(
        "- runs {}, durations × {}, seeded log {} events",
        settings.runs, settings.scale, settings.events
    );
    let mut runs = Vec::new();
    for number in 1..=settings.runs {
        eprintln!("run {number} of {}", settings.runs);
        let run = match settings.mode {
            Mode::Distributed => run_once::<Distributed>(&settings).await?,
            Mode::Embedded => run_once::<Embedded>(&settings).await?,
        };
        figures::print_run(number, &run);
        runs.push(run);
    }
    if runs.len() > 1 {
        figures::print_medians(&runs);
    }
    Ok(())
}

/// One run on a fresh system, cleaned up whatever happens, Ctrl-C included.
async fn run_once<S: SystemUnderTest>(settings: &Settings) -> anyhow::Result<Run> {
    let mut run = Run {
        load_start: load_average(),
        ..Run::default()
    };
    eprintln!("  starting the system");
    let mut system = S::start().await?;
    system.report_start(&mut run);
    let outcome = tokio::select! {
        outcome = measure(&mut run, &mut system, settings) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if outcome.is_err() {
        eprintln!(
            "  the run failed; the services' logs are in {}",
            system.logs().display()
        );
    }
    let keep = settings.keep || (outcome.is_err() && settings.keep_on_failure);
    let cleaned = system.clean_up(keep).await;
    for kept in &cleaned.kept {
        eprintln!("  kept: {kept}");
    }
    for failure in &cleaned.failures {
        eprintln!("  not cleaned up: {failure}");
    }
    outcome?;
    ensure!(cleaned.failures.is_empty(), "the run left things behind");
    run.load_end = load_average();
    Ok(run)
}

/// Says which phase starts, and notes the load average (1 min) at that moment: other work on
/// the machine shows up there.
fn phase(run: &mut Run, name: &'static str) {
    let load = load_average();
    eprintln!("  {name} (load average {load})");
    let one_minute = load
        .split_whitespace()
        .next()
        .unwrap_or("unknown")
        .to_owned();
    run.phase_loads.push((name, one_minute));
}

/// The phases, in order.
async fn measure<S: SystemUnderTest>(
    run: &mut Run,
    system: &mut S,
    settings: &Settings,
) -> anyhow::Result<()> {
    phase(run, "setup");
    let mut workload = phases::set_up(system).await?;
    phase(run, "C1");
    run.c1 = phases::ceiling(settings).await?;
    phase(run, "spread");
    let settled = phases::posting_phase(
        run,
        &mut workload,
        "spread",
        false,
        settings.scaled(phases::SPREAD_DURATION),
        S::SETTLED_TARGET,
    )
    .await?;
    phase(run, "hot");
    phases::posting_phase(
        run,
        &mut workload,
        "hot",
        true,
        settings.scaled(phases::HOT_DURATION),
        S::SETTLED_TARGET,
    )
    .await?;
    phase(run, "one transfer");
    phases::one_transfer_phase(
        run,
        &mut workload,
        settings.scaled(phases::ONE_TRANSFER_DURATION),
    )
    .await?;
    phase(run, "lag");
    phases::lag_phase(
        run,
        system,
        &mut workload,
        settled,
        settings.scaled(phases::LAG_DURATION),
    )
    .await?;
    phase(run, "GET");
    phases::get_phase(run, &workload, settings.scaled(phases::GET_DURATION)).await?;
    phases::any_rejected(run, &workload).await?;
    phase(run, "stop and durability");
    system.stop_services().await?;
    phases::durability(run, system, &workload).await?;
    if settings.events > 0 {
        phase(run, "rebuild");
        phases::rebuild_phase(run, system, settings.events).await?;
    }
    Ok(())
}
