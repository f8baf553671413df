//! The `fraud-worker` binary: tracing, configuration, build, consume and serve until SIGTERM or
//! Ctrl-C.

use clap::Parser;
use fraud_worker::config::Config;
use fraud_worker::startup::App;
use infra::telemetry::{init_metrics, init_tracing, shutdown_signal};

/// mimalloc, as in every binary of the workspace: the system allocator cost a quarter of the
/// CPU of `ledger serve` under load (docs/dependencies.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_tracing(config.log_format);
    init_metrics();
    tracing::info!(config = %config.redacted(), "fraud-worker starting");
    let app = App::build(config).await?;
    tracing::info!(port = app.port(), "fraud-worker listening");
    app.run_until_stopped(shutdown_signal()).await?;
    tracing::info!("fraud-worker stopped");
    Ok(())
}
