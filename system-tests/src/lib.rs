//! The system tests' kit: the four service binaries (`gateway`, `command-api`, `projector`,
//! `fraud-worker`) started as processes on a scratch database, with their own RabbitMQ topology
//! and Redis prefixes, JSON logs to files; stopped, and everything they made deleted, when the
//! [`System`] is finished (or dropped by a failing test). Plus what a hostile client needs that
//! an HTTP library will not do: raw bytes on a socket. Build the binaries first
//! (`cargo build --workspace --bins`); the tests are in `tests/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use infra::auth::{JwtSigner, Role, TokenConfig};
use infra::db::ScratchDatabase;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

pub mod deployment;
pub mod embedded;

/// The servers the kit starts systems on. The same variables and defaults as
/// `infra::testing`'s, read here so the kit, which is a library that `cargo build --workspace
/// --bins` compiles, does not turn on infra's `testing` feature for every binary of the build.
pub mod servers {
    /// The server that holds the scratch databases: `TEST_DATABASE_URL`, or the local one.
    pub fn admin_url() -> String {
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
            "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
        })
    }

    /// The broker: `TEST_AMQP_URL`, or the local one.
    pub fn amqp_url() -> String {
        std::env::var("TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
    }

    /// Redis: `TEST_REDIS_URL`, or the local one.
    pub fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }
}

use servers::{admin_url, amqp_url, redis_url};

/// The secret every service of a test system shares.
pub const SECRET: &str = "system-test-secret-of-at-least-thirty-two-bytes";

/// The bootstrap admin of a test system.
pub const ADMIN_USERNAME: &str = "ledger-admin";
pub const ADMIN_PASSWORD: &str = "admin-password-for-the-system-test";

