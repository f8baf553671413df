//! `ledger serve` (SPEC §10): the whole ledger in one process, on SQLite in a data directory,
//! with an in-process bus and cache.
//!
//! It builds the very parts the four services run, each on its embedded implementation of the
//! same seam: the event log ([`SqliteEventLog`]), the followers' state, leadership (the lock on
//! DIR makes this process the only one; inside it, [`LocalLeadership`]). No part below knows
//! which mode it runs in.

pub mod data_dir;
pub mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use command_api::aggregates::{AccountAggregate, TransactionAggregate};
use command_api::saga::{Saga, SagaSettings};
use command_api::state::{FollowerState, SqliteFollowerState};
use command_api::store::AggregateStore;
use infra::eventlog::EventLog;
use infra::eventlog::committer::CommitterSettings;
use infra::eventlog::sqlite::SqliteEventLog;
use infra::follow::FollowSettings;
use infra::leader::{Leadership, LocalLeadership};
use infra::telemetry::LogFormat;

use self::data_dir::{DataDir, Holder};
use crate::error::Result;

/// Connections reads take from the SQLite file (queries, loads, followers). Writes go through
/// the event log's one writer and short transactions of their own.
const READ_CONNECTIONS: u32 = 8;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The data directory: the SQLite file, the secrets of a first try, the lock.
    #[arg(long, env = "LEDGER_DATA", default_value = "ledger-data")]
    pub data: PathBuf,

    /// Where the public API listens.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Where `/metrics` listens, off the public listener.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,

    /// `json` or `pretty`.
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty", value_parser = LogFormat::parse_arg)]
    pub log_format: LogFormat,
}

/// What the command side needs from the storage of this mode.
struct Storage {
    log: Arc<dyn EventLog>,
    follower_state: Arc<dyn FollowerState>,
    leadership: Arc<dyn Leadership>,
}

async fn open_storage(dir: &DataDir) -> Result<Storage> {
    let options = infra::sqlite::options(&dir.database(), true);
    let reads = infra::sqlite::pool(options.clone(), READ_CONNECTIONS).await?;
    let log =
        SqliteEventLog::open(reads.clone(), Some(options), CommitterSettings::default()).await?;
    let follower_state = SqliteFollowerState::open(reads)
        .await
        .map_err(|error| crate::error::Error::Usage(error.to_string()))?;
    Ok(Storage {
        log: Arc::new(log),
        follower_state: Arc::new(follower_state),
        leadership: Arc::new(LocalLeadership::default()),
    })
}

/// The write side on `storage`: the two stores and the saga.
struct CommandSide {
    accounts: Arc<AggregateStore<AccountAggregate>>,
    transactions: Arc<AggregateStore<TransactionAggregate>>,
    saga: Arc<Saga>,
}

fn command_side(storage: &Storage, saga: SagaSettings) -> CommandSide {
    let accounts = Arc::new(AggregateStore::<AccountAggregate>::new(storage.log.clone()));
    let transactions = Arc::new(AggregateStore::<TransactionAggregate>::new(
        storage.log.clone(),
    ));
    let saga = Arc::new(Saga::new(
        accounts.clone(),
        transactions.clone(),
        storage.log.clone(),
        storage.follower_state.clone(),
        saga,
    ));
    CommandSide {
        accounts,
        transactions,
        saga,
    }
}

/// Runs `ledger serve` until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> Result<bool> {
    infra::telemetry::init_tracing(args.log_format);
    infra::telemetry::init_metrics();
    let dir = DataDir::lock(&args.data, Holder::Serve)?;
    let secrets = secrets::load_or_create(dir.path(), secrets::FromEnvironment::read())?;
    let storage = open_storage(&dir).await?;
    let _command = command_side(
        &storage,
        SagaSettings {
            batch_size: 512,
            concurrency: 16,
            decision_timeout: chrono::TimeDelta::seconds(300),
        },
    );
    let _ = FollowSettings::default();
    eprintln!("{}", secrets.announcement(&format!("http://{}", args.listen)));
    Ok(true)
}
