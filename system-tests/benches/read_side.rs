//! Benchmark of the read side:
//! `cargo bench -p system-tests --bench read_side [-- rebuild|get|lag]`.
//!
//! - **rebuild**: bulk-loads `BENCH_EVENTS` (default 1,000,000) domain-valid events into a
//!   scratch event store (deposits, then transfers between random accounts, each driven through
//!   the domain's own `decide`/`apply` and the saga's command lists, so the log is exactly what
//!   command-api would have written; `infra::testing::log_builder`, shared with the system
//!   throughput benchmark), then rebuilds each projection from it with
//!   `projector::rebuild::rebuild` (batches of 5,000) and runs `verify`. Reports events/s.
//! - **get**: `GET /api/v1/transactions/{id}` by 8 concurrent clients, p50/p99 and requests/s,
//!   with a warm Redis cache, and with Redis unreachable (the projector pointed at a closed
//!   port: the machine's Redis serves other work and is not stopped).
//! - **lag**: the transfer load of command-api's benchmark (32 clients posting transfers, with
//!   decisions recorded at once) while the projector follows; samples how far the read side is
//!   behind the log (events, and age of the oldest unprojected event) every 50 ms.
//!
//! With no argument, all three run. Figures and their meaning: `docs/benchmarks.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use chrono::Utc;
use command_api::testing::{TestApp, TestOptions, delete_topology, spawn_app_on_scratch};
use domain::{FraudDecision, FraudOutcome, TransactionId};
use hdrhistogram::Histogram;
use infra::auth::Role;
use infra::db::ScratchDatabase;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::testing::log_builder::{build_log, insert_log};
use projector::model::ProjectionName;
use projector::rebuild::{RebuildOptions, rebuild};
use projector::testing::{TestOptions as ProjectorOptions, spawn_projector};
use serde_json::{Value, json};
use uuid::Uuid;