/// How long a service may take to say it listens.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// How long a stopped service gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `target/<profile>/<name>`: tests run from `target/<profile>/deps/`, this crate's binaries
/// from `target/<profile>/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows where it runs from");
    let mut directory = exe.parent().expect("an executable has a directory");
    if directory.ends_with("deps") {
        directory = directory.parent().expect("deps is inside target/<profile>");
    }
    let path = directory.join(name);
    assert!(
        path.exists(),
        "{} is missing: build every binary first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A service process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Service {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts binary `name` with only `PATH`, JSON logs, [`SECRET`] and `env`; output to
    /// `<logs>/<name>.log`.
    pub fn start(name: &'static str, logs: &Path, env: &[(&str, String)]) -> Service {
        Service::start_as(name, name, logs, env)
    }

    /// [`Service::start`] with a log file of another name (a second instance of a binary).
    pub fn start_as(
        name: &'static str,
        log_name: &str,
        logs: &Path,
        env: &[(&str, String)],
    ) -> Service {
        Service::start_with_args(name, log_name, logs, env, &[])
    }

    /// [`Service::start_as`] with arguments (`ledger serve`).
    pub fn start_with_args(
        name: &'static str,
        log_name: &str,
        logs: &Path,
        env: &[(&str, String)],
        args: &[&str],
    ) -> Service {
        let log = logs.join(format!("{log_name}.log"));
        let file = std::fs::File::create(&log).expect("a log file");
        let errors = file.try_clone().expect("the log file again");
        let mut command = Command::new(binary(name));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("JWT_SECRET", SECRET)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(errors));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("the service starts");
        Service { name, child, log }
    }

    /// The port of the log line `message` (`"<name> listening"` by default): services bind
    /// port 0, so no other test can take a port between our choosing it and the bind.
    pub async fn port_of(&mut self, message: &str) -> u16 {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let port = self.log().lines().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                if line["message"] != message {
                    return None;
                }
                line["port"]
                    .as_u64()
                    .and_then(|port| u16::try_from(port).ok())
            });
            if let Some(port) = port {
                return port;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {message:?} within {START_DEADLINE:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn port(&mut self) -> u16 {
        let message = format!("{} listening", self.name);
        self.port_of(&message).await
    }

    /// Waits for the process to exit by itself and returns its status code.
    pub async fn exit_code(&mut self, deadline: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                started.elapsed() < deadline,
                "{} did not exit within {deadline:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -9`: no shutdown of any kind, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Extra environment per service, on top of what [`System::start`] sets.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub gateway: Vec<(&'static str, String)>,
    pub command_api: Vec<(&'static str, String)>,
    pub projector: Vec<(&'static str, String)>,
    pub fraud_worker: Vec<(&'static str, String)>,
    /// Every service.
    pub all: Vec<(&'static str, String)>,
}

/// The four services, started as an operator would start them.
pub struct System {
    /// command-api, fraud-worker, projector, gateway.
    pub services: Vec<Service>,
    /// `http://127.0.0.1:<port>` of each.
    pub gateway: String,
    pub gateway_metrics: String,
    pub command_api: String,
    pub projector: String,
    pub fraud_worker: String,
    pub logs: PathBuf,
    pub prefix: String,
    pub client: reqwest::Client,
    database: Option<ScratchDatabase>,
}

impl System {
    /// Starts the system and waits until the gateway reports every service ok.
    pub async fn start(overrides: Overrides) -> System {
        let database = ScratchDatabase::create(&admin_url())
            .await
            .expect("a scratch database");
        let logs = std::env::temp_dir().join(format!("ledger-system-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&logs).expect("a log directory");
        let prefix = format!("test-{}", Uuid::new_v4().simple());
        let url = database.url();
        let any_port = "127.0.0.1:0".to_owned();
        let with = |base: Vec<(&'static str, String)>, own: &[(&'static str, String)]| {
            let mut env = base;
            env.extend(overrides.all.iter().cloned());
            env.extend(own.iter().cloned());
            env
        };
        let mut command_api = Service::start(
            "command-api",
            &logs,
            &with(
                vec![
                    ("DATABASE_URL", url.clone()),
                    ("AMQP_URL", amqp_url()),
                    ("AMQP_PREFIX", prefix.clone()),
                    ("LISTEN_ADDR", any_port.clone()),
                ],
                &overrides.command_api,
            ),
        );
        let mut fraud_worker = Service::start(
            "fraud-worker",
            &logs,
            &with(
                vec![
                    ("AMQP_URL", amqp_url()),
                    ("AMQP_PREFIX", prefix.clone()),
                    ("REDIS_URL", redis_url()),
                    ("REDIS_KEY_PREFIX", format!("{prefix}:fraud")),
                    ("LISTEN_ADDR", any_port.clone()),
                ],
                &overrides.fraud_worker,
            ),
        );
        // The projector reads the log command-api's migrations create, so it starts once
        // command-api listens (after them), as run-local.sh starts it: started at once, it
        // failed its first reads and backed off for up to seconds (infra::follow).
        let command_port = command_api.port().await;
        let mut projector = Service::start(
            "projector",
            &logs,
            &with(
                vec![
                    ("DATABASE_URL", url.clone()),
                    ("REDIS_URL", redis_url()),
                    ("REDIS_KEY_PREFIX", format!("{prefix}:cache")),
                    ("LISTEN_ADDR", any_port.clone()),
                ],
                &overrides.projector,
            ),
        );
        // The gateway needs the others' addresses, so it starts once they listen.
        let (fraud_port, query_port) = (fraud_worker.port().await, projector.port().await);
        let mut gateway = Service::start(
            "gateway",
            &logs,
            &with(
                vec![
                    ("DATABASE_URL", url.clone()),
                    ("LISTEN_ADDR", any_port.clone()),
                    ("METRICS_ADDR", any_port),
                    (
                        "COMMAND_API_URL",
                        format!("http://127.0.0.1:{command_port}"),
                    ),
                    ("QUERY_API_URL", format!("http://127.0.0.1:{query_port}")),
                    ("FRAUD_WORKER_URL", format!("http://127.0.0.1:{fraud_port}")),
                    ("ADMIN_USERNAME", ADMIN_USERNAME.to_owned()),
                    ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
                ],
                &overrides.gateway,
            ),
        );
        let gateway_port = gateway.port().await;
        let metrics_port = gateway.port_of("gateway metrics listening").await;
        let system = System {
            services: vec![command_api, fraud_worker, projector, gateway],
            gateway: format!("http://127.0.0.1:{gateway_port}"),
            gateway_metrics: format!("http://127.0.0.1:{metrics_port}"),
            command_api: format!("http://127.0.0.1:{command_port}"),
            projector: format!("http://127.0.0.1:{query_port}"),
            fraud_worker: format!("http://127.0.0.1:{fraud_port}"),
            logs,
            prefix,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client"),
            database: Some(database),
        };
        let (client, gateway) = (&system.client, &system.gateway);
        eventually(
            "the gateway reports every service ok",
            Duration::from_secs(60),
            || async move {
                let Ok(response) = client.get(format!("{gateway}/health")).send().await else {
                    return false;
                };
                let body: Value = response.json().await.unwrap_or_default();
                body["status"] == "ok"
            },
        )
        .await;
        system
    }

    /// The scratch database's URL (to start a second instance of a binary on it).
    pub fn database_url(&self) -> String {
        self.database
            .as_ref()
            .expect("the database lives until the system is finished")
            .url()
    }

    pub fn service(&mut self, name: &str) -> &mut Service {
        self.services
            .iter_mut()
            .find(|service| service.name == name)
            .expect("a service of the system")
    }

    /// A token minted with the system's secret, as `ledger token` would.
    pub fn token(&self, subject: Uuid, roles: &[Role]) -> String {
        token(subject, roles)
    }

    /// Stops every service (the gateway first), then deletes the database, the topology, the
    /// Redis keys and the logs.
    pub async fn finish(mut self) {
        for service in self.services.iter_mut().rev() {
            service.stop();
        }
        self.clean_up().await;
    }

    async fn clean_up(&mut self) {
        self.services.clear();
        if let Some(database) = self.database.take() {
            database
                .drop_database()
                .await
                .expect("the scratch database drops");
        }
        let topology = infra::amqp::Topology::new(&self.prefix).expect("a valid prefix");
        infra::amqp::delete_topology(&amqp_url(), &topology)
            .await
            .expect("the topology is deleted");
        assert!(
            delete_redis_keys(&self.prefix),
            "the test's Redis keys are deleted"
        );
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

impl Drop for System {
    /// A test that failed before `finish` still cleans up, on a runtime of its own.
    fn drop(&mut self) {
        for service in self.services.iter_mut().rev() {
            service.stop();
        }
        self.services.clear();
        let database = self.database.take();
        let prefix = self.prefix.clone();
        let logs = self.logs.clone();
        if database.is_none() {
            return;
        }
        infra::tasks::block_on_own_runtime(async move {
            if let Some(database) = database {
                let _ = database.drop_database().await;
            }
            if let Ok(topology) = infra::amqp::Topology::new(&prefix) {
                let _ = infra::amqp::delete_topology(&amqp_url(), &topology).await;
            }
            let _ = delete_redis_keys(&prefix);
            let _ = std::fs::remove_dir_all(&logs);
        });
    }
}

/// Deletes the Redis keys a system of `prefix` wrote (fraud counters, cache entries).
fn delete_redis_keys(prefix: &str) -> bool {
    // No Redis client crate here: redis-cli is on every machine that runs Redis, and the test
    // must not leave keys behind.
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -u {} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {} DEL",
            redis_url(),
            redis_url()
        ))
        .output();
    output.is_ok_and(|output| output.status.success())
}

/// A token minted with the test secret (which every system of the kit runs with), as
/// `ledger token` would; it lives 10 minutes.
pub fn token(subject: Uuid, roles: &[Role]) -> String {
    JwtSigner::new(&TokenConfig::with_secret(SECRET))
        .expect("the test secret is valid")
        .mint(subject, roles, chrono::Utc::now().timestamp(), 600)
        .expect("the test secret signs")
}

/// Extracts the walkthrough between its markers in README.md and runs it with bash against
/// `base`, with the admin's credentials in the environment as the README says.
pub fn run_readme_walkthrough(base: &str, admin: &str, password: &str) -> Output {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md is readable");
    let block = readme
        .split_once("<!-- walkthrough:start -->")
        .and_then(|(_, rest)| rest.split_once("<!-- walkthrough:end -->"))
        .map(|(block, _)| block)
        .expect("README.md marks its walkthrough");
    let script: String = block
        .lines()
        .filter(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .env("LEDGER", base)
        .env("ADMIN_USERNAME", admin)
        .env("ADMIN_PASSWORD", password)
        .output()
        .expect("bash runs")
}

/// Runs a command and returns its output (for `bash` and the binaries).
pub fn run(command: &mut Command) -> Output {
    command.output().expect("the command runs")
}

/// An answer read off a raw socket: its status and its head, and its body (as far as the
/// server sent it before closing or the deadline).
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends `bytes` on a new connection to `address` (`http://host:port`) and reads the answer
/// until the server closes or 10 s pass.
pub async fn raw(address: &str, bytes: &[u8]) -> RawAnswer {
    let mut stream = connect(address).await;
    stream.write_all(bytes).await.expect("writes");
    let received = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    parse_answer(&received)
}

pub async fn connect(address: &str) -> TcpStream {
    TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .expect("connects")
}

/// Everything the server sends until it closes the connection (or `deadline` passes, which
/// fails the test: every bound under test closes the connection well before).
pub async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => panic!(
                "the server kept the connection open beyond {deadline:?}; received: {}",
                String::from_utf8_lossy(&received)
            ),
        }
    }
}

fn parse_answer(received: &[u8]) -> RawAnswer {
    let text = String::from_utf8_lossy(received).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    RawAnswer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}
