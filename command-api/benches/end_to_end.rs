//! End-to-end benchmark of the write path (issue #3): transfers per second from POST until the
//! transaction is CONFIRMED, and the latency of each, with command-api and the fraud worker
//! running over real RabbitMQ, Redis and PostgreSQL on this machine.
//!
//! Run: `cargo bench -p command-api --bench end_to_end` (env `BENCH_TRANSFERS`, default 2,000).
//! A transfer is done when its `TransactionConfirmed` (or `TransactionRejected`) is committed;
//! one poller watches the store for those, so measuring costs one query every few milliseconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use command_api::testing::{TestOptions, spawn_app_on_scratch};
use futures::StreamExt;
use hdrhistogram::Histogram;
use infra::auth::Role;
use infra::log::{LogPosition, LogReader};
use serde_json::{Value, json};
use tokio::sync::{Mutex, oneshot};
use uuid::Uuid;

/// Transfers measured by default; `BENCH_TRANSFERS` overrides.
const TRANSFERS_DEFAULT: usize = 2_000;
/// Client tasks posting at once in the open-loop (saturation) run.
const CONCURRENCY: usize = 32;
/// Clients in the closed-loop run: each waits for its transfer to be final before the next, so
/// the latency is a transfer's own, not time spent queued behind a saturating load.
const CLOSED_LOOP_CLIENTS: usize = 8;
/// Transfers each closed-loop client sends.
const CLOSED_LOOP_TRANSFERS_PER_CLIENT: usize = 50;
/// Customer accounts the transfers move between (random pairs), each funded first.
const ACCOUNTS: usize = 32;
/// How often the poller looks for finished transactions.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let transfers: usize = std::env::var("BENCH_TRANSFERS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(TRANSFERS_DEFAULT);
    let options = TestOptions::default();
    let (database, mut app) = spawn_app_on_scratch(&options).await?;
    let redis_key_prefix = format!("bench:{}", Uuid::new_v4().simple());
    let worker_config = fraud_worker::testing::test_config(
        &options.amqp_prefix,
        &redis_key_prefix,
        &fraud_worker::testing::TestOptions::default(),
    );
    let worker = fraud_worker::startup::App::build(worker_config).await?;
    let (stop_worker, worker_stopped) = oneshot::channel::<()>();
    let worker_task = tokio::spawn(worker.run_until_stopped(async {
        let _ = worker_stopped.await;
    }));

    let client = reqwest::Client::new();
    let subject = Uuid::new_v4();
    let token = app.token(subject, &[Role::Customer]);
    let base = app.address.clone();
    let finished: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let poller = tokio::spawn(poll_finished(app.pool.clone(), finished.clone()));

    // Accounts, funded by deposits that go through the whole path too.
    let mut accounts = Vec::new();
    for _ in 0..ACCOUNTS {
        let body: Value = client
            .post(format!("{base}/api/v1/accounts"))
            .bearer_auth(&token)
            .json(&json!({"currency": "USD"}))
            .send()
            .await?
            .json()
            .await?;
        accounts.push(body["id"].as_str().unwrap_or_default().to_owned());
    }
    let deposits: Vec<Value> = accounts
        .iter()
        .map(|account| json!({"type": "deposit", "amount": "5000.00", "currency": "USD", "destination_account_id": account}))
        .collect();
    drive(&client, &base, &token, &deposits, &finished).await?;

    let plan: Vec<Value> = (0..transfers)
        .map(|index| {
            let from = index % ACCOUNTS;
            let to = (index * 7 + 1) % ACCOUNTS;
            let to = if to == from { (to + 1) % ACCOUNTS } else { to };
            json!({"type": "transfer", "amount": "1.00", "currency": "USD", "source_account_id": accounts[from], "destination_account_id": accounts[to]})
        })
        .collect();
    println!(
        "end-to-end transfers (POST → CONFIRMED), command-api + fraud-worker in one process, release build"
    );
    println!(
        "  cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let started = Instant::now();
    let latencies = drive(&client, &base, &token, &plan, &finished).await?;
    let elapsed = started.elapsed();
    report(
        &format!(
            "open loop: {transfers} transfers, {CONCURRENCY} clients posting without waiting (saturation)"
        ),
        transfers,
        elapsed,
        &latencies,
    )?;

    let started = Instant::now();
    let latencies: Vec<Duration> =
        futures::future::try_join_all((0..CLOSED_LOOP_CLIENTS).map(|client_index| {
            let (client, base, token, plan, finished) = (&client, &base, &token, &plan, &finished);
            async move {
                let mut latencies = Vec::new();
                for round in 0..CLOSED_LOOP_TRANSFERS_PER_CLIENT {
                    let body = &plan
                        [(client_index * CLOSED_LOOP_TRANSFERS_PER_CLIENT + round) % plan.len()];
                    latencies.extend(
                        drive(client, base, token, std::slice::from_ref(body), finished).await?,
                    );
                }
                anyhow::Ok(latencies)
            }
        }))
        .await?
        .into_iter()
        .flatten()
        .collect();
    report(
        &format!(
            "closed loop: {CLOSED_LOOP_CLIENTS} clients, each waiting for CONFIRMED before its next transfer"
        ),
        latencies.len(),
        started.elapsed(),
        &latencies,
    )?;
    poller.abort();

    let _ = stop_worker.send(());
    let _ = worker_task.await;
    app.stop().await;
    fraud_worker::testing::delete_redis_keys(&redis_key_prefix).await?;
    command_api::testing::delete_topology(&options.amqp_prefix).await?;
    database.drop_database().await?;
    Ok(())
}

