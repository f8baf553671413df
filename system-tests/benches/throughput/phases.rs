//! The measurements of one run, in order: setup, C1, spread, hot, one transfer, lag, GET,
//! durability, rebuild. They see the system only through [`SystemUnderTest`] and its public API.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::Settings;
use crate::api::{self, Api, Position, Posted};
use crate::figures::{Figure, Run, Target, Unit};
use crate::system::{Login, SystemUnderTest};

/// Lifetime of the benchmark's tokens: longer than a slow run with its drains.
const TOKEN_TTL_SECONDS: i64 = 3_600;

/// Accounts the customer opens and the spread phase moves money between.
const ACCOUNTS: usize = 64;
/// The hot phase's accounts: the first 16 of them.
const HOT_ACCOUNTS: usize = 16;
/// What the admin deposits into each account: below the fraud worker's default amount threshold
/// (10,000) and velocity limit (50,000 per account and 10 minutes), so no deposit is rejected,
/// and hundreds of times what transfers of at most 0.99 take out of an account in a run.
const FUNDING_AMOUNT: &str = "9000.00";

/// Keep-alive connections of the spread and hot phases, one request in flight on each.
const POST_CONNECTIONS: usize = 32;
/// How long the spread phase posts.
pub const SPREAD_DURATION: Duration = Duration::from_secs(20);
/// How long the hot phase posts.
pub const HOT_DURATION: Duration = Duration::from_secs(10);
/// How often the list of PENDING transactions is asked while waiting for the system to settle.
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// How long a phase's backlog may take to settle before the run fails: at the slowest rate seen
/// so far (about 60 settled/s) a 20 s spread phase leaves under a minute of work.
const SETTLE_WITHIN: Duration = Duration::from_secs(600);

/// Clients of the one-transfer phase, each with one transfer in flight.
const ONE_TRANSFER_CLIENTS: usize = 8;
/// How long the one-transfer phase runs.
pub const ONE_TRANSFER_DURATION: Duration = Duration::from_secs(10);
/// How often a client asks whether its transfer is final.
const ONE_TRANSFER_POLL: Duration = Duration::from_millis(10);
/// How long a transfer may take to be final before it counts as "not final".
const FINAL_WITHIN: Duration = Duration::from_secs(60);

/// The fraction of the spread phase's settled rate the lag phase offers.
const LAG_RATE_FRACTION: f64 = 0.8;
/// How long the lag phase offers its load.
pub const LAG_DURATION: Duration = Duration::from_secs(60);
/// How often the lag is sampled.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// The windows at the start and the end of the lag phase compared to tell whether the lag
/// grows (shorter when the phase is scaled down: a third of it at most).
const LAG_GROWTH_WINDOW: Duration = Duration::from_secs(10);
/// The lag grows when the last window's mean exceeds the first's by this factor...
const LAG_GROWTH_FACTOR: f64 = 1.5;
/// ...and by at least this much, so that 4 ms against 2 ms is not called growth.
const LAG_GROWTH_MIN_MS: f64 = 20.0;
/// Requests of the paced lag load in flight at most: past this the client is the bottleneck,
/// and a request not sent at its time is counted, not queued (the load stays open).
const LAG_IN_FLIGHT_MAX: usize = 512;

/// Keep-alive connections of the GET throughput measurement.
const GET_CONNECTIONS_THROUGHPUT: usize = 32;
/// Keep-alive connections of the GET latency measurement.
const GET_CONNECTIONS_LATENCY: usize = 8;
/// How long each GET measurement runs.
pub const GET_DURATION: Duration = Duration::from_secs(10);

/// The largest latency the histograms hold, in µs (an hour); larger ones are clamped.
const LATENCY_MAX_MICROS: u64 = 3_600_000_000;

/// Answers that were not 2xx, by "METHOD status" (or "METHOD no answer").
type Statuses = BTreeMap<String, u64>;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3)
        .expect("the bounds are valid: 1 ≤ low, high ≥ 2 × low, 3 significant figures")
}

fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.clamp(1, LATENCY_MAX_MICROS));
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1_000.0
}

fn describe(statuses: &Statuses) -> String {
    if statuses.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = statuses
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    parts.join(", ")
}

fn total(statuses: &Statuses) -> f64 {
    statuses.values().sum::<u64>() as f64
}

