//! Benchmark of command-api's write side: `cargo bench -p command-api --bench transfers`.
//!
//! Starts the real app (router, saga, relay, decision consumer, event store) on a scratch
//! PostgreSQL database and its own RabbitMQ topology, as the integration tests do, and measures
//! two things. First, transfers posted over HTTP by concurrent
//! clients (spread over many accounts, then all out of one hot account), and how long the saga
//! then needs until every one of them is reserved or rejected: the request only appends
//! `TransactionCreated`, so its latency is not the time to move money. Second, how long an
//! account takes to load through the three `AggregateStore` configurations (full replay,
//! snapshots only, snapshots and a warm cache) for a short and a long stream. The results are
//! printed as tables; `docs/benchmarks.md` explains what they mean and what they do not.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use chrono::Utc;
use command_api::aggregates::AccountAggregate;
use command_api::store::{AggregateStore, Executed, SNAPSHOT_EVERY};
use command_api::testing::{TestApp, TestOptions, delete_topology, spawn_app_on_scratch};
use domain::{
    AccountCommand, AccountId, Amount, Currency, CustomerId, FraudDecision, FraudOutcome,
    TransactionId,
};
use hdrhistogram::Histogram;
use infra::auth::Role;
use infra::eventlog::EventLog;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// Measured transfers per scenario unless `BENCH_TRANSFERS` says otherwise: enough for a stable
/// p99 (50 samples above it) while a run of both scenarios stays within a few minutes.
const TRANSFERS_DEFAULT: usize = 5_000;

/// The environment variable that overrides [`TRANSFERS_DEFAULT`].
const TRANSFERS_VARIABLE: &str = "BENCH_TRANSFERS";

/// Concurrent client tasks, each with one request in flight at a time.
const CLIENT_TASKS: usize = 32;

/// Transfers posted (and drained by the saga) before each measured run, so connections, caches
/// and PostgreSQL's buffers are warm. Not recorded.
const WARM_UP_TRANSFERS: usize = 500;

/// Accounts the spread scenario picks random source and destination pairs from; the hot
/// scenario sends to them too.
const SPREAD_ACCOUNTS: usize = 64;

/// Every account is funded with this much before measuring, far more than the transfers can
/// spend (at most [`TRANSFER_MINOR_MAX`] each), so no transfer is refused for lack of funds.
const FUNDING_AMOUNT: &str = "1000000.00";

/// Transfers move a random amount between 0.01 and this many minor units (1.00).
const TRANSFER_MINOR_MAX: i64 = 100;

/// The currency of every account and transfer.
const CURRENCY: &str = "USD";

/// Fraud decisions are never sent for the measured transfers, so they wait for one. A day (the
/// configuration's maximum) keeps the saga from rejecting them on timeout in the middle of the
/// run, which would add release work to later measurements.
const DECISION_TIMEOUT_SECONDS: u64 = 86_400;

/// Longest a single request may take before the client gives up (counted as an error).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long funding or a saga drain may take before the benchmark fails instead of hanging.
const WAIT_DEADLINE: Duration = Duration::from_secs(900);

/// How often the drain is checked. The check reads only the still-unreserved transactions'
/// streams by primary key, so polling this often costs PostgreSQL little; it is also the
/// resolution of the drain time.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Latencies above this (a minute, in microseconds) are recorded as this.
const LATENCY_MICROS_MAX: u64 = 60_000_000;

/// Significant decimal digits the histograms keep (0.1 % resolution).
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

/// The short and long account streams whose load time is measured.
const SHORT_STREAM_EVENTS: u64 = 10;

/// See [`SHORT_STREAM_EVENTS`]. A multiple of the snapshot interval, so a snapshot sits exactly
/// at the end of the stream: the best case for a cold load.
const LONG_STREAM_EVENTS: u64 = 10_000;

const _: () = assert!(
    LONG_STREAM_EVENTS.is_multiple_of(SNAPSHOT_EVERY),
    "the long stream must end on a snapshot"
);

