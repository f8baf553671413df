//! The distributed mode: the four release binaries started as `scripts/run-local.sh` starts them
//! (command-api, then projector and fraud-worker, then the gateway in front of them; JSON logs
//! to files; every other setting at its default), but on a scratch database, with an AMQP
//! prefix and Redis key prefixes of their own and every port chosen by the OS, so nothing
//! collides with a system already running on this machine.
//!
//! The two SQL probes that know the log's layout (the lag, a 202's durability) are here and
//! nowhere else: [`OLDEST_UNPROJECTED_AGE`] and [`EXISTING_TRANSACTIONS`].

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::service::Service;
use anyhow::{Context, bail, ensure};
use infra::db::ScratchDatabase;
use infra::testing::{admin_url, amqp_url, redis_url};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::system::{CleanUp, Login, SeededLog, SystemUnderTest};

/// How long a service may take to log the port it bound: migrations and, for the gateway, the
/// admin's argon2 hash happen first.
const LISTEN_WITHIN: Duration = Duration::from_secs(90);

/// How long the gateway's aggregated `/health` may take to report every service ok.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// How often `/health` is asked while waiting.
const HEALTH_POLL: Duration = Duration::from_millis(200);

/// Grace before a service that does not stop is killed: longer than the services' own 30 s
/// drain of their background workers, as in `scripts/run-local.sh`.
const STOP_GRACE: Duration = Duration::from_secs(40);

/// Connections of the benchmark's own pool to the scratch database: the lag sampler and the
/// durability check, one query at a time each.
const PROBE_CONNECTIONS: u32 = 2;

/// Lifetime of the tokens the gateway mints: a run takes a few minutes and logs in once; the
/// default 900 s would expire during a slow run's drain.
const TOKEN_TTL_SECONDS: u64 = 3_600;

/// Accounts of the seeded log, as in the projector's read-side benchmark: enough that no account
/// dominates the projections' upserts.
pub const SEEDED_ACCOUNTS: usize = 2_000;

/// Transaction ids per query of the durability check (one array parameter).
const DURABILITY_CHUNK: usize = 10_000;

/// The age of the oldest committed event that some live projection has not applied yet, by the
/// database's clock, in seconds (0 when every projection is caught up).
///
/// For each projection's live checkpoint (`projector.checkpoints` of the generation
/// `projector.projections` names live), the first event after it in commit order, as
/// `LogReader::lag` finds it: every committed event counts, beyond the followers' visibility
/// bound too, since one held back by a long transaction elsewhere is waiting as much as any.
/// `recorded_at` is when the event was inserted, so the age includes its own commit.
/// When the log's layout changes (the write side's event-log rework), adapt this query only.
const OLDEST_UNPROJECTED_AGE: &str = "
    SELECT coalesce(max(extract(epoch FROM clock_timestamp() - oldest.recorded_at)), 0)::float8
    FROM projector.projections p
    JOIN projector.checkpoints c ON c.projection = p.name AND c.generation = p.live_generation
    CROSS JOIN LATERAL (
        SELECT e.recorded_at FROM command_api.events e
        WHERE (e.tx_id, e.position) > (c.tx_id::text::xid8, c.position)
        ORDER BY e.tx_id, e.position
        LIMIT 1
    ) oldest";

/// Which of the given transaction ids have their first event (`TransactionCreated`) in the log.
const EXISTING_TRANSACTIONS: &str = "
    SELECT aggregate_id FROM command_api.events
    WHERE aggregate_type = 'transaction' AND sequence = 1 AND aggregate_id = ANY($1)";

/// The four services behind the gateway, on scratch storage.
pub struct Distributed {
    /// The live system's database; `None` once dropped.
    database: Option<ScratchDatabase>,
    /// The database of the seeded log, once seeded.
    seeded: Option<ScratchDatabase>,
    /// The benchmark's own connections to `database`.
    probe: PgPool,
    /// In start order: command-api, projector, fraud-worker, gateway.
    services: Vec<Service>,
    logs: PathBuf,
    /// The AMQP prefix; Redis keys start with `<prefix>:`.
    prefix: String,
    base_url: String,
    admin: Login,
    tokens: infra::auth::TokenConfig,
}

/// A secret of 64 random alphanumerics, for the JWT secret and the admin's password (hex digits
/// would sometimes fall short of the 16 distinct bytes a JWT secret needs).
pub fn random_secret() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

