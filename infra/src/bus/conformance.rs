//! The bus's conformance suite: one set of checks every pair of consumer and publisher passes
//! (RabbitMQ; the event log with a SQLite checkpoint and the in-process publisher). Each check
//! takes a fresh bus and panics with what it found.
//!
//! An implementation's tests instantiate the suite with [`bus_conformance!`], giving it an async
//! function that returns a fresh [`BusPair`] and the value to keep alive (and clean up) while it
//! is used:
//!
//! ```ignore
//! infra::bus_conformance!(fresh_rabbit_bus);
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Disposition, Handler, Message, Outgoing, Publisher};

/// Instantiates every check of the suite as a `#[tokio::test]`, each on a bus from `$fresh`,
/// an `async fn() -> (Arc<dyn BusPair>, G)` where `G` is dropped after the check.
#[macro_export]
macro_rules! bus_conformance {
    ($fresh:path) => {
        $crate::bus_conformance!(@checks $fresh;
            published_messages_reach_the_handler,
            acknowledged_messages_are_not_delivered_again,
            a_failed_message_comes_again,
            messages_in_hand_at_a_restart_come_again,
            poison_is_recorded_and_not_delivered_again
        );
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (bus, _keep) = $fresh().await;
                $crate::bus::conformance::$check(bus).await;
            }
        )*
    };
}

/// A consumer that runs until stopped.
pub struct Running {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    pub fn new(cancel: CancellationToken, task: Option<JoinHandle<()>>) -> Self {
        Running { cancel, task }
    }

    /// Stops the consumer (it drains) and waits for it.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One implementation of the bus, as the suite drives it.
#[async_trait]
pub trait BusPair: Send + Sync + 'static {
    /// Puts a message with id `message_id` on the consumer's input (publishes it to the queue,
    /// or appends the event the consumer follows).
    async fn send(&self, message_id: Uuid);
    /// Starts the input's consumer on `handler`. Its drain timeout is short (under a second).
    async fn start(&self, handler: Arc<dyn Handler>) -> Running;
    /// The ids and reasons of the input's messages recorded as poison.
    async fn poisoned(&self) -> Vec<(String, String)>;
    /// A publisher whose messages reach `handler`, and the consumer that delivers them (if any).
    async fn publisher(&self, handler: Arc<dyn Handler>) -> (Arc<dyn Publisher>, Running);
}

/// How long a check waits for something that should happen.
const WITHIN: Duration = Duration::from_secs(20);

/// How long a check watches for something that should not happen.
const QUIET: Duration = Duration::from_millis(1500);

type Behaviour = dyn Fn(&Message, usize) -> Option<Disposition> + Send + Sync;

/// Records what it is handed and answers as `behaviour` says (`None`: never answers).
struct Recorder {
    seen: Mutex<Vec<Message>>,
    behaviour: Box<Behaviour>,
}

