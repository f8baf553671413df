//! The event log's conformance suite against a live KurrentDB, when `TEST_KURRENTDB_URL` names
//! one (`kurrentdb://127.0.0.1:2113?tls=false`); each check is skipped, saying so, otherwise.
//! Every check gets a log of its own: a stream prefix nobody else uses, on the shared server.
//! (KurrentDB streams cannot be dropped cheaply; the test prefix keeps them apart instead.)

#![cfg(all(feature = "kurrentdb", feature = "testing"))]

use std::sync::Arc;

use infra::eventlog::EventLog;
use infra::eventlog::kurrentdb::{KurrentDbEventLog, KurrentDbSettings};

fn url() -> Option<String> {
    std::env::var("TEST_KURRENTDB_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

fn reachable() -> bool {
    if url().is_some() {
        return true;
    }
    println!(
        "skipped: TEST_KURRENTDB_URL is not set, so the KurrentDB event log was not checked \
         against a live server"
    );
    false
}

async fn fresh_kurrentdb_log() -> (Arc<dyn EventLog>, ()) {
    let settings = KurrentDbSettings {
        url: url().expect("checked by `reachable`"),
        stream_prefix: format!("test{}", uuid::Uuid::new_v4().simple()),
    };
    let log = KurrentDbEventLog::connect(&settings)
        .await
        .expect("the log opens");
    (Arc::new(log), ())
}

infra::event_log_conformance!(fresh_kurrentdb_log, skip_unless = reachable);
