//! The `command-api` binary: tracing, configuration, build, serve until SIGTERM or Ctrl-C.

use clap::Parser;
use command_api::config::Config;
use command_api::startup::App;
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
    tracing::info!(config = %config.redacted(), "command-api starting");
    let app = App::build(config).await?;
    tracing::info!(port = app.port(), "command-api listening");
    app.run_until_stopped(shutdown_signal()).await?;
    tracing::info!("command-api stopped");
    Ok(())
}
