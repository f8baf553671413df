//! The embedded bus: no broker, the committed event log is the durable queue.
//!
//! - [`LogConsumer`] follows the log itself (through the one follower loop, [`crate::follow`])
//!   from a checkpoint kept in SQLite ([`SqliteBusStore`]), reads the events one filter selects,
//!   hands each to its [`Handler`] as the same message the relay would publish
//!   ([`EventMessage`]), and moves its checkpoint only past events whose handler returned
//!   [`Disposition::Ack`]. A `kill -9` at any moment therefore delivers again what was not
//!   settled (at least once) and never loses an event. Poison is recorded in `bus_poison` in the
//!   same transaction that moves the checkpoint past it; a message that keeps asking for a retry
//!   is recorded as poison after [`RETRY_ATTEMPTS_MAX`] attempts.
//! - [`LocalPublisher`] hands a published message straight to the handler of its consumer and
//!   returns only after that handler succeeded: "published" means "handled", so a consumer that
//!   publishes from its handler moves its checkpoint only after the message it published took
//!   effect.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use sqlx::sqlite::SqlitePool;
use tokio_util::sync::CancellationToken;

use super::{Disposition, Handler, Message, Outgoing, Publisher};
use crate::amqp::RETRY_ATTEMPTS_MAX;
use crate::error::{DatabaseContext, Error, Result};
use crate::eventlog::{EventLog, LogFilter, LogPosition, RecordedEvent};
use crate::follow::{FollowSettings, Follower, Outcome, follow};
use crate::leader::LocalLeadership;
use crate::messages::EventMessage;
use crate::sqlite::Migration;

/// The bus's tables, versioned.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "bus checkpoints and poison",
    sql: include_str!("../../migrations/sqlite/bus/0001_bus.sql"),
}];

/// The component name of the bus's migrations.
const COMPONENT: &str = "bus";

/// A message recorded as poison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonRecord {
    pub message_id: String,
    pub position: LogPosition,
    pub reason: String,
    pub body: Vec<u8>,
}

/// The log consumers' checkpoints and poison, in SQLite.
#[derive(Clone)]
pub struct SqliteBusStore {
    pool: SqlitePool,
}

impl SqliteBusStore {
    /// The store in the database of `pool`, migrating it.
    pub async fn open(pool: SqlitePool) -> Result<Self> {
        crate::sqlite::migrate(&pool, COMPONENT, MIGRATIONS).await?;
        Ok(SqliteBusStore { pool })
    }

    /// Where `consumer` stands (`LogPosition::START` before its first message).
    pub async fn checkpoint(&self, consumer: &str) -> Result<LogPosition> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT position_commit, position_index FROM bus_checkpoints WHERE consumer = ?",
        )
        .bind(consumer)
        .fetch_optional(&self.pool)
        .await
        .context("reading a bus checkpoint")?;
        Ok(
            row.map_or(LogPosition::START, |(commit, index)| LogPosition {
                commit,
                index,
            }),
        )
    }

    /// Moves `consumer`'s checkpoint to `position`; never backwards.
    pub async fn save_checkpoint(&self, consumer: &str, position: LogPosition) -> Result<()> {
        save_checkpoint(&self.pool, consumer, position).await
    }

    /// Records `event` as poison for `consumer` and moves the checkpoint past it, atomically.
    pub async fn record_poison(
        &self,
        consumer: &str,
        message: &Message,
        position: LogPosition,
        reason: &str,
    ) -> Result<()> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .context("starting to record poison")?;
        sqlx::query(
            "INSERT INTO bus_poison \
                 (consumer, message_id, position_commit, position_index, reason, body, recorded_at) \
             VALUES (?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
             ON CONFLICT (consumer, message_id) DO UPDATE SET reason = excluded.reason",
        )
        .bind(consumer)
        .bind(message.message_id.as_deref().unwrap_or("-"))
        .bind(position.commit)
        .bind(position.index)
        .bind(reason)
        .bind(&message.body)
        .execute(&mut *transaction)
        .await
        .context("recording poison")?;
        save_checkpoint(&mut *transaction, consumer, position).await?;
        transaction.commit().await.context("recording poison")
    }

    /// What `consumer` recorded as poison, oldest first.
    pub async fn poison(&self, consumer: &str) -> Result<Vec<PoisonRecord>> {
        let rows: Vec<(String, i64, i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT message_id, position_commit, position_index, reason, body FROM bus_poison \
             WHERE consumer = ? ORDER BY position_commit, position_index",
        )
        .bind(consumer)
        .fetch_all(&self.pool)
        .await
        .context("reading poison")?;
        Ok(rows
            .into_iter()
            .map(|(message_id, commit, index, reason, body)| PoisonRecord {
                message_id,
                position: LogPosition { commit, index },
                reason,
                body,
            })
            .collect())
    }

    /// Whether the database answers: a `/health` check.
    pub async fn ping(&self, timeout: Duration) -> bool {
        crate::sqlite::ping(&self.pool, timeout).await
    }
}