/// The long stream again with as many events after its last snapshot as a stream can have
/// (10,099 while `SNAPSHOT_EVERY` is 100): the worst case for a cold load.
const LONG_STREAM_WITH_TAIL_EVENTS: u64 = LONG_STREAM_EVENTS + SNAPSHOT_EVERY - 1;

/// Timed loads per stream and store.
const LOADS_PER_STORE: usize = 200;

/// Untimed loads before the timed ones, so the stream's pages are in PostgreSQL's buffers.
const LOAD_WARM_UPS: usize = 5;

#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// Random distinct source and destination among the spread accounts.
    Spread,
    /// Every transfer leaves the hot account, towards a random spread account.
    Hot,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Spread => "spread (64 accounts)",
            Scenario::Hot => "hot (1 source)",
        }
    }
}

/// What the client side needs to call the app: cheap to clone into each client task.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    address: String,
    /// A customer's token: that customer owns every account, so every transfer is allowed.
    token: String,
    /// The payment rail's token: money enters through it (SPEC §5).
    operator_token: String,
}

/// The funded accounts transfers move money between.
struct Accounts {
    spread: Vec<Uuid>,
    hot: Uuid,
}

/// What one client task saw.
struct ClientOutcome {
    latency: Histogram<u64>,
    /// Ids of the transactions the app accepted (202).
    accepted: Vec<Uuid>,
    errors: usize,
    error_example: Option<String>,
}

/// The measurements of one scenario.
struct TransferReport {
    scenario: Scenario,
    requests: usize,
    errors: usize,
    error_example: Option<String>,
    posting: Duration,
    latency: Histogram<u64>,
    /// From the last response until the saga had reserved or rejected every accepted transfer.
    drain_after_posting: Duration,
    /// From the first request until the saga had reserved or rejected every accepted transfer.
    drain_total: Duration,
    reserved: i64,
    rejected: i64,
}

/// The load-time measurements of one stream through one store.
struct LoadReport {
    events: u64,
    store: &'static str,
    /// Events `load` reads past its starting point (the cache entry, the snapshot, or zero).
    events_read: u64,
    latency: Histogram<u64>,
}

/// Where the numbers were taken.
struct MachineContext {
    commit: String,
    cores: String,
    cpu: String,
    load_average_start: String,
    postgres: String,
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let transfers = transfers_from_env()?;
    let options = TestOptions {
        decision_timeout_seconds: DECISION_TIMEOUT_SECONDS,
        ..TestOptions::default()
    };
    let (database, mut app) = spawn_app_on_scratch(&options)
        .await
        .context("starting command-api on a scratch database")?;
    let measured = measure(&app, transfers).await;
    app.stop().await;
    let dropped = database.drop_database().await;
    let deleted = delete_topology(&options.amqp_prefix).await;
    let (context, transfer_reports, load_reports) = measured?;
    print_report(
        &context,
        &options,
        transfers,
        &transfer_reports,
        &load_reports,
    );
    dropped.context("dropping the scratch database")?;
    deleted.context("deleting the benchmark's RabbitMQ topology")?;
    Ok(())
}

fn transfers_from_env() -> anyhow::Result<usize> {
    match std::env::var(TRANSFERS_VARIABLE) {
        Ok(text) => {
            let transfers: usize = text
                .parse()
                .with_context(|| format!("{TRANSFERS_VARIABLE} must be a count, not {text:?}"))?;
            ensure!(transfers > 0, "{TRANSFERS_VARIABLE} must be at least 1");
            Ok(transfers)
        }
        Err(_) => Ok(TRANSFERS_DEFAULT),
    }
}