const EVENTS_DEFAULT: usize = 1_000_000;
const ACCOUNTS: usize = 2_000;
const REBUILD_BATCH: usize = 5_000;
const GET_CLIENTS: usize = 8;
const GET_REQUESTS: usize = 5_000;
const GET_TRANSACTIONS: usize = 200;
const LAG_CLIENTS: usize = 32;
const LAG_TRANSFERS: usize = 3_000;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let mode = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with("--"))
        .unwrap_or_else(|| "all".to_owned());
    if matches!(mode.as_str(), "all" | "rebuild") {
        bench_rebuild().await?;
    }
    if matches!(mode.as_str(), "all" | "get") {
        bench_get().await?;
    }
    if matches!(mode.as_str(), "all" | "lag") {
        bench_lag().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// rebuild

async fn bench_rebuild() -> anyhow::Result<()> {
    let events: usize = match std::env::var("BENCH_EVENTS") {
        Ok(text) => text.parse().context("BENCH_EVENTS must be a number")?,
        Err(_) => EVENTS_DEFAULT,
    };
    let database = ScratchDatabase::create(&command_api::testing::admin_url()).await?;
    let result = async {
        let events_pool = infra::db::connect(&database.url(), "command_api", 4, "test").await?;
        command_api::startup::migrate(&events_pool).await?;
        let started = Instant::now();
        let builder = build_log(events, ACCOUNTS);
        let generated = started.elapsed();
        let started = Instant::now();
        insert_log(&events_pool, "command_api.events", &builder).await?;
        let inserted = started.elapsed();
        let total = builder.rows.len();
        drop(builder);
        println!("\n## rebuild over {total} events ({ACCOUNTS} accounts)\n");
        println!(
            "log generated through the domain in {:.1} s, inserted in {:.1} s ({:.0} events/s)\n",
            generated.as_secs_f64(),
            inserted.as_secs_f64(),
            total as f64 / inserted.as_secs_f64()
        );
        let read_pool = projector::startup::connect_read_models(&database.url(), 4).await?;
        let log = PgEventLog::open(
            events_pool.clone(),
            PgEventLogOptions {
                listen: false,
                ..PgEventLogOptions::reader("command_api.events")
            },
        )
        .await?;
        println!("| projections | events | seconds | events/s |");
        println!("|---|---|---|---|");
        let summary = rebuild(
            &read_pool,
            &log,
            &ProjectionName::ALL,
            RebuildOptions {
                batch_size: REBUILD_BATCH,
                restart: false,
            },
            |_| {},
        )
        .await?;
        println!(
            "| all three, one reader | {} | {:.1} | {:.0} (log events/s) |",
            summary.events,
            summary.elapsed.as_secs_f64(),
            summary.events as f64 / summary.elapsed.as_secs_f64()
        );
        let started = Instant::now();
        let report =
            projector::verify::verify(&read_pool, &events_pool, "command_api.events", &mut |_| {})
                .await?;
        ensure!(
            report.is_clean(),
            "the rebuilt read models do not verify: {:?}",
            report.differences.first()
        );
        println!(
            "\nverify (audit + every row compared) over {} events: {:.1} s, clean",
            report.events,
            started.elapsed().as_secs_f64()
        );
        read_pool.close().await;
        events_pool.close().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    database.drop_database().await?;
    result
}

// ---------------------------------------------------------------------------------------------
// get

struct System {
    database: Option<ScratchDatabase>,
    app: TestApp,
    amqp_prefix: String,
    client: reqwest::Client,
}

impl System {
    async fn start() -> anyhow::Result<System> {
        let options = TestOptions::default();
        let (database, app) = spawn_app_on_scratch(&options).await?;
        Ok(System {
            database: Some(database),
            app,
            amqp_prefix: options.amqp_prefix,
            client: reqwest::Client::new(),
        })
    }

    fn url(&self) -> String {
        self.database
            .as_ref()
            .map(ScratchDatabase::url)
            .unwrap_or_default()
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.app.address))
            .bearer_auth(token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "POST {path}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    async fn approve(&self, id: Uuid) -> anyhow::Result<()> {
        let metadata =
            command_api::metadata::for_saga(&id.to_string(), "bench", format!("decision/{id}"));
        self.app
            .decisions
            .record(
                TransactionId(id),
                FraudDecision {
                    outcome: FraudOutcome::Approved,
                    rule: None,
                    details: json!({}).into(),
                },
                &metadata,
            )
            .await?;
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        self.app.stop().await;
        if let Some(database) = self.database.take() {
            database.drop_database().await?;
        }
        delete_topology(&self.amqp_prefix).await?;
        Ok(())
    }
}

fn id_of(body: &Value) -> anyhow::Result<Uuid> {
    Ok(Uuid::parse_str(
        body["id"].as_str().ok_or_else(|| anyhow!("no id"))?,
    )?)
}

async fn measure_gets(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    ids: &[Uuid],
    expect_cache: &str,
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..GET_CLIENTS {
        let client = client.clone();
        let next = next.clone();
        let ids = ids.to_vec();
        let base = base.to_owned();
        let token = token.to_owned();
        let expect_cache = expect_cache.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= GET_REQUESTS {
                    return Ok::<_, anyhow::Error>(histogram);
                }
                let id = ids[n % ids.len()];
                let sent = Instant::now();
                let response = client
                    .get(format!("{base}/api/v1/transactions/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                let status = response.status();
                let cache = response
                    .headers()
                    .get("x-cache")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let _ = response.bytes().await?;
                ensure!(status.is_success(), "GET answered {status}");
                ensure!(
                    cache == expect_cache,
                    "expected X-Cache {expect_cache}, got {cache}"
                );
                histogram.record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX))?;
            }
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok((all, started.elapsed()))
}

async fn bench_get() -> anyhow::Result<()> {
    let system = System::start().await?;
    let result = async {
        let mut projector = spawn_projector(&system.url(), &ProjectorOptions::default()).await?;
        let mut unreachable = spawn_projector(
            &system.url(),
            &ProjectorOptions {
                redis_url: Some("redis://127.0.0.1:1".to_owned()),
                ..ProjectorOptions::default()
            },
        )
        .await?;
        let owner = Uuid::new_v4();
        let token = system.app.token(owner, &[Role::Customer]);
        let operator = system.app.token(Uuid::new_v4(), &[Role::Operator]);
        let account = id_of(&system.post(&token, "/api/v1/accounts", json!({"currency": "USD"})).await?)?;
        let mut ids = Vec::new();
        for _ in 0..GET_TRANSACTIONS {
            let body = system
                .post(&operator, "/api/v1/transactions", json!({"type": "deposit", "amount": "1.00", "currency": "USD", "destination_account_id": account}))
                .await?;
            let id = id_of(&body)?;
            system.approve(id).await?;
            ids.push(id);
        }
        // Let the read side catch up, then warm the cache once per transaction.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = system
                .client
                .get(format!("{}/api/v1/transactions?status=PENDING&page_size=1", projector.address))
                .bearer_auth(&token)
                .send()
                .await?
                .json::<Value>()
                .await?;
            let head = system.app.log().head().await?;
            let read = projector::generations::read_position(&projector.pool).await?;
            if response["items"].as_array().is_some_and(Vec::is_empty) && read >= head {
                break;
            }
            ensure!(Instant::now() < deadline, "the read side did not catch up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for id in &ids {
            system
                .client
                .get(format!("{}/api/v1/transactions/{id}", projector.address))
                .bearer_auth(&token)
                .send()
                .await?;
        }
        let (warm, warm_elapsed) =
            measure_gets(&system.client, &projector.address, &token, &ids, "HIT").await?;
        let (down, down_elapsed) =
            measure_gets(&system.client, &unreachable.address, &token, &ids, "MISS").await?;
        println!("\n## GET /api/v1/transactions/{{id}}: {GET_REQUESTS} requests, {GET_CLIENTS} clients, {GET_TRANSACTIONS} transactions\n");
        println!("| cache | p50 | p99 | max | requests/s |");
        println!("|---|---|---|---|---|");
        for (label, histogram, elapsed) in [
            ("warm Redis (every answer a HIT)", &warm, warm_elapsed),
            ("Redis unreachable (PostgreSQL, MISS)", &down, down_elapsed),
        ] {
            println!(
                "| {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} |",
                histogram.value_at_quantile(0.5) as f64 / 1000.0,
                histogram.value_at_quantile(0.99) as f64 / 1000.0,
                histogram.max() as f64 / 1000.0,
                GET_REQUESTS as f64 / elapsed.as_secs_f64()
            );
        }
        projector.flush_cache().await?;
        projector.stop().await;
        unreachable.stop().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    system.finish().await?;
    result
}

// ---------------------------------------------------------------------------------------------
// lag

async fn bench_lag() -> anyhow::Result<()> {
    let system = System::start().await?;
    let result = async {
        let mut projector = spawn_projector(&system.url(), &ProjectorOptions::default()).await?;
        let owner = Uuid::new_v4();
        let token = system.app.token(owner, &[Role::Customer]);
        let operator = system.app.token(Uuid::new_v4(), &[Role::Operator]);
        let mut accounts = Vec::new();
        for _ in 0..64 {
            let account = id_of(&system.post(&token, "/api/v1/accounts", json!({"currency": "USD"})).await?)?;
            let id = id_of(&system
                .post(&operator, "/api/v1/transactions", json!({"type": "deposit", "amount": "1000000.00", "currency": "USD", "destination_account_id": account}))
                .await?)?;
            system.approve(id).await?;
            accounts.push(account);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let events = system.app.pool.clone();
            let reads = projector.pool.clone();
            tokio::spawn(async move {
                let mut behind_events = Histogram::<u64>::new(3)?;
                let mut behind_ms = Histogram::<u64>::new(3)?;
                while !stop.load(Ordering::Relaxed) {
                    let read = projector::generations::read_position(&reads).await?;
                    let (count, oldest): (i64, Option<chrono::DateTime<Utc>>) = sqlx::query_as(
                        "SELECT count(*), min(recorded_at) FROM command_api.events
                         WHERE (tx_id, position) > ($1::text::xid8, $2)",
                    )
                    .bind(read.commit.to_string())
                    .bind(read.index)
                    .fetch_one(&events)
                    .await?;
                    behind_events.record(u64::try_from(count).unwrap_or(0))?;
                    let age = oldest.map_or(0, |at| (Utc::now() - at).num_milliseconds().max(0));
                    behind_ms.record(u64::try_from(age).unwrap_or(0))?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok::<_, anyhow::Error>((behind_events, behind_ms))
            })
        };
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut clients = Vec::new();
        for client_number in 0..LAG_CLIENTS {
            let next = next.clone();
            let accounts = accounts.clone();
            let client = system.client.clone();
            let base = system.app.address.clone();
            let token = token.clone();
            let decisions = system.app.decisions.clone();
            clients.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= LAG_TRANSFERS {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let source = accounts[(n + client_number) % accounts.len()];
                    let destination = accounts[(n + client_number + 1) % accounts.len()];
                    let response = client
                        .post(format!("{base}/api/v1/transactions"))
                        .bearer_auth(&token)
                        .header("Idempotency-Key", Uuid::new_v4().to_string())
                        .json(&json!({"type": "transfer", "amount": "0.01", "currency": "USD", "source_account_id": source, "destination_account_id": destination}))
                        .send()
                        .await?;
                    ensure!(response.status().is_success(), "POST answered {}", response.status());
                    let id = id_of(&response.json::<Value>().await?)?;
                    let metadata =
            command_api::metadata::for_saga(&id.to_string(), "bench", format!("decision/{id}"));
                    decisions
                        .record(TransactionId(id), FraudDecision { outcome: FraudOutcome::Approved, rule: None, details: json!({}).into() }, &metadata)
                        .await?;
                }
            }));
        }
        for client in clients {
            client.await??;
        }
        let posting = started.elapsed();
        // Keep sampling while the saga and the projector drain.
        let drain_deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let head = system.app.log().head().await?;
            let read = projector::generations::read_position(&projector.pool).await?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM command_api.saga_inflight")
                .fetch_one(&system.app.pool)
                .await?;
            if pending == 0 && read >= head {
                break;
            }
            ensure!(Instant::now() < drain_deadline, "the system did not drain");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drained = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (events, age) = sampler.await??;
        println!("\n## projection lag under load: {LAG_TRANSFERS} transfers, {LAG_CLIENTS} clients\n");
        println!(
            "posted in {:.1} s ({:.0} transfers/s); saga and projector drained at {:.1} s; {} samples every 50 ms\n",
            posting.as_secs_f64(),
            LAG_TRANSFERS as f64 / posting.as_secs_f64(),
            drained.as_secs_f64(),
            events.len()
        );
        println!("| lag | p50 | p99 | max |");
        println!("|---|---|---|---|");
        println!(
            "| events behind the log | {} | {} | {} |",
            events.value_at_quantile(0.5),
            events.value_at_quantile(0.99),
            events.max()
        );
        println!(
            "| age of the oldest unprojected event | {} ms | {} ms | {} ms |",
            age.value_at_quantile(0.5),
            age.value_at_quantile(0.99),
            age.max()
        );
        projector.flush_cache().await?;
        projector.stop().await;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    system.finish().await?;
    result
}