impl Recorder {
    fn new(
        behaviour: impl Fn(&Message, usize) -> Option<Disposition> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
        })
    }

    fn acking() -> Arc<Self> {
        Recorder::new(|_, _| Some(Disposition::Ack))
    }

    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for message in self.seen.lock().expect("not poisoned").iter() {
            *counts
                .entry(message.message_id.clone().unwrap_or_default())
                .or_insert(0) += 1;
        }
        counts
    }

    fn count(&self, id: Uuid) -> usize {
        self.counts().get(&id.to_string()).copied().unwrap_or(0)
    }

    fn messages(&self) -> Vec<Message> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Disposition {
        let times = {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.push(message.clone());
            seen.iter()
                .filter(|other| other.message_id == message.message_id)
                .count()
        };
        match (self.behaviour)(message, times) {
            Some(disposition) => disposition,
            None => std::future::pending().await,
        }
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !check() {
        assert!(started.elapsed() < WITHIN, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn id_of(message: &Message) -> String {
    message.message_id.clone().unwrap_or_default()
}

pub async fn published_messages_reach_the_handler(bus: Arc<dyn BusPair>) {
    let recorder = Recorder::acking();
    let (publisher, running) = bus.publisher(recorder.clone()).await;
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for id in &ids {
        publisher
            .publish(Outgoing {
                message_id: id.to_string(),
                kind: "Test".to_owned(),
                correlation_id: format!("corr-{id}"),
                causation_id: format!("cause-{id}"),
                body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
            })
            .await
            .expect("publishes");
    }
    eventually("every published message was handled", || {
        ids.iter().all(|id| recorder.count(*id) >= 1)
    })
    .await;
    for message in recorder.messages() {
        let id = id_of(&message);
        assert_eq!(message.body, format!("{{\"id\":\"{id}\"}}").into_bytes());
        assert_eq!(
            message.correlation_id.as_deref(),
            Some(format!("corr-{id}").as_str())
        );
        assert_eq!(
            message.causation_id.as_deref(),
            Some(format!("cause-{id}").as_str())
        );
    }
    running.stop().await;
}

pub async fn acknowledged_messages_are_not_delivered_again(bus: Arc<dyn BusPair>) {
    let first: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for id in &first {
        bus.send(*id).await;
    }
    let recorder = Recorder::acking();
    let running = bus.start(recorder.clone()).await;
    eventually("every sent message was handled", || {
        first.iter().all(|id| recorder.count(*id) >= 1)
    })
    .await;
    // Settling takes a moment after the handler returned: let it happen before the restart.
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;

    let later = Uuid::new_v4();
    bus.send(later).await;
    let again = Recorder::acking();
    let running = bus.start(again.clone()).await;
    eventually("the message sent after the restart was handled", || {
        again.count(later) >= 1
    })
    .await;
    tokio::time::sleep(QUIET).await;
    for id in &first {
        assert_eq!(
            again.count(*id),
            0,
            "an acknowledged message came again after a restart"
        );
    }
    running.stop().await;
}

pub async fn a_failed_message_comes_again(bus: Arc<dyn BusPair>) {
    let failing = Uuid::new_v4();
    let other = Uuid::new_v4();
    let failing_id = failing.to_string();
    let recorder = Recorder::new(move |message, times| {
        if id_of(message) == failing_id && times == 1 {
            Some(Disposition::Retry("a passing failure".to_owned()))
        } else {
            Some(Disposition::Ack)
        }
    });
    let running = bus.start(recorder.clone()).await;
    bus.send(failing).await;
    bus.send(other).await;
    eventually(
        "the failed message came again and everything was handled",
        || recorder.count(failing) >= 2 && recorder.count(other) >= 1,
    )
    .await;
    let again = recorder
        .messages()
        .into_iter()
        .filter(|message| id_of(message) == failing.to_string())
        .nth(1)
        .expect("a second delivery");
    assert!(
        again.redelivered,
        "a retried message says it may have been seen"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(recorder.count(failing), 2, "handled once it succeeded");
    assert!(
        bus.poisoned().await.is_empty(),
        "a retried message is not poison"
    );
    running.stop().await;
}

pub async fn messages_in_hand_at_a_restart_come_again(bus: Arc<dyn BusPair>) {
    let stuck = Uuid::new_v4();
    // The first consumer never finishes with it: a crash or a shutdown mid-handling.
    let hanging = Recorder::new(|_, _| None);
    let running = bus.start(hanging.clone()).await;
    bus.send(stuck).await;
    eventually("the message is in hand", || hanging.count(stuck) >= 1).await;
    running.stop().await;

    let recorder = Recorder::acking();
    let running = bus.start(recorder.clone()).await;
    eventually("the message in hand at the restart came again", || {
        recorder.count(stuck) >= 1
    })
    .await;
    running.stop().await;
}

pub async fn poison_is_recorded_and_not_delivered_again(bus: Arc<dyn BusPair>) {
    let poison = Uuid::new_v4();
    let fine = Uuid::new_v4();
    let poison_id = poison.to_string();
    let recorder = Recorder::new(move |message, _| {
        if id_of(message) == poison_id {
            Some(Disposition::DeadLetter("cannot ever be handled".to_owned()))
        } else {
            Some(Disposition::Ack)
        }
    });
    let running = bus.start(recorder.clone()).await;
    bus.send(poison).await;
    bus.send(fine).await;
    eventually("the message after the poison was handled", || {
        recorder.count(fine) >= 1
    })
    .await;
    let started = std::time::Instant::now();
    let poisoned = loop {
        let poisoned = bus.poisoned().await;
        if !poisoned.is_empty() || started.elapsed() > WITHIN {
            break poisoned;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        poisoned,
        vec![(poison.to_string(), "cannot ever be handled".to_owned())],
        "the poison is recorded with its reason"
    );
    running.stop().await;
    let again = Recorder::acking();
    let running = bus.start(again.clone()).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(recorder.count(poison), 1, "poison is handed out once");
    assert_eq!(
        again.count(poison),
        0,
        "poison is not delivered after a restart"
    );
    running.stop().await;
}
