//! The embedded mode in the kit: `ledger serve` as a process on a data directory of its own,
//! with `DATABASE_URL`, `AMQP_URL` and `REDIS_URL` pointing at closed ports, so a test that
//! passes proves it needs none of those servers (SPEC §10). It can be killed (`kill -9`) and
//! started again on the same directory.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::{ADMIN_PASSWORD, ADMIN_USERNAME, SECRET, Service, eventually};

/// A port nothing listens on: connecting to it is refused at once.
const CLOSED: &str = "127.0.0.1:1";

/// `ledger serve` on a data directory of its own.
pub struct Embedded {
    pub service: Service,
    /// `http://127.0.0.1:<port>` of the public API and of `/metrics`.
    pub base: String,
    pub metrics: String,
    pub data: PathBuf,
    pub client: reqwest::Client,
    logs: PathBuf,
    starts: usize,
}

impl Embedded {
    /// Starts `ledger serve` on a fresh directory and waits until `/health` is ok.
    pub async fn start() -> Embedded {
        let root = std::env::temp_dir().join(format!("ledger-serve-{}", Uuid::new_v4().simple()));
        let data = root.join("data");
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).expect("a log directory");
        let mut embedded = Embedded {
            service: start_serve(&data, &logs, 0),
            base: String::new(),
            metrics: String::new(),
            data,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a client"),
            logs,
            starts: 1,
        };
        embedded.wait_until_healthy().await;
        embedded
    }

    async fn wait_until_healthy(&mut self) {
        let port = self.service.port().await;
        let metrics = self.service.port_of("ledger metrics listening").await;
        self.base = format!("http://127.0.0.1:{port}");
        self.metrics = format!("http://127.0.0.1:{metrics}");
        let (client, base) = (&self.client, &self.base);
        eventually(
            "ledger serve reports ok",
            Duration::from_secs(60),
            || async move {
                let Ok(response) = client.get(format!("{base}/health")).send().await else {
                    return false;
                };
                let body: Value = response.json().await.unwrap_or_default();
                body["status"] == "ok"
            },
        )
        .await;
    }

    /// `kill -9`, then a new `ledger serve` on the same directory (its own log file).
    pub async fn kill_and_restart(&mut self) {
        self.service.kill();
        self.service = start_serve(&self.data, &self.logs, self.starts);
        self.starts += 1;
        self.wait_until_healthy().await;
    }

    /// Every log of every start, in order.
    pub fn logs(&self) -> String {
        (0..self.starts)
            .map(|start| {
                std::fs::read_to_string(self.logs.join(format!("ledger-{start}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Stops the process gracefully and deletes the directory.
    pub fn finish(mut self) {
        self.service.stop();
        self.clean_up();
    }

    fn clean_up(&mut self) {
        if let Some(root) = self.data.parent() {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.service.stop();
        self.clean_up();
    }
}

fn start_serve(data: &std::path::Path, logs: &std::path::Path, start: usize) -> Service {
    Service::start_with_args(
        "ledger",
        &format!("ledger-{start}"),
        logs,
        &[
            ("LEDGER_DATA", data.display().to_string()),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("ADMIN_USERNAME", ADMIN_USERNAME.to_owned()),
            ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
            ("JWT_SECRET", SECRET.to_owned()),
            // Servers it must not need: closed ports.
            (
                "DATABASE_URL",
                format!("postgres://postgres@{CLOSED}/ledger"),
            ),
            ("AMQP_URL", format!("amqp://guest:guest@{CLOSED}/%2f")),
            ("REDIS_URL", format!("redis://{CLOSED}")),
        ],
        &["serve"],
    )
}