async fn measure(
    app: &TestApp,
    transfers: usize,
) -> anyhow::Result<(MachineContext, Vec<TransferReport>, Vec<LoadReport>)> {
    let context = MachineContext::read(&app.pool).await;
    let api = Api {
        client: reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(CLIENT_TASKS)
            .build()
            .context("building the HTTP client")?,
        address: app.address.clone(),
        token: app.token(Uuid::new_v4(), &[Role::Customer]),
        operator_token: app.token(Uuid::new_v4(), &[Role::Operator]),
    };
    eprintln!("funding {} accounts…", SPREAD_ACCOUNTS + 1);
    let accounts = Arc::new(fund_accounts(app, &api).await?);
    let mut transfer_reports = Vec::new();
    for scenario in [Scenario::Spread, Scenario::Hot] {
        eprintln!("{}: warm-up…", scenario.name());
        post_and_drain(&api, &accounts, &app.pool, scenario, WARM_UP_TRANSFERS).await?;
        eprintln!("{}: measuring {transfers} transfers…", scenario.name());
        let report = post_and_drain(&api, &accounts, &app.pool, scenario, transfers).await?;
        transfer_reports.push(report);
    }
    let load_reports = measure_loads(&app.pool, &app.database_url).await?;
    Ok((context, transfer_reports, load_reports))
}

// ---------------------------------------------------------------------------------------------
// Transfers through the HTTP API.

/// Opens and funds the spread accounts and the hot one, concurrently, until every deposit is
/// approved and settled.
async fn fund_accounts(app: &TestApp, api: &Api) -> anyhow::Result<Accounts> {
    let funded = (0..=SPREAD_ACCOUNTS).map(|_| async {
        let account = open_account(api).await?;
        let deposit = post_transaction_as(
            api,
            &api.operator_token,
            &json!({"type": "deposit", "amount": FUNDING_AMOUNT, "currency": CURRENCY,
                    "destination_account_id": account}),
        )
        .await?;
        approve(app, deposit).await?;
        anyhow::Ok((account, deposit))
    });
    let funded = futures::future::try_join_all(funded).await?;
    let deposits: Vec<Uuid> = funded.iter().map(|(_, deposit)| *deposit).collect();
    wait_until_none_left(&app.pool, deposits, &["SettlementCompleted"]).await?;
    let mut accounts: Vec<Uuid> = funded.into_iter().map(|(account, _)| account).collect();
    let hot = accounts
        .pop()
        .expect("SPREAD_ACCOUNTS + 1 accounts were opened");
    Ok(Accounts {
        spread: accounts,
        hot,
    })
}

async fn open_account(api: &Api) -> anyhow::Result<Uuid> {
    let response = api
        .client
        .post(format!("{}/api/v1/accounts", api.address))
        .bearer_auth(&api.token)
        .json(&json!({ "currency": CURRENCY }))
        .send()
        .await
        .context("opening an account")?;
    ensure!(
        response.status() == StatusCode::CREATED,
        "opening an account answered {}",
        response.status()
    );
    id_of(response.json().await.context("reading an opened account")?)
}

/// Posts one transaction as the customer with a fresh idempotency key and returns its id (202
/// expected).
async fn post_transaction(api: &Api, body: &Value) -> anyhow::Result<Uuid> {
    post_transaction_as(api, &api.token, body).await
}

/// [`post_transaction`] with another caller's token.
async fn post_transaction_as(api: &Api, token: &str, body: &Value) -> anyhow::Result<Uuid> {
    let response = api
        .client
        .post(format!("{}/api/v1/transactions", api.address))
        .bearer_auth(token)
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .json(body)
        .send()
        .await
        .context("posting a transaction")?;
    let status = response.status();
    if status != StatusCode::ACCEPTED {
        let detail = response.text().await.unwrap_or_default();
        return Err(anyhow!("posting a transaction answered {status}: {detail}"));
    }
    id_of(response.json().await.context("reading a transaction")?)
}

fn id_of(body: Value) -> anyhow::Result<Uuid> {
    let id = body["id"]
        .as_str()
        .ok_or_else(|| anyhow!("the response has no id: {body}"))?;
    Uuid::parse_str(id).context("the response's id is not a UUID")
}

/// Records an approving fraud decision, as the fraud worker's message would.
async fn approve(app: &TestApp, transaction: Uuid) -> anyhow::Result<()> {
    let decision = FraudDecision {
        outcome: FraudOutcome::Approved,
        rule: Some("benchmark".to_owned()),
        details: json!({}).into(),
    };
    let metadata = command_api::metadata::for_saga(
        &transaction.to_string(),
        "benchmark",
        format!("decision/{transaction}"),
    );
    app.decisions
        .record(TransactionId(transaction), decision, &metadata)
        .await
        .context("recording a fraud decision")?;
    Ok(())
}