/// What the run has set up and accepted so far.
pub struct Workload {
    customer: Api,
    accounts: Vec<Uuid>,
    /// Every transaction a 202 named, to check at the end that each exists.
    accepted: Vec<Uuid>,
    /// The furthest position any 202 reported.
    furthest: Option<Position>,
}

impl Workload {
    fn accept(&mut self, ids: &[Uuid], furthest: Option<Position>) {
        self.accepted.extend_from_slice(ids);
        self.furthest = self.furthest.max(furthest);
    }
}

/// One customer with [`ACCOUNTS`] accounts, each funded by a deposit of the funding identity,
/// all settled.
pub async fn set_up<S: SystemUnderTest>(system: &S) -> anyhow::Result<Workload> {
    let client = api::client(1)?;
    let customer_login = Login {
        username: "bench-customer".to_owned(),
        password: format!("{}", Uuid::new_v4().simple()),
    };
    let customer = Api::register(system.base_url(), client.clone(), &customer_login)
        .await?
        .lengthen(system.token_config(), TOKEN_TTL_SECONDS)?;
    let funder = Api::login(system.base_url(), client, system.funding_login())
        .await?
        .lengthen(system.token_config(), TOKEN_TTL_SECONDS)?;
    let mut accounts = Vec::with_capacity(ACCOUNTS);
    for number in 0..ACCOUNTS {
        accounts.push(customer.open_account(&format!("bench {number}")).await?);
    }
    let mut workload = Workload {
        customer,
        accounts,
        accepted: Vec::new(),
        furthest: None,
    };
    let started = Instant::now();
    for account in workload.accounts.clone() {
        match funder
            .post_transaction(api::deposit_body(account, FUNDING_AMOUNT))
            .await
        {
            Posted::Accepted { id, position, .. } => workload.accept(&[id], position),
            Posted::Refused(status) => bail!("the funding deposit answered {status}"),
            Posted::Failed => bail!("the funding deposit got no answer"),
        }
    }
    wait_settled(&workload, started).await?;
    Ok(workload)
}

/// Runs the C1 script and returns its figure.
pub async fn ceiling(settings: &Settings) -> anyhow::Result<f64> {
    let seconds = settings.scaled(crate::CEILING_DURATION).as_secs().max(1);
    let output = tokio::process::Command::new(&settings.ceiling_script)
        .arg(seconds.to_string())
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", settings.ceiling_script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed: {}",
        settings.ceiling_script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("C1 "))
        .and_then(|number| number.trim().parse::<f64>().ok())
        .with_context(|| format!("the ceiling script printed no `C1 <n>` line: {stdout}"))
}

/// Waits until no transaction is PENDING as of the furthest accepted position; returns the time
/// from `since`.
async fn wait_settled(workload: &Workload, since: Instant) -> anyhow::Result<Duration> {
    loop {
        let asked = Instant::now();
        let answer = workload
            .customer
            .none_with_status("PENDING", workload.furthest)
            .await?;
        if answer == Ok(true) {
            return Ok(since.elapsed());
        }
        ensure!(
            since.elapsed() < SETTLE_WITHIN,
            "transactions still PENDING {SETTLE_WITHIN:?} after the phase started (last answer: {answer:?})"
        );
        tokio::time::sleep_until((asked + SETTLE_POLL).into()).await;
    }
}

/// What the closed-loop POSTs of a phase got.
struct Posting {
    accepted: Vec<Uuid>,
    furthest: Option<Position>,
    latencies: Histogram<u64>,
    statuses: Statuses,
    /// From the first POST to the last answer.
    elapsed: Duration,
}