async fn save_checkpoint<'e, E>(executor: E, consumer: &str, position: LogPosition) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    sqlx::query(
        "INSERT INTO bus_checkpoints (consumer, position_commit, position_index, updated_at) \
         VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
         ON CONFLICT (consumer) DO UPDATE SET \
             position_commit = excluded.position_commit, \
             position_index = excluded.position_index, \
             updated_at = excluded.updated_at \
         WHERE (excluded.position_commit, excluded.position_index) \
             > (bus_checkpoints.position_commit, bus_checkpoints.position_index)",
    )
    .bind(consumer)
    .bind(position.commit)
    .bind(position.index)
    .execute(executor)
    .await
    .context("saving a bus checkpoint")?;
    Ok(())
}

/// How a [`LogConsumer`] reads and hands out.
#[derive(Debug, Clone, Copy)]
pub struct LogConsumerSettings {
    /// The consumer's name: its checkpoint, its poison, its leadership and log lines.
    pub name: &'static str,
    /// Which events it consumes (e.g. `LogFilter::event("transaction", "TransactionCreated")`).
    pub filter: LogFilter,
    /// Events read per batch.
    pub batch: usize,
    /// Messages of a batch handled at once (the prefetch of the embedded bus). The checkpoint
    /// still moves in log order, only past a prefix of handled messages.
    pub concurrency: usize,
    /// How long an idle consumer waits without a wake-up before reading anyway.
    pub poll_interval: Duration,
    /// How long a shutdown lets the messages in hand finish; the rest are delivered again after
    /// a restart.
    pub drain_timeout: Duration,
}