/// Posts `total` transfers from [`CLIENT_TASKS`] concurrent clients, then waits until the saga
/// has reserved or rejected every accepted one.
async fn post_and_drain(
    api: &Api,
    accounts: &Arc<Accounts>,
    pool: &PgPool,
    scenario: Scenario,
    total: usize,
) -> anyhow::Result<TransferReport> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENT_TASKS)
        .map(|client| {
            let seed = u64::try_from(client).expect("a client index fits in u64");
            tokio::spawn(client_loop(
                api.clone(),
                accounts.clone(),
                scenario,
                total,
                next.clone(),
                StdRng::seed_from_u64(seed),
            ))
        })
        .collect();
    let mut latency = new_histogram()?;
    let (mut accepted, mut errors, mut error_example) = (Vec::new(), 0, None);
    for client in clients {
        let outcome = client.await.context("a client task panicked")??;
        latency
            .add(&outcome.latency)
            .context("merging histograms")?;
        accepted.extend(outcome.accepted);
        errors += outcome.errors;
        error_example = error_example.or(outcome.error_example);
    }
    let posting = started.elapsed();
    let count = accepted.len();
    wait_until_none_left(pool, accepted.clone(), &DRAINED_EVENTS).await?;
    let drain_total = started.elapsed();
    let (reserved, rejected) = outcomes(pool, &accepted).await?;
    ensure!(
        usize::try_from(reserved + rejected).ok() == Some(count),
        "{count} accepted, but {reserved} reserved and {rejected} rejected"
    );
    Ok(TransferReport {
        scenario,
        requests: total,
        errors,
        error_example,
        posting,
        latency,
        drain_after_posting: drain_total.saturating_sub(posting),
        drain_total,
        reserved,
        rejected,
    })
}

/// The events that end the saga's first step: the money is held (and the credit reserved), or
/// the transaction was turned down.
const DRAINED_EVENTS: [&str; 2] = ["FundsReserved", "TransactionRejected"];

/// One client: takes request numbers until `total` are taken, one request in flight at a time.
async fn client_loop(
    api: Api,
    accounts: Arc<Accounts>,
    scenario: Scenario,
    total: usize,
    next: Arc<AtomicUsize>,
    mut rng: StdRng,
) -> anyhow::Result<ClientOutcome> {
    let mut outcome = ClientOutcome {
        latency: new_histogram()?,
        accepted: Vec::new(),
        errors: 0,
        error_example: None,
    };
    while next.fetch_add(1, Ordering::Relaxed) < total {
        let body = transfer_body(scenario, &accounts, &mut rng);
        let started = Instant::now();
        let result = post_transaction(&api, &body).await;
        record(&mut outcome.latency, started.elapsed());
        match result {
            Ok(id) => outcome.accepted.push(id),
            Err(error) => {
                outcome.errors += 1;
                outcome.error_example.get_or_insert(format!("{error:#}"));
            }
        }
    }
    Ok(outcome)
}

fn transfer_body(scenario: Scenario, accounts: &Accounts, rng: &mut StdRng) -> Value {
    let count = accounts.spread.len();
    let (source, destination) = match scenario {
        Scenario::Spread => {
            let source = rng.random_range(0..count);
            // Drawn from the other count - 1 accounts, so the pair is never one account twice.
            let mut destination = rng.random_range(0..count - 1);
            if destination >= source {
                destination += 1;
            }
            (accounts.spread[source], accounts.spread[destination])
        }
        Scenario::Hot => (accounts.hot, accounts.spread[rng.random_range(0..count)]),
    };
    let minor = rng.random_range(1..=TRANSFER_MINOR_MAX);
    json!({
        "type": "transfer",
        "amount": format!("{}.{:02}", minor / 100, minor % 100),
        "currency": CURRENCY,
        "source_account_id": source,
        "destination_account_id": destination,
    })
}