/// `connections` clients, each on its own keep-alive connection with one POST in flight,
/// posting transfers among `accounts` for `duration`.
async fn post_closed_loop(
    customer: &Api,
    accounts: &[Uuid],
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Posting> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let api = customer.with_client(api::client(1)?);
        let accounts = accounts.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::from_os_rng();
            let mut posting = Posting {
                accepted: Vec::new(),
                furthest: None,
                latencies: histogram(),
                statuses: Statuses::new(),
                elapsed: Duration::ZERO,
            };
            while Instant::now() < deadline {
                let body = api::random_transfer(&mut rng, &accounts);
                tally(&mut posting, api.post_transaction(body).await);
            }
            posting
        }));
    }
    let mut all = Posting {
        accepted: Vec::new(),
        furthest: None,
        latencies: histogram(),
        statuses: Statuses::new(),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let posting = task.await.context("a posting client panicked")?;
        all.accepted.extend(posting.accepted);
        all.furthest = all.furthest.max(posting.furthest);
        all.latencies
            .add(&posting.latencies)
            .context("merging latencies")?;
        for (status, count) in posting.statuses {
            *all.statuses.entry(status).or_default() += count;
        }
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

fn tally(posting: &mut Posting, posted: Posted) {
    match posted {
        Posted::Accepted {
            id,
            position,
            latency,
        } => {
            posting.accepted.push(id);
            posting.furthest = posting.furthest.max(position);
            record(&mut posting.latencies, latency);
        }
        Posted::Refused(status) => {
            *posting
                .statuses
                .entry(format!("POST {}", status.as_u16()))
                .or_default() += 1;
        }
        Posted::Failed => {
            *posting
                .statuses
                .entry("POST no answer".to_owned())
                .or_default() += 1
        }
    }
}

/// The spread or hot phase: closed-loop POSTs for `duration`, then the wait until nothing is
/// PENDING. Returns the settled rate. `settled_target` is the spread phase's (the hot phase's is
/// a fraction of the spread's).
pub async fn posting_phase(
    run: &mut Run,
    workload: &mut Workload,
    name: &'static str,
    hot: bool,
    duration: Duration,
    settled_target: Target,
) -> anyhow::Result<f64> {
    let accounts = if hot {
        workload.accounts[..HOT_ACCOUNTS].to_vec()
    } else {
        workload.accounts.clone()
    };
    let started = Instant::now();
    let posting =
        post_closed_loop(&workload.customer, &accounts, POST_CONNECTIONS, duration).await?;
    workload.accept(&posting.accepted, posting.furthest);
    let settled_after = wait_settled(workload, started).await?;
    let accepted = posting.accepted.len() as f64;
    let settled_per_second = accepted / settled_after.as_secs_f64();
    let keys = PostingKeys::of(name);
    run.push(
        Figure::new(
            keys.accepted,
            accepted / posting.elapsed.as_secs_f64(),
            Unit::PerSecond,
        )
        .target(Target::AtLeast(1_500.0)),
    );
    run.push(Figure::new(
        keys.p50,
        millis(&posting.latencies, 0.5),
        Unit::Millis,
    ));
    run.push(
        Figure::new(keys.p99, millis(&posting.latencies, 0.99), Unit::Millis)
            .target(Target::AtMost(50.0)),
    );
    let settled = Figure::new(keys.settled, settled_per_second, Unit::PerSecond);
    run.push(if hot {
        settled.target(Target::AtLeastTimes("spread settled", 0.7))
    } else {
        settled.target(settled_target)
    });
    run.push(Figure::new(keys.non_2xx, total(&posting.statuses), Unit::Count).target(Target::Zero));
    run.notes.push(format!(
        "{name}: {} accepted in {:.1} s of posting ({} accounts, {POST_CONNECTIONS} connections); \
         none PENDING {:.1} s after the first POST; non-2xx: {}",
        posting.accepted.len(),
        posting.elapsed.as_secs_f64(),
        accounts.len(),
        settled_after.as_secs_f64(),
        describe(&posting.statuses)
    ));
    Ok(settled_per_second)
}

/// The figure names of a posting phase.
struct PostingKeys {
    accepted: &'static str,
    p50: &'static str,
    p99: &'static str,
    settled: &'static str,
    non_2xx: &'static str,
}

impl PostingKeys {
    fn of(name: &str) -> PostingKeys {
        if name == "hot" {
            PostingKeys {
                accepted: "hot accepted POSTs",
                p50: "hot POST p50",
                p99: "hot POST p99",
                settled: "hot settled",
                non_2xx: "hot non-2xx answers",
            }
        } else {
            PostingKeys {
                accepted: "spread accepted POSTs",
                p50: "spread POST p50",
                p99: "spread POST p99",
                settled: "spread settled",
                non_2xx: "spread non-2xx answers",
            }
        }
    }
}

/// What the one-transfer clients saw.
struct Finals {
    accepted: Vec<Uuid>,
    furthest: Option<Position>,
    latencies: Histogram<u64>,
    statuses: Statuses,
    rejected: u64,
    not_final: u64,
}

/// One client: POST, then GET with the position every [`ONE_TRANSFER_POLL`] until final.
async fn one_transfer_client(api: Api, accounts: Vec<Uuid>, deadline: Instant) -> Finals {
    let mut rng = StdRng::from_os_rng();
    let mut finals = Finals {
        accepted: Vec::new(),
        furthest: None,
        latencies: histogram(),
        statuses: Statuses::new(),
        rejected: 0,
        not_final: 0,
    };
    while Instant::now() < deadline {
        let started = Instant::now();
        let (id, position) = match api
            .post_transaction(api::random_transfer(&mut rng, &accounts))
            .await
        {
            Posted::Accepted { id, position, .. } => (id, position),
            Posted::Refused(status) => {
                *finals
                    .statuses
                    .entry(format!("POST {}", status.as_u16()))
                    .or_default() += 1;
                continue;
            }
            Posted::Failed => {
                *finals
                    .statuses
                    .entry("POST no answer".to_owned())
                    .or_default() += 1;
                continue;
            }
        };
        finals.accepted.push(id);
        finals.furthest = finals.furthest.max(position);
        loop {
            let asked = Instant::now();
            match api.transaction_status(id, position).await {
                Ok(Ok(status)) if status == "CONFIRMED" || status == "REJECTED" => {
                    record(&mut finals.latencies, started.elapsed());
                    finals.rejected += u64::from(status == "REJECTED");
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    *finals
                        .statuses
                        .entry(format!("GET {}", status.as_u16()))
                        .or_default() += 1;
                }
                Err(_) => {
                    *finals
                        .statuses
                        .entry("GET no answer".to_owned())
                        .or_default() += 1
                }
            }
            if started.elapsed() > FINAL_WITHIN {
                finals.not_final += 1;
                break;
            }
            tokio::time::sleep_until((asked + ONE_TRANSFER_POLL).into()).await;
        }
    }
    finals
}

/// The one-transfer phase: [`ONE_TRANSFER_CLIENTS`] clients, each waiting for its own transfer
/// to be final before the next.
pub async fn one_transfer_phase(
    run: &mut Run,
    workload: &mut Workload,
    duration: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..ONE_TRANSFER_CLIENTS {
        let api = workload.customer.with_client(api::client(1)?);
        tasks.push(tokio::spawn(one_transfer_client(
            api,
            workload.accounts.clone(),
            deadline,
        )));
    }
    let mut latencies = histogram();
    let (mut statuses, mut rejected, mut not_final, mut count) = (Statuses::new(), 0, 0, 0);
    for task in tasks {
        let finals = task.await.context("a one-transfer client panicked")?;
        workload.accept(&finals.accepted, finals.furthest);
        count += finals.accepted.len();
        latencies
            .add(&finals.latencies)
            .context("merging latencies")?;
        for (status, n) in finals.statuses {
            *statuses.entry(status).or_default() += n;
        }
        rejected += finals.rejected;
        not_final += finals.not_final;
    }
    run.push(Figure::new(
        "one transfer p50",
        millis(&latencies, 0.5),
        Unit::Millis,
    ));
    run.push(
        Figure::new("one transfer p99", millis(&latencies, 0.99), Unit::Millis)
            .target(Target::AtMost(50.0)),
    );
    run.push(
        Figure::new(
            "one transfer non-2xx answers",
            total(&statuses),
            Unit::Count,
        )
        .target(Target::Zero),
    );
    run.notes.push(format!(
        "one transfer: {count} transfers by {ONE_TRANSFER_CLIENTS} clients, {} final \
         (REJECTED among them: {rejected}, not final within {FINAL_WITHIN:?}: {not_final}); \
         non-2xx: {}",
        latencies.len(),
        describe(&statuses)
    ));
    Ok(())
}

/// What the paced lag load got.
#[derive(Default)]
struct LagTally {
    accepted: Vec<Uuid>,
    furthest: Option<Position>,
    statuses: Statuses,
    /// Requests not sent at their time because [`LAG_IN_FLIGHT_MAX`] were in flight.
    not_sent: u64,
}

/// Offers `rate` transfers/s, paced (open loop), for `duration`.
async fn offer_paced(
    customer: &Api,
    accounts: &[Uuid],
    rate: f64,
    duration: Duration,
) -> anyhow::Result<LagTally> {
    let tally = Arc::new(Mutex::new(LagTally::default()));
    let in_flight = Arc::new(Semaphore::new(LAG_IN_FLIGHT_MAX));
    let api = customer.with_client(api::client(LAG_IN_FLIGHT_MAX)?);
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut rng = StdRng::from_os_rng();
    let started = Instant::now();
    let mut next = started;
    while next < started + duration {
        tokio::time::sleep_until(next.into()).await;
        next += period;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tally.lock().expect("no holder panics").not_sent += 1;
            continue;
        };
        let (api, tally) = (api.clone(), tally.clone());
        let body = api::random_transfer(&mut rng, accounts);
        tokio::spawn(async move {
            let posted = api.post_transaction(body).await;
            let mut tally = tally.lock().expect("no holder panics");
            match posted {
                Posted::Accepted { id, position, .. } => {
                    tally.accepted.push(id);
                    tally.furthest = tally.furthest.max(position);
                }
                Posted::Refused(status) => {
                    *tally
                        .statuses
                        .entry(format!("POST {}", status.as_u16()))
                        .or_default() += 1;
                }
                Posted::Failed => {
                    *tally
                        .statuses
                        .entry("POST no answer".to_owned())
                        .or_default() += 1
                }
            }
            drop(permit);
        });
    }
    let all = u32::try_from(LAG_IN_FLIGHT_MAX).expect("the in-flight bound fits in u32");
    let _everything_answered = in_flight
        .acquire_many(all)
        .await
        .context("waiting for answers")?;
    let tally = std::mem::take(&mut *tally.lock().expect("no holder panics"));
    Ok(tally)
}

