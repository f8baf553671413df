//! Which event store a service uses: `EVENT_STORE=postgres|kurrentdb`, with `KURRENTDB_URL`.
//! Shared by command-api, the projector and the CLI (`#[command(flatten)]`), checked at start:
//! a bad choice fails there, naming the variable, never at the first request. Read models,
//! checkpoints and the rest stay in PostgreSQL whichever store holds the log.

use std::fmt;
use std::sync::Arc;

use clap::Args;

use super::EventLog;
use crate::error::{Error, Result};

/// Where the event log lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStoreKind {
    /// `command_api.events` in PostgreSQL (the default).
    Postgres,
    /// A KurrentDB (EventStoreDB) server; needs a build with the `kurrentdb` feature.
    KurrentDb,
}

impl EventStoreKind {
    pub fn parse_arg(text: &str) -> std::result::Result<Self, String> {
        match text {
            "postgres" => Ok(EventStoreKind::Postgres),
            "kurrentdb" => Ok(EventStoreKind::KurrentDb),
            other => Err(format!(
                "unknown event store {other:?}: postgres or kurrentdb"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventStoreKind::Postgres => "postgres",
            EventStoreKind::KurrentDb => "kurrentdb",
        }
    }
}

/// Whether this build can talk to KurrentDB.
pub const KURRENTDB_BUILT_IN: bool = cfg!(feature = "kurrentdb");

#[derive(Clone, Args)]
pub struct EventStoreConfig {
    /// Where the event log lives: `postgres`, or `kurrentdb` (a build with the cargo feature
    /// `kurrentdb`, and `KURRENTDB_URL`). Read models and checkpoints stay in PostgreSQL.
    #[arg(long, env = "EVENT_STORE", default_value = "postgres",
          value_parser = EventStoreKind::parse_arg)]
    pub event_store: EventStoreKind,

    /// The KurrentDB connection string (`kurrentdb://host:2113?tls=false`) when
    /// `EVENT_STORE=kurrentdb`. May hold credentials: never logged.
    #[arg(long, env = "KURRENTDB_URL")]
    pub kurrentdb_url: Option<String>,

    /// The first part of the ledger's stream names in KurrentDB (`<prefix>-account-<id>`).
    #[arg(long, env = "KURRENTDB_STREAM_PREFIX", default_value = "ledger")]
    pub kurrentdb_stream_prefix: String,
}

impl fmt::Debug for EventStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Default for EventStoreConfig {
    fn default() -> Self {
        EventStoreConfig {
            event_store: EventStoreKind::Postgres,
            kurrentdb_url: None,
            kurrentdb_stream_prefix: "ledger".to_owned(),
        }
    }
}

impl EventStoreConfig {
    pub fn is_kurrentdb(&self) -> bool {
        self.event_store == EventStoreKind::KurrentDb
    }

    /// Checks the choice without connecting: the feature is built in, the URL is there and
    /// well formed, the prefix is a plain word.
    pub fn validate(&self) -> Result<()> {
        if !self.is_kurrentdb() {
            return Ok(());
        }
        if !KURRENTDB_BUILT_IN {
            return Err(Error::Config(
                "EVENT_STORE=kurrentdb needs a build with the cargo feature `kurrentdb` (cargo \
                 build --release --features command-api/kurrentdb,projector/kurrentdb,\
                 ledger/kurrentdb); this build holds the PostgreSQL event log only"
                    .to_owned(),
            ));
        }
        let Some(url) = self.kurrentdb_url.as_deref().filter(|url| !url.is_empty()) else {
            return Err(Error::Config(
                "EVENT_STORE=kurrentdb needs KURRENTDB_URL (kurrentdb://host:2113?tls=false)"
                    .to_owned(),
            ));
        };
        #[cfg(feature = "kurrentdb")]
        {
            super::kurrentdb::parse_url(url)?;
            super::kurrentdb::StreamNames::new(&self.kurrentdb_stream_prefix)?;
        }
        let _ = url;
        Ok(())
    }

    /// The KurrentDB event log when it is the chosen store, `None` for PostgreSQL (whose log
    /// each service opens over its own pools, as before).
    pub async fn open_kurrentdb(&self) -> Result<Option<Arc<dyn EventLog>>> {
        self.validate()?;
        if !self.is_kurrentdb() {
            return Ok(None);
        }
        #[cfg(feature = "kurrentdb")]
        {
            let settings = super::kurrentdb::KurrentDbSettings {
                url: self.kurrentdb_url.clone().unwrap_or_default(),
                stream_prefix: self.kurrentdb_stream_prefix.clone(),
            };
            let log = super::kurrentdb::KurrentDbEventLog::connect(&settings).await?;
            Ok(Some(Arc::new(log)))
        }
        #[cfg(not(feature = "kurrentdb"))]
        {
            Err(Error::Config(
                "EVENT_STORE=kurrentdb needs a build with the cargo feature `kurrentdb`".to_owned(),
            ))
        }
    }

    /// The settings as a log line shows them: the URL is never printed.
    pub fn redacted(&self) -> String {
        match self.event_store {
            EventStoreKind::Postgres => "event_store=postgres".to_owned(),
            EventStoreKind::KurrentDb => format!(
                "event_store=kurrentdb kurrentdb_url={} kurrentdb_stream_prefix={}",
                if self.kurrentdb_url.is_some() {
                    "<set>"
                } else {
                    "<unset>"
                },
                self.kurrentdb_stream_prefix
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        store: EventStoreConfig,
    }

    fn parse(args: &[&str]) -> std::result::Result<EventStoreConfig, String> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .map(|cli| cli.store)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn postgres_is_the_default_and_needs_nothing_else() {
        let store = parse(&[]).expect("parses");
        assert_eq!(store.event_store, EventStoreKind::Postgres);
        assert!(store.validate().is_ok());
    }

    #[test]
    fn an_unknown_store_is_refused_naming_the_choices() {
        let error = parse(&["--event-store", "mongodb"]).expect_err("refused");
        assert!(error.contains("postgres or kurrentdb"), "{error}");
    }

    #[test]
    fn kurrentdb_needs_the_feature_and_a_url() {
        let store = parse(&["--event-store", "kurrentdb"]).expect("parses");
        let error = store.validate().expect_err("refused").to_string();
        if KURRENTDB_BUILT_IN {
            assert!(error.contains("KURRENTDB_URL"), "{error}");
        } else {
            assert!(error.contains("cargo feature `kurrentdb`"), "{error}");
        }
        let store = parse(&[
            "--event-store",
            "kurrentdb",
            "--kurrentdb-url",
            "kurrentdb://admin:hunter2@localhost:2113?tls=false",
        ])
        .expect("parses");
        assert_eq!(store.validate().is_ok(), KURRENTDB_BUILT_IN);
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[cfg(feature = "kurrentdb")]
    #[test]
    fn kurrentdb_settings_are_checked_without_connecting() {
        let store = parse(&[
            "--event-store",
            "kurrentdb",
            "--kurrentdb-url",
            "http://localhost:2113",
        ])
        .expect("parses");
        let error = store.validate().expect_err("refused").to_string();
        assert!(error.contains("KURRENTDB_URL"), "{error}");
        let store = parse(&[
            "--event-store",
            "kurrentdb",
            "--kurrentdb-url",
            "kurrentdb://localhost:2113?tls=false",
            "--kurrentdb-stream-prefix",
            "bad-prefix",
        ])
        .expect("parses");
        let error = store.validate().expect_err("refused").to_string();
        assert!(error.contains("KURRENTDB_STREAM_PREFIX"), "{error}");
    }
}