/// Waits until every transaction in `waiting` has one of `event_types`, reading only the streams
/// still waiting at each poll.
async fn wait_until_none_left(
    pool: &PgPool,
    waiting: Vec<Uuid>,
    event_types: &[&str],
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut waiting: Vec<String> = waiting.iter().map(Uuid::to_string).collect();
    let event_types: Vec<String> = event_types.iter().map(|&name| name.to_owned()).collect();
    while !waiting.is_empty() {
        let done: HashSet<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM command_api.events \
             WHERE aggregate_type = 'transaction' AND aggregate_id = ANY($1) \
             AND event_type = ANY($2)",
        )
        .bind(&waiting)
        .bind(&event_types)
        .fetch_all(pool)
        .await
        .context("reading which transactions the saga has reached")?
        .into_iter()
        .collect();
        waiting.retain(|id| !done.contains(id));
        ensure!(
            started.elapsed() < WAIT_DEADLINE,
            "{} transactions still lack {event_types:?} after {WAIT_DEADLINE:?}",
            waiting.len()
        );
        if !waiting.is_empty() {
            tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
        }
    }
    Ok(())
}

/// How many of `ids` were reserved and how many rejected.
async fn outcomes(pool: &PgPool, ids: &[Uuid]) -> anyhow::Result<(i64, i64)> {
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event_type = 'FundsReserved'), \
                count(*) FILTER (WHERE event_type = 'TransactionRejected') \
         FROM command_api.events \
         WHERE aggregate_type = 'transaction' AND aggregate_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await
    .context("counting the saga's outcomes")?;
    Ok(counts)
}

// ---------------------------------------------------------------------------------------------
// Account load time through the three store configurations.

async fn measure_loads(pool: &PgPool, url: &str) -> anyhow::Result<Vec<LoadReport>> {
    let log: Arc<dyn EventLog> = Arc::new(
        PgEventLog::open(
            pool.clone(),
            PgEventLogOptions::writer(
                "command_api",
                infra::db::connect_options(url, "command_api")?,
            ),
        )
        .await?,
    );
    let writer = AggregateStore::<AccountAggregate>::new(log.clone());
    let mut reports = Vec::new();
    eprintln!("building a {SHORT_STREAM_EVENTS}-event account…");
    let short = open_account_stream(&writer).await?;
    append_credits(&writer, short, SHORT_STREAM_EVENTS - 1).await?;
    reports.extend(time_stores(pool, &log, short, SHORT_STREAM_EVENTS).await?);
    eprintln!("building a {LONG_STREAM_EVENTS}-event account…");
    let long = open_account_stream(&writer).await?;
    append_credits(&writer, long, LONG_STREAM_EVENTS - 1).await?;
    reports.extend(time_stores(pool, &log, long, LONG_STREAM_EVENTS).await?);
    append_credits(
        &writer,
        long,
        LONG_STREAM_WITH_TAIL_EVENTS - LONG_STREAM_EVENTS,
    )
    .await?;
    reports.extend(time_stores(pool, &log, long, LONG_STREAM_WITH_TAIL_EVENTS).await?);
    Ok(reports)
}

async fn open_account_stream(
    store: &AggregateStore<AccountAggregate>,
) -> anyhow::Result<AccountId> {
    let id = AccountId(Uuid::now_v7());
    let command = AccountCommand::Open {
        account_id: id,
        owner_id: CustomerId(Uuid::new_v4()),
        currency: Currency::from_code(CURRENCY).context("the benchmark's currency")?,
        name: None,
        at: Utc::now(),
    };
    execute(store, id, command).await?;
    Ok(id)
}

/// Appends `events` events: ReserveCredit/PostCredit pairs, and a last ReserveCredit left
/// pending when `events` is odd.
async fn append_credits(
    store: &AggregateStore<AccountAggregate>,
    id: AccountId,
    events: u64,
) -> anyhow::Result<()> {
    let amount = Amount::from_minor(1).context("one minor unit is a valid amount")?;
    let mut transaction_id = TransactionId(Uuid::new_v4());
    for index in 0..events {
        let at = Utc::now();
        let command = if index % 2 == 0 {
            transaction_id = TransactionId(Uuid::new_v4());
            AccountCommand::ReserveCredit {
                transaction_id,
                amount,
                at,
            }
        } else {
            AccountCommand::PostCredit { transaction_id, at }
        };
        execute(store, id, command).await?;
    }
    Ok(())
}