fn report(
    title: &str,
    transfers: usize,
    elapsed: Duration,
    latencies: &[Duration],
) -> anyhow::Result<()> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for latency in latencies {
        histogram.record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX))?;
    }
    let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    println!("  {title}");
    println!(
        "    throughput: {:.0} transfers/s ({transfers} in {:.2} s, accounts: {ACCOUNTS})",
        transfers as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "    POST → CONFIRMED latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
    Ok(())
}

/// Posts every body (CONCURRENCY at a time) and waits until each transaction is final; returns
/// the time from each POST to its outcome.
async fn drive(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    bodies: &[Value],
    finished: &Arc<Mutex<HashMap<String, Instant>>>,
) -> anyhow::Result<Vec<Duration>> {
    let posted: Vec<(String, Instant)> = futures::stream::iter(bodies)
        .map(|body| async move {
            let sent = Instant::now();
            let response: Value = client
                .post(format!("{base}/api/v1/transactions"))
                .bearer_auth(token)
                .header("Idempotency-Key", Uuid::new_v4().to_string())
                .json(body)
                .send()
                .await?
                .json()
                .await?;
            let id = response["id"].as_str().unwrap_or_default().to_owned();
            anyhow::Ok((id, sent))
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        {
            let done = finished.lock().await;
            if posted.iter().all(|(id, _)| done.contains_key(id)) {
                return Ok(posted
                    .iter()
                    .map(|(id, sent)| done[id].saturating_duration_since(*sent))
                    .collect());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "transactions did not finish within 10 minutes"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Records when each transaction's outcome is first seen committed, following the log with the
/// gap-safe reader (a bare position checkpoint could skip a late commit and hang the run).
async fn poll_finished(pool: sqlx::PgPool, finished: Arc<Mutex<HashMap<String, Instant>>>) {
    let reader = LogReader::new(pool, "command_api.events");
    let mut after = LogPosition::START;
    loop {
        if let Ok(events) = reader.read_after(after, 1_000, Some("transaction")).await {
            let seen = Instant::now();
            let mut done = finished.lock().await;
            for event in events {
                after = event.position;
                if matches!(
                    event.event_type.as_str(),
                    "TransactionConfirmed" | "TransactionRejected"
                ) {
                    done.entry(event.aggregate_id).or_insert(seen);
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