/// Samples the lag every [`LAG_SAMPLE_INTERVAL`] for `duration`: (seconds since start, ms).
async fn sample_lag<S: SystemUnderTest>(
    system: &S,
    duration: Duration,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut interval = tokio::time::interval(LAG_SAMPLE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < duration {
        interval.tick().await;
        let age = system.oldest_unprojected_age().await?;
        samples.push((started.elapsed().as_secs_f64(), age.as_secs_f64() * 1_000.0));
    }
    Ok(samples)
}

fn mean_between(samples: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let window: Vec<f64> = samples
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, ms)| *ms)
        .collect();
    if window.is_empty() {
        return 0.0;
    }
    window.iter().sum::<f64>() / window.len() as f64
}

/// The lag phase: [`LAG_RATE_FRACTION`] × `settled_rate` offered, paced, while the lag is
/// sampled; then the backlog is left to settle.
pub async fn lag_phase<S: SystemUnderTest>(
    run: &mut Run,
    system: &S,
    workload: &mut Workload,
    settled_rate: f64,
    duration: Duration,
) -> anyhow::Result<()> {
    let rate = LAG_RATE_FRACTION * settled_rate;
    ensure!(rate > 0.0, "no settled rate to offer a fraction of");
    let started = Instant::now();
    let (tally, samples) = tokio::join!(
        offer_paced(&workload.customer, &workload.accounts, rate, duration),
        sample_lag(system, duration)
    );
    let (tally, samples) = (tally?, samples?);
    workload.accept(&tally.accepted, tally.furthest);
    let drained = wait_settled(workload, started).await?;
    let mut ages = histogram();
    for (_, ms) in &samples {
        record(&mut ages, Duration::from_secs_f64(ms / 1_000.0));
    }
    let seconds = duration.as_secs_f64();
    let window = LAG_GROWTH_WINDOW.as_secs_f64().min(seconds / 3.0);
    let first = mean_between(&samples, 0.0, window);
    let last = mean_between(&samples, seconds - window, seconds);
    let growing = last > first * LAG_GROWTH_FACTOR && last - first > LAG_GROWTH_MIN_MS;
    run.push(Figure::new("lag offered", rate, Unit::PerSecond));
    run.push(Figure::new("lag p50", millis(&ages, 0.5), Unit::Millis));
    run.push(
        Figure::new("lag p99", millis(&ages, 0.99), Unit::Millis).target(Target::AtMost(100.0)),
    );
    run.push(Figure::new(
        "lag max",
        ages.max() as f64 / 1_000.0,
        Unit::Millis,
    ));
    run.push(Figure::new("lag mean, first window", first, Unit::Millis));
    run.push(Figure::new("lag mean, last window", last, Unit::Millis));
    run.push(
        Figure::new("lag growing", f64::from(u8::from(growing)), Unit::Flag).target(Target::No),
    );
    run.push(
        Figure::new("lag non-2xx answers", total(&tally.statuses), Unit::Count)
            .target(Target::Zero),
    );
    run.notes.push(format!(
        "lag: offered {rate:.0}/s for {seconds:.0} s ({} accepted, {} not sent because \
         {LAG_IN_FLIGHT_MAX} were in flight); {} samples; windows of {window:.0} s; \
         none PENDING {:.1} s after the first POST; non-2xx: {}",
        tally.accepted.len(),
        tally.not_sent,
        samples.len(),
        drained.as_secs_f64(),
        describe(&tally.statuses)
    ));
    Ok(())
}

