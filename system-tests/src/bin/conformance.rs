//! `conformance`: runs schemathesis against the real system, as `.ci/run` does (issue 11, "API
//! conformance"). It starts the four service binaries with the system tests' kit (a scratch
//! database, an AMQP prefix and Redis prefixes of their own, all deleted at the end), mints an
//! admin token as `ledger token` would, and runs
//!
//! ```text
//! <schemathesis> --config-file .ci/schemathesis.toml run <gateway>/api/v1/openapi.json
//! ```
//!
//! with the token in `LEDGER_TOKEN` (the configuration reads it). The path to schemathesis is
//! the first argument. Exit status: schemathesis's.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use infra::auth::Role;
use system_tests::{Overrides, System};
use uuid::Uuid;

/// The configuration, with a reason for every exclusion, beside the CI script.
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/schemathesis.toml");

#[tokio::main]
async fn main() -> ExitCode {
    let Some(schemathesis) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: conformance <path to schemathesis's `st`> [extra st run arguments]");
        return ExitCode::from(2);
    };
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let system = System::start(Overrides::default()).await;
    let token = system.token(Uuid::new_v4(), &[Role::Admin]);
    let schema = format!("{}/api/v1/openapi.json", system.gateway);
    eprintln!("conformance: schemathesis against {schema}");
    // schemathesis writes a report directory where it runs: a scratch one, deleted after.
    let scratch =
        std::env::temp_dir().join(format!("ledger-conformance-{}", Uuid::new_v4().simple()));
    if let Err(error) = std::fs::create_dir_all(&scratch) {
        eprintln!("conformance: cannot create {}: {error}", scratch.display());
        system.finish().await;
        return ExitCode::from(3);
    }
    let status = Command::new(&schemathesis)
        .current_dir(&scratch)
        .arg("--config-file")
        .arg(CONFIG)
        .arg("run")
        .arg(&schema)
        .args(&extra)
        .env("LEDGER_TOKEN", token)
        .status();
    system.finish().await;
    let _ = std::fs::remove_dir_all(&scratch);
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("conformance: schemathesis found problems ({status})");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!(
                "conformance: cannot run {}: {error}",
                schemathesis.display()
            );
            ExitCode::from(3)
        }
    }
}
