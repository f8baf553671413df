//! The `projector` binary: tracing, configuration, build, serve until SIGTERM or Ctrl-C.

use clap::Parser;
use infra::telemetry::{init_metrics, init_tracing, shutdown_signal};
use projector::config::Config;
use projector::startup::App;

/// mimalloc, as in every binary of the workspace: the system allocator cost a quarter of the
/// CPU of `ledger serve` under load (docs/dependencies.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_tracing(config.log_format);
    init_metrics();
    tracing::info!(config = %config.redacted(), "projector starting");
    let app = App::build(config).await?;
    tracing::info!(port = app.port(), "projector listening");
    app.run_until_stopped(shutdown_signal()).await?;
    tracing::info!("projector stopped");
    Ok(())
}