async fn execute(
    store: &AggregateStore<AccountAggregate>,
    id: AccountId,
    command: AccountCommand,
) -> anyhow::Result<()> {
    let metadata =
        command_api::metadata::for_saga("benchmark", "benchmark", Uuid::new_v4().to_string());
    match store
        .execute(&id.to_string(), command, &metadata)
        .await
        .context("appending account events")?
    {
        Executed::Appended { .. } => Ok(()),
        other => Err(anyhow!(
            "the account did not take a benchmark command: {other:?}"
        )),
    }
}

/// Times `load` of one stream through a full replay, snapshots only, and a warm cache, after
/// checking that all three agree.
async fn time_stores(
    pool: &PgPool,
    log: &Arc<dyn EventLog>,
    id: AccountId,
    events: u64,
) -> anyhow::Result<Vec<LoadReport>> {
    let stream = id.to_string();
    let after_snapshot = events - snapshot_sequence(pool, &stream).await?;
    // Each store with the events its `load` reads past its starting point.
    let stores = [
        (
            "full_replay",
            AggregateStore::<AccountAggregate>::full_replay(log.clone()),
            events,
        ),
        (
            "snapshots_only",
            AggregateStore::<AccountAggregate>::snapshots_only(log.clone()),
            after_snapshot,
        ),
        (
            "new (warm cache)",
            AggregateStore::<AccountAggregate>::new(log.clone()),
            0,
        ),
    ];
    let reference = stores[0].1.load(&stream).await.context("loading")?;
    ensure!(
        reference.1 == events,
        "the stream has {} events",
        reference.1
    );
    let mut reports = Vec::new();
    for (name, store, events_read) in stores {
        // The first warm-up load also fills the cache of the `new` store.
        for _ in 0..LOAD_WARM_UPS {
            let loaded = store.load(&stream).await.context("loading an account")?;
            ensure!(loaded == reference, "{name} loads another state");
        }
        let mut latency = new_histogram()?;
        for _ in 0..LOADS_PER_STORE {
            let started = Instant::now();
            let loaded = store.load(&stream).await.context("loading an account")?;
            record(&mut latency, started.elapsed());
            std::hint::black_box(loaded);
        }
        reports.push(LoadReport {
            events,
            store: name,
            events_read,
            latency,
        });
    }
    Ok(reports)
}