/// `connections` clients GETting transaction `id` for `duration`: (200s/s, latencies, others).
async fn get_closed_loop(
    customer: &Api,
    id: Uuid,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<(f64, Histogram<u64>, Statuses)> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let api = customer.with_client(api::client(1)?);
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut statuses, mut ok) = (histogram(), Statuses::new(), 0_u64);
            while Instant::now() < deadline {
                match api.get_transaction(id).await {
                    Some((status, latency)) if status.is_success() => {
                        ok += 1;
                        record(&mut latencies, latency);
                    }
                    Some((status, _)) => {
                        *statuses
                            .entry(format!("GET {}", status.as_u16()))
                            .or_default() += 1;
                    }
                    None => *statuses.entry("GET no answer".to_owned()).or_default() += 1,
                }
            }
            (ok, latencies, statuses)
        }));
    }
    let (mut ok, mut latencies, mut statuses) = (0, histogram(), Statuses::new());
    for task in tasks {
        let (count, histogram, answers) = task.await.context("a GET client panicked")?;
        ok += count;
        latencies.add(&histogram).context("merging latencies")?;
        for (status, n) in answers {
            *statuses.entry(status).or_default() += n;
        }
    }
    Ok((
        ok as f64 / started.elapsed().as_secs_f64(),
        latencies,
        statuses,
    ))
}