impl Distributed {
    fn start_service(
        &mut self,
        name: &'static str,
        secret: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let mut all = vec![
            ("JWT_SECRET", secret.to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ];
        all.extend(env.iter().cloned());
        self.services.push(Service::start(name, &self.logs, &all)?);
        Ok(())
    }

    async fn port_of(&mut self, index: usize) -> anyhow::Result<u16> {
        let service = self
            .services
            .get_mut(index)
            .context("the service was started")?;
        Ok(service.port(LISTEN_WITHIN).await?)
    }

    /// Starts the four services in `scripts/run-local.sh`'s order and waits for the gateway's
    /// aggregated health.
    async fn start_services(&mut self, url: &str, secret: &str) -> anyhow::Result<()> {
        let (amqp, redis, prefix) = (amqp_url(), redis_url(), self.prefix.clone());
        let amqp_env = [("AMQP_URL", amqp.clone()), ("AMQP_PREFIX", prefix.clone())];
        let mut env = vec![("DATABASE_URL", url.to_owned())];
        env.extend(amqp_env.iter().cloned());
        self.start_service("command-api", secret, &env)?;
        let command_port = self.port_of(0).await?;
        let projector_env = [
            ("DATABASE_URL", url.to_owned()),
            ("REDIS_URL", redis.clone()),
            ("REDIS_KEY_PREFIX", format!("{prefix}:cache")),
        ];
        self.start_service("projector", secret, &projector_env)?;
        let mut env = amqp_env.to_vec();
        env.push(("REDIS_URL", redis));
        env.push(("REDIS_KEY_PREFIX", format!("{prefix}:fraud")));
        self.start_service("fraud-worker", secret, &env)?;
        let (query_port, fraud_port) = (self.port_of(1).await?, self.port_of(2).await?);
        let gateway_env = [
            ("DATABASE_URL", url.to_owned()),
            (
                "COMMAND_API_URL",
                format!("http://127.0.0.1:{command_port}"),
            ),
            ("QUERY_API_URL", format!("http://127.0.0.1:{query_port}")),
            ("FRAUD_WORKER_URL", format!("http://127.0.0.1:{fraud_port}")),
            ("ADMIN_USERNAME", self.admin.username.clone()),
            ("ADMIN_PASSWORD", self.admin.password.clone()),
            ("JWT_TTL_SECONDS", TOKEN_TTL_SECONDS.to_string()),
        ];
        self.start_service("gateway", secret, &gateway_env)?;
        let gateway_port = self.port_of(3).await?;
        self.base_url = format!("http://127.0.0.1:{gateway_port}");
        wait_healthy(&self.base_url).await
    }
}

/// Waits until the gateway's `/health` reports every service ok.
async fn wait_healthy(base_url: &str) -> anyhow::Result<()> {
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
            "the gateway did not report every service ok within {HEALTHY_WITHIN:?} (last: {status})"
        );
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

impl SystemUnderTest for Distributed {
    async fn start() -> anyhow::Result<Self> {
        let run = Uuid::new_v4().simple().to_string();
        let logs = std::env::temp_dir().join(format!("ledger-bench-{run}"));
        std::fs::create_dir_all(&logs).context("creating the log directory")?;
        let database = ScratchDatabase::create(&admin_url())
            .await
            .context("creating the scratch database")?;
        let url = database.url();
        let secret = random_secret();
        let probe = PgPoolOptions::new()
            .max_connections(PROBE_CONNECTIONS)
            .connect(&url)
            .await
            .context("connecting the benchmark's probe")?;
        let mut system = Distributed {
            database: Some(database),
            seeded: None,
            probe,
            services: Vec::new(),
            logs,
            prefix: format!("bench-{run}"),
            base_url: String::new(),
            admin: Login {
                username: "bench-admin".to_owned(),
                password: random_secret(),
            },
            tokens: infra::auth::TokenConfig::with_secret(&secret),
        };
        if let Err(error) = system.start_services(&url, &secret).await {
            let cleaned = system.clean_up(false).await;
            for failure in cleaned.failures {
                eprintln!("clean-up after a failed start: {failure}");
            }
            return Err(error.context("starting the four services"));
        }
        Ok(system)
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
        let seconds: f64 = sqlx::query_scalar(OLDEST_UNPROJECTED_AGE)
            .fetch_one(&self.probe)
            .await
            .context("measuring the oldest unprojected event")?;
        Ok(Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or_default())
    }