impl LogConsumerSettings {
    pub fn new(name: &'static str, filter: LogFilter) -> Self {
        LogConsumerSettings {
            name,
            filter,
            batch: 256,
            concurrency: 16,
            poll_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Consumes the events of the committed log that its filter selects (module documentation).
pub struct LogConsumer {
    log: Arc<dyn EventLog>,
    store: SqliteBusStore,
    handler: Arc<dyn Handler>,
    settings: LogConsumerSettings,
    /// The message that asked for a retry last, and how often in a row.
    attempts: Mutex<Option<(LogPosition, u32)>>,
}

impl LogConsumer {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: SqliteBusStore,
        handler: Arc<dyn Handler>,
        settings: LogConsumerSettings,
    ) -> Self {
        LogConsumer {
            log,
            store,
            handler,
            settings: LogConsumerSettings {
                batch: settings.batch.max(1),
                concurrency: settings.concurrency.max(1),
                ..settings
            },
            attempts: Mutex::new(None),
        }
    }

    /// Consumes until `cancel`, then lets the messages in hand finish within the drain timeout.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let follower = Arc::new(LogFollower {
            consumer: self.clone(),
            cancel: cancel.clone(),
        });
        follow(
            follower,
            Arc::new(LocalLeadership::default()),
            self.log.subscribe(),
            FollowSettings {
                poll_interval: self.settings.poll_interval,
            },
            cancel,
        )
        .await;
    }

    /// The message of a logged event: the one the relay publishes for it.
    fn message(&self, event: &RecordedEvent) -> Message {
        let body = serde_json::to_vec(&EventMessage::from_log(event))
            .expect("an event message is plain data, which always serialises");
        let present = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        let redelivered = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|(position, _)| position == event.position);
        Message {
            message_id: Some(event.event_id.to_string()),
            correlation_id: present(&event.metadata.correlation_id),
            causation_id: present(&event.metadata.causation_id),
            body,
            redelivered,
        }
    }

    async fn deliver(&self, message: &Message) -> Disposition {
        AssertUnwindSafe(self.handler.handle(message))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Disposition::DeadLetter("handling the message panicked".to_owned()))
    }

    /// One more retry of the message at `position`: how many in a row now.
    fn count_attempt(&self, position: LogPosition) -> u32 {
        let mut attempts = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = match *attempts {
            Some((last, count)) if last == position => count.saturating_add(1),
            _ => 1,
        };
        *attempts = Some((position, count));
        count
    }

    fn settled(&self, position: LogPosition) {
        let mut attempts = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if attempts.is_some_and(|(last, _)| last == position) {
            *attempts = None;
        }
    }

    /// Reads a batch after the checkpoint, hands it out, and moves the checkpoint past the
    /// prefix that was settled. A retry ends the batch with an error: the follower loop backs
    /// off and the message comes again, before anything after it.
    async fn batch(&self, cancel: &CancellationToken) -> Result<Outcome> {
        let name = self.settings.name;
        let after = self.store.checkpoint(name).await?;
        let events = self
            .log
            .read_all(after, self.settings.batch, self.settings.filter)
            .await?;
        let Some(first) = events.first() else {
            return Ok(Outcome::Idle);
        };
        crate::follow::record_event_age(name, first.recorded_at);
        let handled = futures::stream::iter(events.into_iter().map(|event| async move {
            let message = self.message(&event);
            let disposition = self.deliver(&message).await;
            (event.position, message, disposition)
        }))
        .buffered(self.settings.concurrency);
        let mut handled = std::pin::pin!(handled);
        let drain = async {
            cancel.cancelled().await;
            tokio::time::sleep(self.settings.drain_timeout).await;
        };
        let mut drain = std::pin::pin!(drain);
        let mut settled = after;
        let mut saved = after;
        let mut processed = 0;
        let mut failure = None;
        loop {
            let next = tokio::select! {
                next = handled.next() => next,
                () = &mut drain => {
                    tracing::warn!(consumer = name, "messages in hand did not finish in time; they come again after a restart");
                    break;
                }
            };
            let Some((position, message, disposition)) = next else {
                break;
            };
            let poison = match disposition {
                Disposition::Ack => None,
                Disposition::DeadLetter(reason) => Some(reason),
                Disposition::Retry(reason) => {
                    let attempts = self.count_attempt(position);
                    if attempts >= RETRY_ATTEMPTS_MAX {
                        Some(format!("gave up after {attempts} retries: {reason}"))
                    } else {
                        tracing::warn!(consumer = name, attempts, reason = %reason, "message will be retried");
                        failure = Some(reason);
                        break;
                    }
                }
            };
            if let Some(reason) = poison {
                tracing::error!(consumer = name, message_id = message.message_id.as_deref().unwrap_or("-"), reason = %reason, "message recorded as poison");
                self.store
                    .record_poison(name, &message, position, &reason)
                    .await?;
                saved = position;
            }
            self.settled(position);
            settled = position;
            processed += 1;
        }
        if settled != saved {
            self.store.save_checkpoint(name, settled).await?;
        }
        match failure {
            Some(reason) => Err(Error::Bus {
                context: "handling a message (it comes again)",
                message: reason,
            }),
            None => Ok(Outcome::Processed(processed)),
        }
    }
}

/// The consumer as the follower loop drives it.
struct LogFollower {
    consumer: Arc<LogConsumer>,
    cancel: CancellationToken,
}

#[async_trait]
impl Follower for LogFollower {
    type Session = ();
    type Error = Error;

    fn name(&self) -> &'static str {
        self.consumer.settings.name
    }

    async fn lead(&self) -> Result<()> {
        Ok(())
    }

    async fn try_process_batch(&self, _session: &mut ()) -> Result<Outcome> {
        self.consumer.batch(&self.cancel).await
    }
}

/// Hands each published message straight to `handler` (the consumer's), in process, and returns
/// once it was handled (module documentation).
#[derive(Clone)]
pub struct LocalPublisher {
    handler: Arc<dyn Handler>,
}

impl LocalPublisher {
    pub fn new(handler: Arc<dyn Handler>) -> Self {
        LocalPublisher { handler }
    }
}

#[async_trait]
impl Publisher for LocalPublisher {
    async fn publish(&self, message: Outgoing) -> Result<()> {
        let delivered = message.delivered();
        let disposition = AssertUnwindSafe(self.handler.handle(&delivered))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Disposition::DeadLetter("handling the message panicked".to_owned())
            });
        match disposition {
            Disposition::Ack => Ok(()),
            Disposition::Retry(reason) => Err(Error::Bus {
                context: "handing a message to its consumer",
                message: reason,
            }),
            Disposition::DeadLetter(reason) => {
                tracing::error!(message_id = %message.message_id, reason = %reason, "the consumer refused a published message");
                Err(Error::Bus {
                    context: "handing a message to its consumer",
                    message: format!("refused: {reason}"),
                })
            }
        }
    }
}
