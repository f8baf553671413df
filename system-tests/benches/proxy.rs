//! Benchmark of the gateway's proxy: `cargo bench -p system-tests --bench proxy`.
//!
//! Starts a real fraud worker (RabbitMQ, Redis) and the gateway in front of it (on a scratch
//! PostgreSQL database), then sends the same authenticated `GET /api/v1/fraud/rules` as an
//! admin, first straight to the fraud worker and then through the gateway, from a fixed number
//! of concurrent clients that each keep one request in flight (closed loop). It prints p50,
//! p90, p99 and max latency and requests/s for both, and the difference: what the edge (token
//! check, routing, one more HTTP hop) costs. `docs/benchmarks.md` records a run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use gateway::testing::{TestOptions, admin_url, spawn_app};
use hdrhistogram::Histogram;
use infra::auth::Role;
use infra::db::ScratchDatabase;
use uuid::Uuid;

/// Measured requests per target unless `BENCH_REQUESTS` says otherwise: enough for a stable
/// p99 (200 samples above it) in a few seconds per target.
const REQUESTS_DEFAULT: usize = 20_000;

/// Concurrent clients unless `BENCH_CLIENTS` says otherwise.
const CLIENTS_DEFAULT: usize = 16;

/// Requests per target before measuring, so connections and caches are warm. Not recorded.
const WARM_UP_REQUESTS: usize = 1_000;

/// Longest a single request may take before the client gives up (counted as an error).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Latencies above this (a minute, in microseconds) are recorded as this.
const LATENCY_MICROS_MAX: u64 = 60_000_000;

/// Significant decimal digits the histograms keep (0.1 % resolution).
const HISTOGRAM_DIGITS: u8 = 3;

/// The route measured: authenticated, role-checked, and cheap for the upstream to answer.
const PATH: &str = "/api/v1/fraud/rules";

struct Outcome {
    latencies: Histogram<u64>,
    errors: usize,
    elapsed: Duration,
}

fn setting(variable: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(variable) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{variable} must be a whole number")),
        Err(_) => Ok(default),
    }
}

/// `requests` GETs of `url` from `clients` concurrent clients, each one request at a time.
async fn run(url: &str, token: &str, requests: usize, clients: usize) -> anyhow::Result<Outcome> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(clients)
        .build()?;
    let url = Arc::new(url.to_owned());
    let token = Arc::new(token.to_owned());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let share = requests / clients + usize::from(client_index < requests % clients);
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = histogram();
            let mut errors = 0;
            for _ in 0..share {
                let sent = Instant::now();
                let answered = client
                    .get(url.as_str())
                    .bearer_auth(token.as_str())
                    .send()
                    .await;
                let ok = match answered {
                    Ok(response) if response.status().is_success() => {
                        response.bytes().await.is_ok()
                    }
                    _ => false,
                };
                if ok {
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    latencies.saturating_record(micros);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = histogram();
    let mut errors = 0;
    for task in tasks {
        let (part, part_errors) = task.await?;
        latencies.add(part)?;
        errors += part_errors;
    }
    Ok(Outcome {
        latencies,
        errors,
        elapsed: started.elapsed(),
    })
}

/// A histogram wide enough for every latency up to [`LATENCY_MICROS_MAX`]: values beyond a
/// histogram's bounds are clamped by `saturating_record`, which would hide a slow tail.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, HISTOGRAM_DIGITS)
        .expect("constant bounds are valid")
}

fn milliseconds(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn row(name: &str, outcome: &Outcome) {
    let latencies = &outcome.latencies;
    let per_second = latencies.len() as f64 / outcome.elapsed.as_secs_f64();
    println!(
        "| {name:<16} | {:>8} | {:>6} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} | {:>8.0} |",
        latencies.len(),
        outcome.errors,
        milliseconds(latencies.value_at_quantile(0.50)),
        milliseconds(latencies.value_at_quantile(0.90)),
        milliseconds(latencies.value_at_quantile(0.99)),
        milliseconds(latencies.max()),
        per_second,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let requests = setting("BENCH_REQUESTS", REQUESTS_DEFAULT)?;
    let clients = setting("BENCH_CLIENTS", CLIENTS_DEFAULT)?;
    ensure!(
        clients > 0 && requests >= clients,
        "need at least one request per client"
    );
    let fraud_worker =
        fraud_worker::testing::spawn_app(&fraud_worker::testing::TestOptions::default())
            .await
            .context("starting the fraud worker (RabbitMQ and Redis must run)")?;
    let database = ScratchDatabase::create(&admin_url()).await?;
    let options = TestOptions {
        fraud_worker_url: Some(fraud_worker.address.clone()),
        ..TestOptions::default()
    };
    let mut gateway = spawn_app(&database.url(), &options).await?;
    let token = gateway.token(Uuid::new_v4(), &[Role::Admin]);
    let targets = [
        ("direct", format!("{}{PATH}", fraud_worker.address)),
        ("through gateway", format!("{}{PATH}", gateway.address)),
    ];
    let mut outcomes = Vec::new();
    for (name, url) in &targets {
        run(url, &token, WARM_UP_REQUESTS, clients).await?;
        outcomes.push((*name, run(url, &token, requests, clients).await?));
    }
    println!(
        "\nGET {PATH} as admin, {clients} concurrent clients, {requests} requests per target\n"
    );
    println!(
        "| target           | requests | errors | p50 ms  | p90 ms  | p99 ms  | max ms  | req/s    |"
    );
    println!(
        "|------------------|---------:|-------:|--------:|--------:|--------:|--------:|---------:|"
    );
    for (name, outcome) in &outcomes {
        row(name, outcome);
    }
    if let [(_, direct), (_, proxied)] = outcomes.as_slice() {
        println!(
            "\ngateway overhead: p50 +{:.3} ms, p99 +{:.3} ms, throughput {:.0}% of direct",
            milliseconds(proxied.latencies.value_at_quantile(0.5))
                - milliseconds(direct.latencies.value_at_quantile(0.5)),
            milliseconds(proxied.latencies.value_at_quantile(0.99))
                - milliseconds(direct.latencies.value_at_quantile(0.99)),
            100.0 * (proxied.latencies.len() as f64 / proxied.elapsed.as_secs_f64())
                / (direct.latencies.len() as f64 / direct.elapsed.as_secs_f64()),
        );
    }
    gateway.stop().await;
    fraud_worker.cleanup().await;
    database.drop_database().await?;
    let errors: usize = outcomes.iter().map(|(_, outcome)| outcome.errors).sum();
    ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}