    async fn missing_transactions(&self, ids: &[Uuid]) -> anyhow::Result<Vec<Uuid>> {
        let mut missing = Vec::new();
        for chunk in ids.chunks(DURABILITY_CHUNK) {
            let wanted: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let found: HashSet<String> = sqlx::query_scalar(EXISTING_TRANSACTIONS)
                .bind(&wanted)
                .fetch_all(&self.probe)
                .await
                .context("looking up accepted transactions")?
                .into_iter()
                .collect();
            missing.extend(chunk.iter().filter(|id| !found.contains(&id.to_string())));
        }
        Ok(missing)
    }

    async fn stop_services(&mut self) -> anyhow::Result<()> {
        let crashed: Vec<String> = self
            .services
            .iter_mut()
            .filter_map(|service| {
                (!service.is_running()).then(|| {
                    format!(
                        "{} exited on its own:\n{}",
                        service.name(),
                        service.log_tail()
                    )
                })
            })
            .collect();
        // The gateway first, so its in-flight requests still reach the services; then the rest.
        for service in self.services.iter_mut().rev() {
            service.stop(STOP_GRACE);
        }
        if !crashed.is_empty() {
            bail!("{}", crashed.join("\n"));
        }
        Ok(())
    }

    async fn seed_log(&mut self, events: usize) -> anyhow::Result<SeededLog> {
        let database = ScratchDatabase::create(&admin_url())
            .await
            .context("creating the seeded log's database")?;
        let url = database.url();
        self.seeded = Some(database);
        let pool = infra::db::connect(
            &url,
            command_api::startup::SCHEMA,
            PROBE_CONNECTIONS,
            "test",
        )
        .await
        .context("connecting to the seeded log's database")?;
        command_api::startup::migrate(&pool)
            .await
            .context("creating the event store")?;
        let started = Instant::now();
        let builder = tokio::task::spawn_blocking(move || {
            infra::testing::log_builder::build_log(events, SEEDED_ACCOUNTS)
        })
        .await
        .context("generating the log")?;
        let generated = started.elapsed();
        let started = Instant::now();
        infra::testing::log_builder::insert_log(
            &pool,
            command_api::startup::EVENTS_TABLE,
            &builder,
        )
        .await
        .context("inserting the log")?;
        let inserted = started.elapsed();
        pool.close().await;
        Ok(SeededLog {
            events: builder.rows.len(),
            generated,
            inserted,
            cli_environment: vec![
                ("DATABASE_URL", url),
                (
                    "EVENTS_TABLE",
                    command_api::startup::EVENTS_TABLE.to_owned(),
                ),
                ("REDIS_URL", redis_url()),
                // `ledger rebuild` flushes the projector's cache after `transactions`: the
                // benchmark's own prefix, never a real one.
                ("REDIS_KEY_PREFIX", format!("{}:cache", self.prefix)),
            ],
            cli_arguments: Vec::new(),
        })
    }

    fn logs(&self) -> PathBuf {
        self.logs.clone()
    }

    async fn clean_up(mut self, keep: bool) -> CleanUp {
        let mut report = CleanUp::default();
        for service in self.services.iter_mut().rev() {
            service.stop(STOP_GRACE);
        }
        self.probe.close().await;
        let databases: Vec<ScratchDatabase> = [self.database.take(), self.seeded.take()]
            .into_iter()
            .flatten()
            .collect();
        if keep {
            for database in &databases {
                report.kept.push(format!("database {}", database.name()));
            }
            report.kept.push(format!("AMQP topology {}.*", self.prefix));
            report.kept.push(format!("Redis keys {}:*", self.prefix));
            report.kept.push(format!("logs {}", self.logs.display()));
            return report;
        }
        for database in databases {
            let name = database.name().to_owned();
            if let Err(error) = database.drop_database().await {
                report.failures.push(format!("database {name}: {error}"));
            }
        }
        let topology = infra::amqp::Topology::new(&self.prefix);
        let deleted = match topology {
            Ok(topology) => infra::amqp::delete_topology(&amqp_url(), &topology)
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = deleted {
            report
                .failures
                .push(format!("AMQP topology {}: {error}", self.prefix));
        }
        let prefix = format!("{}:", self.prefix);
        if let Err(error) = crate::service::delete_redis_keys(&redis_url(), &prefix).await {
            report
                .failures
                .push(format!("Redis keys {prefix}*: {error}"));
        }
        if let Err(error) = std::fs::remove_dir_all(&self.logs) {
            report
                .failures
                .push(format!("logs {}: {error}", self.logs.display()));
        }
        report
    }
}