/// The GET phase: one transaction, at 32 connections for throughput, then at 8 for latency.
pub async fn get_phase(
    run: &mut Run,
    workload: &Workload,
    duration: Duration,
) -> anyhow::Result<()> {
    let id = *workload
        .accepted
        .last()
        .context("no transaction was accepted")?;
    // Once, so the measured reads find it cached as any popular transaction would be.
    workload.customer.get_transaction(id).await;
    let (rate, wide, mut statuses) =
        get_closed_loop(&workload.customer, id, GET_CONNECTIONS_THROUGHPUT, duration).await?;
    let (narrow_rate, narrow, more) =
        get_closed_loop(&workload.customer, id, GET_CONNECTIONS_LATENCY, duration).await?;
    for (status, n) in more {
        *statuses.entry(status).or_default() += n;
    }
    run.push(
        Figure::new("GET at 32 connections", rate, Unit::PerSecond)
            .target(Target::AtLeast(10_000.0)),
    );
    run.push(Figure::new(
        "GET p99 at 32 connections",
        millis(&wide, 0.99),
        Unit::Millis,
    ));
    run.push(Figure::new(
        "GET at 8 connections",
        narrow_rate,
        Unit::PerSecond,
    ));
    run.push(Figure::new(
        "GET p50 at 8 connections",
        millis(&narrow, 0.5),
        Unit::Millis,
    ));
    run.push(
        Figure::new(
            "GET p99 at 8 connections",
            millis(&narrow, 0.99),
            Unit::Millis,
        )
        .target(Target::AtMost(5.0)),
    );
    run.push(
        Figure::new("GET non-2xx answers", total(&statuses), Unit::Count).target(Target::Zero),
    );
    run.notes
        .push(format!("GET: non-2xx: {}", describe(&statuses)));
    Ok(())
}

