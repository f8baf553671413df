//! The bus seam: how a service consumes messages and publishes its own, whatever carries them.
//!
//! A service writes only a [`Handler`]: one delivered [`Message`] in, one [`Disposition`] out
//! (handled, retry later, poison). The consumers around it keep the contract the same in both
//! modes:
//! - **at least once**: a message counts as consumed (acknowledged, or the checkpoint moved past
//!   it) only after its handler returned [`Disposition::Ack`]; a crash before that delivers it
//!   again, so handlers are idempotent;
//! - **retry**: [`Disposition::Retry`] delivers the message again after a back-off, and gives up
//!   after [`crate::amqp::RETRY_ATTEMPTS_MAX`] attempts, recording it as poison;
//! - **poison**: [`Disposition::DeadLetter`] records the message with its reason (a dead-letter
//!   queue, a table) and never delivers it again;
//! - **drain**: on shutdown a consumer takes no new message and lets the ones in hand finish
//!   within a bound; whatever did not finish is delivered again after a restart.
//!
//! Implementations: [`rabbit::RabbitConsumer`] and [`rabbit::RabbitPublisher`] (RabbitMQ, the
//! distributed mode), [`local::LogConsumer`] (follows the committed event log itself from a
//! checkpoint in SQLite) and [`local::LocalPublisher`] (hands a message straight to its consumer's
//! handler, in process), the embedded mode. [`conformance`] is the suite every consumer passes.

pub mod acks;
#[cfg(feature = "testing")]
pub mod conformance;
pub mod local;
pub mod rabbit;

use async_trait::async_trait;

use crate::error::Result;

pub use crate::amqp::Disposition;

/// One delivered message, as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The message's id (RabbitMQ's `message_id`, the event id of a logged event), if any.
    pub message_id: Option<String>,
    /// The correlation id the message carries (a header or property), if any.
    pub correlation_id: Option<String>,
    /// What caused the message (its `causation_id` header), if known.
    pub causation_id: Option<String>,
    /// The body, as published (JSON for every message of the ledger).
    pub body: Vec<u8>,
    /// Whether it may have been delivered before (a redelivery after a failure or a restart).
    pub redelivered: bool,
}

/// What a service does with one message. Must be idempotent: a message may come again.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `message` to the end and says what to do with it. A panic counts as poison.
    async fn handle(&self, message: &Message) -> Disposition;
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Stable across retries (consumers de-duplicate on it).
    pub message_id: String,
    /// What the message is (RabbitMQ's `type` property), e.g. `FraudDecision`.
    pub kind: String,
    pub correlation_id: String,
    pub causation_id: String,
    /// JSON.
    pub body: Vec<u8>,
}

impl Outgoing {
    /// The message as its consumer receives it.
    pub fn delivered(&self) -> Message {
        Message {
            message_id: Some(self.message_id.clone()),
            correlation_id: Some(self.correlation_id.clone()),
            causation_id: Some(self.causation_id.clone()),
            body: self.body.clone(),
            redelivered: false,
        }
    }
}

/// Publishes messages to whoever consumes them.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Returns once the message is safe: confirmed by the broker, or handled by its consumer.
    /// An error means it may or may not have arrived; publishing it again is safe.
    async fn publish(&self, message: Outgoing) -> Result<()>;
}
