//! The fraud rules without RabbitMQ or Redis, wired as `ledger serve` wires them: a
//! `LogConsumer` following the SQLite event log, the SQLite counters, and a `LocalPublisher`
//! handing each decision to the next handler (here a recorder standing in for command-api's).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use domain::{AccountId, FraudOutcome};
use fraud_worker::handler::FraudRules;
use fraud_worker::testing::{TestOptions, TestPayment, test_config};
use fraud_worker::velocity::SqliteCounters;
use infra::bus::local::{LocalPublisher, LogConsumer, LogConsumerSettings, SqliteBusStore};
use infra::bus::{Disposition, Handler, Message};
use infra::eventlog::sqlite::SqliteEventLog;
use infra::eventlog::{Append, EventLog, EventMetadata, LogFilter, NewEvent, StreamId};
use infra::messages::{DecisionMessage, EventMessage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::WAIT;

/// Records decisions; fails the first `failures` it is handed (the decision append failing).
struct Decisions {
    seen: Mutex<Vec<DecisionMessage>>,
    failures: Mutex<usize>,
}

#[async_trait]
impl Handler for Decisions {
    async fn handle(&self, message: &Message) -> Disposition {
        let decision: DecisionMessage =
            serde_json::from_slice(&message.body).expect("a decision message");
        self.seen.lock().expect("not poisoned").push(decision);
        let mut failures = self.failures.lock().expect("not poisoned");
        if *failures > 0 {
            *failures -= 1;
            return Disposition::Retry("the log is away".to_owned());
        }
        Disposition::Ack
    }
}

async fn append(log: &SqliteEventLog, message: &EventMessage) {
    let metadata: EventMetadata =
        serde_json::from_value(message.metadata.clone()).expect("metadata");
    log.append(vec![Append {
        stream: StreamId::new("transaction", message.aggregate_id.clone()),
        expected_version: 0,
        events: vec![NewEvent {
            event_id: message.event_id,
            event_type: message.event_type.clone(),
            event_version: message.event_version.clone(),
            payload: message.payload.to_string(),
            metadata,
        }],
    }])
    .await
    .expect("appends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_decide_from_the_log_and_a_failed_decision_comes_again() {
    // Proves the embedded wiring: each TransactionCreated in the log is decided by the same
    // rules, with the velocity counted in SQLite; a decision whose hand-over failed is decided
    // again (the checkpoint did not move) and counted once.
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("ledger.sqlite");
    let log = Arc::new(SqliteEventLog::open_file(&path, 4).await.expect("opens"));
    let pool = infra::sqlite::pool(infra::sqlite::options(&path, true), 4)
        .await
        .expect("opens");
    let store = SqliteBusStore::open(pool.clone()).await.expect("migrates");
    let counters = Arc::new(SqliteCounters::open(pool).await.expect("migrates"));
    let options = TestOptions {
        velocity_limit: 1_000,
        ..TestOptions::default()
    };
    let rules = Arc::new(test_config("unused", "unused", &options).rules());
    let decisions = Arc::new(Decisions {
        seen: Mutex::new(Vec::new()),
        failures: Mutex::new(1),
    });
    let publisher = Arc::new(LocalPublisher::new(decisions.clone()));
    let fraud_rules = Arc::new(FraudRules::new(rules, counters, publisher));
    let mut settings = LogConsumerSettings::new(
        "fraud-rules",
        LogFilter::event("transaction", "TransactionCreated"),
    );
    settings.poll_interval = Duration::from_millis(200);
    let events: Arc<dyn EventLog> = log.clone();
    let consumer = Arc::new(LogConsumer::new(
        events,
        store.clone(),
        fraud_rules,
        settings,
    ));
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.run(cancel.clone()));

    let account = AccountId(Uuid::new_v4());
    let first = TestPayment::withdrawal("600.00", "EUR", account);
    let second = TestPayment::withdrawal("600.00", "EUR", account);
    append(&log, &first.event("corr-embedded-1")).await;
    append(&log, &second.event("corr-embedded-2")).await;

    let started = std::time::Instant::now();
    let final_decisions = loop {
        let seen = decisions.seen.lock().expect("not poisoned").clone();
        if seen.len() >= 3 || started.elapsed() > WAIT {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(final_decisions.len(), 3, "{final_decisions:?}");
    assert_eq!(
        final_decisions[0].decision_id, final_decisions[1].decision_id,
        "the failed hand-over came again with the same decision"
    );
    assert_eq!(final_decisions[1].transaction_id, first.transaction_id);
    assert_eq!(
        final_decisions[1].outcome,
        FraudOutcome::Approved,
        "counted once: 600 of 1000"
    );
    assert_eq!(final_decisions[2].transaction_id, second.transaction_id);
    assert_eq!(final_decisions[2].outcome, FraudOutcome::Rejected);
    assert_eq!(final_decisions[2].rule.as_deref(), Some("velocity"));

    cancel.cancel();
    running.await.expect("the consumer stops");
    assert!(store.poison("fraud-rules").await.expect("reads").is_empty());
    assert!(
        store.checkpoint("fraud-rules").await.expect("reads") > infra::log::LogPosition::START,
        "the checkpoint moved past the decided events"
    );
}
