//! The benchmark's process handling: the real `gateway`, `command-api`, `projector` and
//! `fraud-worker` release binaries started as processes, the ports they bound read from their
//! logs, graceful stops, and the deletion of the Redis keys they wrote. Unlike the tests' kit
//! (`system_tests`), every failure is an error the benchmark reports, not a panic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How often a start or a stop looks at the process and its log again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Lines of a service's log an error quotes: enough for the reason it exited, short enough to
/// read.
const LOG_TAIL_LINES: usize = 40;

/// Keys deleted per Redis `DEL`: bounded so one command never blocks Redis for long.
const REDIS_DELETE_BATCH: usize = 500;

/// What can go wrong starting, reading or stopping a service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary is not built.
    #[error("{0} is missing: build every binary first (cargo build --workspace --bins)")]
    MissingBinary(PathBuf),
    /// The process could not be spawned, or its log file written.
    #[error("starting {name}: {source}")]
    Spawn {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The process ended before it logged its port.
    #[error("{name} exited ({status}) before listening; its log ends:\n{log_tail}")]
    Exited {
        name: &'static str,
        status: std::process::ExitStatus,
        log_tail: String,
    },
    /// The process did not log its port in time.
    #[error("{name} did not log that it listens within {waited:?}; its log ends:\n{log_tail}")]
    NotListening {
        name: &'static str,
        waited: Duration,
        log_tail: String,
    },
    /// Redis refused a command of the clean-up.
    #[error("deleting Redis keys: {0}")]
    Redis(#[from] redis::RedisError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The directory holding the binaries of the profile the calling test or benchmark was built
/// with: it runs from `target/<profile>/deps/`, the binaries sit in `target/<profile>/`.
pub fn binary_directory() -> PathBuf {
    let exe = std::env::current_exe().expect("a process knows its own executable");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("tests and benchmarks run from target/<profile>/deps")
}

/// `target/<profile>/<name>`, if it is built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = binary_directory().join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingBinary(path))
    }
}

/// A service process writing its log to a file; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `target/<profile>/<name>` with only `PATH` and `env` in its environment, its
    /// stdout and stderr appended to `<logs>/<name>.log`.
    pub fn start(name: &'static str, logs: &Path, env: &[(&str, String)]) -> Result<Service> {
        Service::start_with(name, name, logs, env, &[])
    }

    /// As [`Service::start`], with `arguments` (`ledger serve`) and the log in
    /// `<logs>/<label>.log` (one file per start of the same binary).
    pub fn start_with(
        name: &'static str,
        label: &str,
        logs: &Path,
        env: &[(&str, String)],
        arguments: &[&str],
    ) -> Result<Service> {
        let spawn = |source| Error::Spawn { name, source };
        let program = binary(name)?;
        let log = logs.join(format!("{label}.log"));
        let file = std::fs::File::create(&log).map_err(spawn)?;
        let errors = file.try_clone().map_err(spawn)?;
        let mut command = Command::new(program);
        command
            .args(arguments)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(errors));
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().map_err(spawn)?;
        Ok(Service { name, child, log })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The process id, for `/proc/<pid>/status`.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The port the service bound, if its `<name> listening` line is in the log yet.
    pub fn logged_port_now(&self) -> Option<u16> {
        self.logged_port(&format!("{} listening", self.name))
    }

    /// The port the service bound, from its `<name> listening` JSON log line. Services start on
    /// port 0, so nothing else can take a port between our choosing it and the service binding
    /// it.
    pub async fn port(&mut self, within: Duration) -> Result<u16> {
        let message = format!("{} listening", self.name);
        let started = Instant::now();
        loop {
            if let Some(port) = self.logged_port(&message) {
                return Ok(port);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Exited {
                    name: self.name,
                    status,
                    log_tail: self.log_tail(),
                });
            }
            if started.elapsed() > within {
                return Err(Error::NotListening {
                    name: self.name,
                    waited: within,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn logged_port(&self, message: &str) -> Option<u16> {
        self.log().lines().find_map(|line| {
            let line: Value = serde_json::from_str(line).ok()?;
            if line["message"] != message {
                return None;
            }
            line["port"]
                .as_u64()
                .and_then(|port| u16::try_from(port).ok())
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks the service to stop (SIGTERM: it drains, as on a deploy), waits up to `grace`, then
    /// kills it.
    pub fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let started = Instant::now();
        while started.elapsed() < grace {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last [`LOG_TAIL_LINES`] lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

/// How long a dropped service gets to stop before it is killed.
const DROP_GRACE: Duration = Duration::from_secs(10);

impl Drop for Service {
    fn drop(&mut self) {
        self.stop(DROP_GRACE);
    }
}

/// Deletes every key of `redis_url` that starts with `prefix` and returns how many there were.
/// `prefix` must be one a test or benchmark made up itself: this deletes whatever matches.
pub async fn delete_redis_keys(redis_url: &str, prefix: &str) -> Result<usize> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(REDIS_DELETE_BATCH)
            .query_async(&mut connection)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort_unstable();
    keys.dedup();
    for batch in keys.chunks(REDIS_DELETE_BATCH) {
        redis::cmd("DEL")
            .arg(batch)
            .query_async::<()>(&mut connection)
            .await?;
    }
    Ok(keys.len())
}
