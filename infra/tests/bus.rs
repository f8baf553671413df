//! The bus conformance suite (`infra::bus_conformance!`) against both implementations: RabbitMQ
//! (a topology of its own per test, deleted after) and the embedded bus (the SQLite event log
//! and checkpoint store in a temporary directory).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use infra::amqp::{self, Topology};
use infra::bus::conformance::{BusPair, Running};
use infra::bus::local::{LocalPublisher, LogConsumer, LogConsumerSettings, SqliteBusStore};
use infra::bus::rabbit::{RabbitConsumer, RabbitConsumerSettings, RabbitPublisher};
use infra::bus::{Disposition, Handler, Message, Outgoing, Publisher};
use infra::eventlog::sqlite::SqliteEventLog;
use infra::eventlog::{Append, EventLog, EventMetadata, LogFilter, NewEvent, StreamId};
use lapin::options::BasicGetOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a stopped test consumer lets its messages in hand finish.
const DRAIN: Duration = Duration::from_millis(500);

mod rabbit {
    use super::*;

    struct RabbitBus {
        url: String,
        topology: Topology,
        input: RabbitPublisher,
        dead: Mutex<Vec<(String, String)>>,
    }

    /// Deletes the test's topology when the check ends, passed or not.
    struct Cleanup {
        url: String,
        topology: Topology,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let (url, topology) = (self.url.clone(), self.topology.clone());
            infra::tasks::block_on_own_runtime(async move {
                let _ = amqp::delete_topology(&url, &topology).await;
            });
        }
    }

    async fn fresh() -> (Arc<dyn BusPair>, Cleanup) {
        infra::testing::init_test_logging();
        let url = infra::testing::amqp_url();
        let prefix = format!("test-bus-{}", Uuid::new_v4().simple());
        let topology = Topology::new(&prefix).expect("a valid prefix");
        let connection = amqp::connect(&url).await.expect("RabbitMQ answers");
        let channel = connection.create_channel().await.expect("a channel");
        topology.declare(&channel).await.expect("declares");
        let _ = connection.close(200, "declared".into()).await;
        let input = RabbitPublisher::new(
            &url,
            "bus-test input",
            topology.events_exchange(),
            amqp::TRANSACTION_CREATED_KEY,
        );
        let bus = RabbitBus {
            url: url.clone(),
            topology: topology.clone(),
            input,
            dead: Mutex::new(Vec::new()),
        };
        (Arc::new(bus), Cleanup { url, topology })
    }

    impl RabbitBus {
        fn consumer(&self, queue: String, handler: Arc<dyn Handler>) -> Running {
            let mut settings =
                RabbitConsumerSettings::new(&self.url, self.topology.clone(), queue, "bus-test");
            settings.prefetch = 8;
            settings.drain_timeout = DRAIN;
            let consumer = Arc::new(RabbitConsumer::new(settings, handler));
            let cancel = CancellationToken::new();
            let task = tokio::spawn(consumer.run(None, cancel.clone()));
            Running::new(cancel, Some(task))
        }
    }

    #[async_trait]
    impl BusPair for RabbitBus {
        async fn send(&self, message_id: Uuid) {
            self.input
                .publish(Outgoing {
                    message_id: message_id.to_string(),
                    kind: "TransactionCreated".to_owned(),
                    correlation_id: format!("corr-{message_id}"),
                    causation_id: format!("cause-{message_id}"),
                    body: b"{}".to_vec(),
                })
                .await
                .expect("publishes");
        }

        async fn start(&self, handler: Arc<dyn Handler>) -> Running {
            self.consumer(self.topology.fraud_queue(), handler)
        }

        async fn poisoned(&self) -> Vec<(String, String)> {
            let connection = amqp::connect(&self.url).await.expect("RabbitMQ answers");
            let channel = connection.create_channel().await.expect("a channel");
            let queue = Topology::dead_letter_queue(&self.topology.fraud_queue());
            let mut dead = self.dead.lock().expect("not poisoned").clone();
            while let Some(message) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("reads the dead-letter queue")
            {
                let properties = &message.delivery.properties;
                let id = properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                let reason = amqp::header_str(properties, amqp::DEAD_LETTER_REASON_HEADER)
                    .unwrap_or_default();
                dead.push((id, reason));
            }
            let _ = connection.close(200, "read".into()).await;
            self.dead.lock().expect("not poisoned").clone_from(&dead);
            dead
        }

        async fn publisher(&self, handler: Arc<dyn Handler>) -> (Arc<dyn Publisher>, Running) {
            let running = self.consumer(self.topology.decisions_queue(), handler);
            let publisher = RabbitPublisher::new(
                &self.url,
                "bus-test decisions",
                self.topology.decisions_exchange(),
                amqp::FRAUD_DECISION_KEY,
            );
            (Arc::new(publisher), running)
        }
    }

    infra::bus_conformance!(fresh);

    /// Counts deliveries per message id; holds `slow` until `release_after` others were handled.
    struct Counting {
        seen: Mutex<HashMap<String, usize>>,
        others: AtomicUsize,
        slow: Option<(String, usize)>,
        /// Notified each time another message was handled.
        handled: tokio::sync::Notify,
    }

    impl Counting {
        fn new(slow: Option<(Uuid, usize)>) -> Arc<Self> {
            Arc::new(Counting {
                seen: Mutex::new(HashMap::new()),
                others: AtomicUsize::new(0),
                slow: slow.map(|(id, after)| (id.to_string(), after)),
                handled: tokio::sync::Notify::new(),
            })
        }

        fn count(&self, id: Uuid) -> usize {
            let seen = self.seen.lock().expect("not poisoned");
            seen.get(&id.to_string()).copied().unwrap_or(0)
        }
    }

    #[async_trait]
    impl Handler for Counting {
        async fn handle(&self, message: &Message) -> Disposition {
            let id = message.message_id.clone().unwrap_or_default();
            *self
                .seen
                .lock()
                .expect("not poisoned")
                .entry(id.clone())
                .or_insert(0) += 1;
            match &self.slow {
                Some((slow, after)) if *slow == id => {
                    while self.others.load(Ordering::SeqCst) < *after {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                _ => {
                    self.others.fetch_add(1, Ordering::SeqCst);
                    self.handled.notify_one();
                }
            }
            Disposition::Ack
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !check() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// After a restart, a message sent now arrives and none of `earlier` comes again: every one
    /// of them was acknowledged.
    async fn none_comes_again(bus: &Arc<dyn BusPair>, earlier: &[Uuid]) {
        let later = Uuid::new_v4();
        bus.send(later).await;
        let again = Counting::new(None);
        let running = bus.start(again.clone()).await;
        eventually("the message sent after the restart was handled", || {
            again.count(later) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let redelivered = earlier.iter().filter(|id| again.count(**id) > 0).count();
        running.stop().await;
        assert_eq!(
            redelivered, 0,
            "acknowledged messages came again after a restart"
        );
    }

    /// Acks go in windows below the oldest message in hand (decision 51). A message held by a
    /// slow handler must not hold back the acks of those after it: with a prefetch of 8, the
    /// broker would stop delivering after 7 of them.
    #[tokio::test]
    async fn a_slow_message_does_not_hold_back_the_others() {
        let (bus, _cleanup) = fresh().await;
        let slow = Uuid::new_v4();
        let others: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
        bus.send(slow).await;
        for id in &others {
            bus.send(*id).await;
        }
        let handler = Counting::new(Some((slow, others.len())));
        let running = bus.start(handler.clone()).await;
        eventually(
            "the messages after the held one were handled while it was held",
            || handler.others.load(Ordering::SeqCst) >= others.len(),
        )
        .await;
        eventually("the held message finished", || handler.count(slow) == 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        running.stop().await;
        let mut all = others.clone();
        all.push(slow);
        none_comes_again(&bus, &all).await;
    }

    /// The acks still waiting in the window when a consumer stops are sent before its channel
    /// closes: stopping right after the last handler returned redelivers nothing.
    #[tokio::test]
    async fn a_stop_acknowledges_what_was_finished() {
        let (bus, _cleanup) = fresh().await;
        // Fewer than half the prefetch: only the flush timer or the stop sends their acks.
        let sent: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        for id in &sent {
            bus.send(*id).await;
        }
        let handler = Counting::new(None);
        let running = bus.start(handler.clone()).await;
        // Stop the moment the last handler returned, before any flush interval passes.
        tokio::time::timeout(Duration::from_secs(20), async {
            while handler.others.load(Ordering::SeqCst) < sent.len() {
                handler.handled.notified().await;
            }
        })
        .await
        .expect("every message was handled");
        running.stop().await;
        none_comes_again(&bus, &sent).await;
    }
}

mod local {
    use super::*;

    const CONSUMER: &str = "bus-test";

    struct LocalBus {
        log: Arc<SqliteEventLog>,
        store: SqliteBusStore,
    }

    async fn fresh() -> (Arc<dyn BusPair>, tempfile::TempDir) {
        infra::testing::init_test_logging();
        let directory = tempfile::tempdir().expect("a temporary directory");
        let path = directory.path().join("ledger.sqlite");
        let log = SqliteEventLog::open_file(&path, 4).await.expect("opens");
        let pool = infra::sqlite::pool(infra::sqlite::options(&path, true), 4)
            .await
            .expect("opens");
        let store = SqliteBusStore::open(pool).await.expect("migrates");
        let bus = LocalBus {
            log: Arc::new(log),
            store,
        };
        (Arc::new(bus), directory)
    }

    #[async_trait]
    impl BusPair for LocalBus {
        async fn send(&self, message_id: Uuid) {
            let outcomes = self
                .log
                .append(vec![Append {
                    stream: StreamId::new("transaction", message_id.to_string()),
                    expected_version: 0,
                    events: vec![NewEvent {
                        event_id: message_id,
                        event_type: "TransactionCreated".to_owned(),
                        event_version: "1".to_owned(),
                        payload: "{}".to_owned(),
                        metadata: EventMetadata {
                            correlation_id: format!("corr-{message_id}"),
                            causation_id: format!("cause-{message_id}"),
                            actor: "test".to_owned(),
                            command_id: message_id.to_string(),
                        },
                    }],
                }])
                .await
                .expect("appends");
            assert!(outcomes[0].written().is_some(), "appended");
        }

        async fn start(&self, handler: Arc<dyn Handler>) -> Running {
            let mut settings = LogConsumerSettings::new(
                CONSUMER,
                LogFilter::event("transaction", "TransactionCreated"),
            );
            settings.drain_timeout = DRAIN;
            settings.poll_interval = Duration::from_millis(200);
            let log: Arc<dyn EventLog> = self.log.clone();
            let consumer = Arc::new(LogConsumer::new(log, self.store.clone(), handler, settings));
            let cancel = CancellationToken::new();
            let task = tokio::spawn(consumer.run(cancel.clone()));
            Running::new(cancel, Some(task))
        }

        async fn poisoned(&self) -> Vec<(String, String)> {
            self.store
                .poison(CONSUMER)
                .await
                .expect("reads poison")
                .into_iter()
                .map(|record| (record.message_id, record.reason))
                .collect()
        }

        async fn publisher(&self, handler: Arc<dyn Handler>) -> (Arc<dyn Publisher>, Running) {
            (
                Arc::new(LocalPublisher::new(handler)),
                Running::new(CancellationToken::new(), None),
            )
        }
    }

    infra::bus_conformance!(fresh);
}
