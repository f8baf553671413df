//! `ledger migrate-log` against a real PostgreSQL log of 100,000 domain-valid events, copied into
//! the embedded mode's SQLite log in a temporary directory: counts and digests agree, and a copy
//! stopped half-way and run again ends with the very same log.

use std::path::Path;
use std::process::{Command, Output};

use infra::db::ScratchDatabase;
use infra::eventlog::sqlite::SqliteEventLog;
use infra::eventlog::{EventLog, LogFilter, LogPosition};

const EVENTS: usize = 100_000;

/// A scratch database, dropped when the test is over, whether it passed or not.
struct Scratch(Option<ScratchDatabase>);

impl Scratch {
    fn url(&self) -> String {
        self.0
            .as_ref()
            .map(ScratchDatabase::url)
            .unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(database) = self.0.take() {
            infra::tasks::block_on_own_runtime(async move {
                let _ = database.drop_database().await;
            });
        }
    }
}

fn migrate(database_url: &str, data: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("migrate-log")
        .arg("--to-data")
        .arg(data)
        .args(extra)
        .env("DATABASE_URL", database_url)
        .env_remove("READ_DATABASE_URL")
        .env_remove("EVENT_STORE")
        .env_remove("KURRENTDB_URL")
        .output()
        .expect("the ledger binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The `sha256 …` of the line starting with `label` (`source:` or `target:`).
fn digest_line(output: &str, label: &str) -> String {
    output
        .lines()
        .find(|line| line.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in:\n{output}"))
        .to_owned()
}

/// How many events the SQLite log in `data` holds, and that they read back in order.
async fn sqlite_events(data: &Path) -> usize {
    let log = SqliteEventLog::open_file(&data.join("ledger.db"), 2)
        .await
        .expect("the copy opens");
    let mut after = LogPosition::START;
    let mut count = 0;
    loop {
        let batch = log
            .read_all(after, 10_000, LogFilter::ALL)
            .await
            .expect("the copy reads");
        let Some(last) = batch.last() else {
            return count;
        };
        after = last.position;
        count += batch.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_event_postgres_log_is_copied_into_sqlite_whole_and_resumably() {
    let database = Scratch(Some(
        ScratchDatabase::create(&infra::testing::admin_url())
            .await
            .expect("a scratch database"),
    ));
    let url = database.url();
    {
        let pool = infra::db::connect(&url, "command_api", 4, "test")
            .await
            .expect("connects");
        command_api::startup::migrate(&pool)
            .await
            .expect("migrates");
        let builder = infra::testing::log_builder::build_log(EVENTS, 200);
        infra::testing::log_builder::insert_log(&pool, "command_api.events", &builder)
            .await
            .expect("the log is seeded");
        let seeded = builder.rows.len();
        pool.close().await;

        // One copy, start to end.
        let whole = tempfile::tempdir().expect("a temporary directory");
        let output = migrate(&url, whole.path(), &[]);
        assert_succeeded(&output);
        let text = stdout(&output);
        assert!(
            text.contains("OK: the target holds the same events"),
            "{text}"
        );
        assert!(text.contains("identity"), "says what is not copied: {text}");
        let source = digest_line(&text, "source:");
        assert!(
            source.starts_with(&format!("source: {seeded} events")),
            "{source}"
        );
        assert_eq!(
            digest_line(&text, "target:").replace("target:", ""),
            source.replace("source:", ""),
        );
        assert_eq!(sqlite_events(whole.path()).await, seeded);

        // The copy is a ledger `serve` can take over: its read models are rebuilt from it, and
        // every invariant and every row checks out.
        let data = whole.path().to_str().expect("a UTF-8 path");
        let rebuild = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["rebuild", "--data", data])
            .output()
            .expect("the ledger binary runs");
        assert_succeeded(&rebuild);
        assert!(
            stdout(&rebuild).contains(&format!("{seeded} events")),
            "{}",
            stdout(&rebuild)
        );
        let verify = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["verify", "--data", data])
            .output()
            .expect("the ledger binary runs");
        assert_succeeded(&verify);
        assert!(
            stdout(&verify).contains("OK: invariants hold"),
            "{}",
            stdout(&verify)
        );

        // A copy stopped part-way (mid-batch, mid-stream), then run again: the same log.
        let sliced = tempfile::tempdir().expect("a temporary directory");
        let first = migrate(
            &url,
            sliced.path(),
            &["--max-events", "37123", "--batch-size", "1000"],
        );
        assert_succeeded(&first);
        assert!(
            stdout(&first).contains("stopped at --max-events"),
            "{}",
            stdout(&first)
        );
        assert_eq!(sqlite_events(sliced.path()).await, 37_123);
        let resumed = migrate(&url, sliced.path(), &[]);
        assert_succeeded(&resumed);
        let text = stdout(&resumed);
        assert!(text.contains("37123 there before"), "{text}");
        assert!(
            text.contains("OK: the target holds the same events"),
            "{text}"
        );
        assert_eq!(digest_line(&text, "source:"), source);
        assert_eq!(
            digest_line(&text, "target:").replace("target:", ""),
            source.replace("source:", ""),
        );

        // Running it again on a complete copy appends nothing and still verifies.
        let again = migrate(&url, sliced.path(), &[]);
        assert_succeeded(&again);
        assert!(
            stdout(&again).contains("copied: 0 events appended now"),
            "{}",
            stdout(&again)
        );
    }
}