/// Whether any transfer ended REJECTED (as of the furthest accepted position).
pub async fn any_rejected(run: &mut Run, workload: &Workload) -> anyhow::Result<()> {
    let none = workload
        .customer
        .none_with_status("REJECTED", workload.furthest)
        .await?;
    let rejected = match none {
        Ok(none) => !none,
        Err(status) => bail!("listing REJECTED transactions answered {status}"),
    };
    run.push(
        Figure::new(
            "any transaction REJECTED",
            f64::from(u8::from(rejected)),
            Unit::Flag,
        )
        .target(Target::No),
    );
    Ok(())
}

/// Every 202 of the run names a transaction the log holds (checked with the services stopped).
pub async fn durability<S: SystemUnderTest>(
    run: &mut Run,
    system: &S,
    workload: &Workload,
) -> anyhow::Result<()> {
    let missing = system.missing_transactions(&workload.accepted).await?;
    run.push(Figure::new(
        "202s checked",
        workload.accepted.len() as f64,
        Unit::Count,
    ));
    run.push(
        Figure::new(
            "202s naming no transaction",
            missing.len() as f64,
            Unit::Count,
        )
        .target(Target::Zero),
    );
    if let Some(first) = missing.first() {
        run.notes.push(format!(
            "durability: {} accepted transactions are not in the log, e.g. {first}",
            missing.len()
        ));
    }
    Ok(())
}

/// Runs the release `ledger` CLI with `arguments` under `environment`: (wall time, exit code).
async fn ledger(
    arguments: &[&str],
    environment: &[(&'static str, String)],
) -> anyhow::Result<(Duration, Option<i32>, String)> {
    let program = crate::service::binary("ledger")?;
    let started = Instant::now();
    let output = tokio::process::Command::new(program)
        .args(arguments)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(
            environment
                .iter()
                .map(|(key, value)| (*key, value.as_str())),
        )
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ledger")?;
    let elapsed = started.elapsed();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((elapsed, output.status.code(), printed))
}

/// The rebuild phase, with the services stopped: a seeded log, then `ledger rebuild` (every
/// projection, then the switch) and `ledger verify`, each timed.
pub async fn rebuild_phase<S: SystemUnderTest>(
    run: &mut Run,
    system: &mut S,
    events: usize,
) -> anyhow::Result<()> {
    let seeded = system.seed_log(events).await?;
    let arguments = |command: &'static str| {
        std::iter::once(command)
            .chain(seeded.cli_arguments.iter().map(String::as_str))
            .collect::<Vec<&str>>()
    };
    let (rebuilt, code, printed) = ledger(&arguments("rebuild"), &seeded.cli_environment).await?;
    ensure!(
        code == Some(0),
        "ledger rebuild failed ({code:?}):\n{printed}"
    );
    let summary: Vec<&str> = printed
        .lines()
        .filter(|line| line.contains("is live"))
        .collect();
    let (verified, code, verify_printed) =
        ledger(&arguments("verify"), &seeded.cli_environment).await?;
    ensure!(
        matches!(code, Some(0 | 1)),
        "ledger verify could not run ({code:?}):\n{verify_printed}"
    );
    let passed = code == Some(0);
    run.push(Figure::new("log events", seeded.events as f64, Unit::Count));
    run.push(
        Figure::new(
            "rebuild, all projections",
            rebuilt.as_secs_f64(),
            Unit::Seconds,
        )
        .target(Target::AtMost(15.0)),
    );
    run.push(
        Figure::new("verify", verified.as_secs_f64(), Unit::Seconds).target(Target::AtMost(15.0)),
    );
    run.push(
        Figure::new("verify passed", f64::from(u8::from(passed)), Unit::Flag).target(Target::Yes),
    );
    run.notes.push(format!(
        "rebuild: {} events generated in {:.1} s, inserted in {:.1} s; {}",
        seeded.events,
        seeded.generated.as_secs_f64(),
        seeded.inserted.as_secs_f64(),
        summary.join("; ")
    ));
    if !passed {
        let head: Vec<&str> = verify_printed.lines().take(20).collect();
        run.notes
            .push(format!("verify found problems:\n{}", head.join("\n")));
    }
    Ok(())
}