async fn snapshot_sequence(pool: &PgPool, stream: &str) -> anyhow::Result<u64> {
    let sequence: Option<i64> = sqlx::query_scalar(
        "SELECT sequence FROM command_api.aggregate_snapshots \
         WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(stream)
    .fetch_optional(pool)
    .await
    .context("reading a snapshot's sequence")?;
    Ok(sequence.map_or(0, |sequence| {
        u64::try_from(sequence).expect("a snapshot sequence is positive")
    }))
}

// ---------------------------------------------------------------------------------------------
// Measuring and printing.

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, HISTOGRAM_SIGNIFICANT_DIGITS)
        .context("histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// A histogram value in microseconds, printed in milliseconds.
fn milliseconds(micros: u64) -> String {
    format!("{}.{:03}", micros / 1_000, micros % 1_000)
}

fn quantile(histogram: &Histogram<u64>, quantile: f64) -> String {
    milliseconds(histogram.value_at_quantile(quantile))
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

impl MachineContext {
    async fn read(pool: &PgPool) -> MachineContext {
        let postgres: Option<String> = sqlx::query_scalar("SHOW server_version")
            .fetch_one(pool)
            .await
            .ok();
        MachineContext {
            commit: commit(),
            cores: std::thread::available_parallelism()
                .map_or_else(|_| "unknown".to_owned(), |cores| cores.to_string()),
            cpu: cpu_model().unwrap_or_else(|| "unknown".to_owned()),
            load_average_start: load_average(),
            postgres: postgres.unwrap_or_else(|| "unknown".to_owned()),
        }
    }
}

/// The short commit hash, marked when the working tree differs from it.
fn commit() -> String {
    let git = |arguments: &[&str]| {
        std::process::Command::new("git")
            .args(arguments)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(hash) if !hash.is_empty() => match git(&["status", "--porcelain"]) {
            Some(changes) if !changes.is_empty() => format!("{hash} (with uncommitted changes)"),
            _ => hash,
        },
        _ => "unknown".to_owned(),
    }
}

fn cpu_model() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

/// The 1, 5 and 15 minute load averages: on a shared machine, how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print_report(
    context: &MachineContext,
    options: &TestOptions,
    transfers: usize,
    transfer_reports: &[TransferReport],
    load_reports: &[LoadReport],
) {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!();
    println!("command-api benchmark");
    println!("  commit          {}", context.commit);
    println!(
        "  machine         {} cores, {}; build {profile}",
        context.cores, context.cpu
    );
    println!(
        "  load average    {} at start, {} at end (1/5/15 min)",
        context.load_average_start,
        load_average()
    );
    println!("  postgres        {}", context.postgres);
    println!(
        "  app             saga_concurrency {}, database_max_connections {}, in the benchmark's process",
        options.saga_concurrency, options.database_max_connections
    );
    println!(
        "  load            {CLIENT_TASKS} client tasks, {WARM_UP_TRANSFERS} warm-up then {transfers} measured transfers per scenario"
    );
    print_transfers(transfer_reports);
    print_loads(load_reports);
}

fn print_transfers(reports: &[TransferReport]) {
    println!();
    println!("1. Transfers: POST /api/v1/transactions (latency in ms, client-side)");
    println!(
        "| {:<20} | {:>8} | {:>6} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} | {:>17} | {:>17} | {:>14} |",
        "scenario",
        "requests",
        "errors",
        "commands/s",
        "p50",
        "p90",
        "p99",
        "max",
        "drain after POSTs",
        "first POST→drain",
        "reserved/rej.",
    );
    println!(
        "|{:-<22}|{:->10}|{:->8}|{:->12}|{:->10}|{:->10}|{:->10}|{:->10}|{:->19}|{:->19}|{:->16}|",
        "", "", "", "", "", "", "", "", "", "", ""
    );
    for report in reports {
        let commands_per_second = report.requests as f64 / report.posting.as_secs_f64();
        let outcomes = format!("{}/{}", report.reserved, report.rejected);
        println!(
            "| {:<20} | {:>8} | {:>6} | {:>10.1} | {:>8} | {:>8} | {:>8} | {:>8} | {:>17} | {:>17} | {:>14} |",
            report.scenario.name(),
            report.requests,
            report.errors,
            commands_per_second,
            quantile(&report.latency, 0.50),
            quantile(&report.latency, 0.90),
            quantile(&report.latency, 0.99),
            milliseconds(report.latency.max()),
            seconds(report.drain_after_posting),
            seconds(report.drain_total),
            outcomes,
        );
        if let Some(example) = &report.error_example {
            println!("  first error: {example}");
        }
    }
}

fn print_loads(reports: &[LoadReport]) {
    println!();
    println!(
        "2. Account load: AggregateStore::<AccountAggregate>::load, {LOADS_PER_STORE} loads each (ms)"
    );
    println!(
        "| {:>6} | {:<16} | {:>11} | {:>8} | {:>8} | {:>8} |",
        "events", "store", "events read", "p50", "p99", "max"
    );
    println!(
        "|{:->8}|{:-<18}|{:->13}|{:->10}|{:->10}|{:->10}|",
        "", "", "", "", "", ""
    );
    for report in reports {
        println!(
            "| {:>6} | {:<16} | {:>11} | {:>8} | {:>8} | {:>8} |",
            report.events,
            report.store,
            report.events_read,
            quantile(&report.latency, 0.50),
            quantile(&report.latency, 0.99),
            milliseconds(report.latency.max()),
        );
    }
}
