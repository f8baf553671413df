//! The relay: publishes committed events from the log to RabbitMQ (SPEC §4: events are published
//! from the committed log, no dual write).
//!
//! Only what has a consumer is published: `TransactionCreated`, the fraud worker's input. The
//! relay follows the log from its own checkpoint, publishes a batch as a window of persistent
//! messages in flight (`message_id` = event id, headers with the correlation id, causation id,
//! event type and version), waits for the window's publisher confirms, and only then counts the
//! batch as relayed. The checkpoint is written at most every [`CHECKPOINT_EVERY`], busy or idle
//! (an idle relay writes what is left once it is due), not after every window or every idle look
//! (decision 65): a crash republishes at most that much, and
//! consumers are idempotent (by message id, or by the aggregate's own rules). One active relay
//! across instances (a leader lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::try_join_all;
use infra::amqp::{self, Topology};
use infra::codec::{TRANSACTION_CREATED, TRANSACTION_STREAM};
use infra::eventlog::{EventLog, LogFilter, LogPosition, RecordedEvent};
use infra::follow::{Follower, Outcome};
use infra::messages::EventMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};

use crate::error::{Error, Result};
use crate::state::FollowerState;

/// The relay's checkpoint row.
pub const CHECKPOINT: &str = "relay";

/// What the relay reads from the log: the events someone consumes.
pub const PUBLISHED: LogFilter = LogFilter::event(TRANSACTION_STREAM, TRANSACTION_CREATED);

/// How often, at most, the relay writes its checkpoint while busy. A crash republishes what was
/// confirmed since (duplicates are harmless); writing it after every window would cost a
/// database commit per window.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub amqp_url: String,
    pub topology: Topology,
    /// Messages published before waiting for their confirms: the window. ~20k msg/s with a
    /// window against ~2k/s confirming one by one (NOTES).
    pub window: usize,
}

pub struct Relay {
    log: Arc<dyn EventLog>,
    state: Arc<dyn FollowerState>,
    settings: RelaySettings,
}

/// A leadership session: the broker connection, and how far the relay got.
pub struct RelaySession {
    connection: Connection,
    channel: Channel,
    /// Every event up to here is confirmed by the broker.
    confirmed: LogPosition,
    /// The checkpoint as last written.
    stored: LogPosition,
    stored_at: Instant,
}

impl Relay {
    pub fn new(
        log: Arc<dyn EventLog>,
        state: Arc<dyn FollowerState>,
        settings: RelaySettings,
    ) -> Self {
        Relay {
            log,
            state,
            settings,
        }
    }

    /// Publishes up to a window of events after what is confirmed, and waits for their confirms.
    pub async fn publish_window(&self, session: &mut RelaySession) -> Result<Outcome> {
        let events = self
            .log
            .read_all(session.confirmed, self.settings.window, PUBLISHED)
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            // Idle: the checkpoint is written when due, as while busy (the loop looks again by
            // then: `record_due`); the relay wakes at every commit of the log, most of which
            // hold nothing it publishes (decision 65). Then adopt the stored checkpoint, so an
            // operator who moved it back (to publish again) is followed. It never moves back on
            // its own.
            if session.stored_at.elapsed() >= CHECKPOINT_EVERY {
                self.store_checkpoint(session).await?;
                session.confirmed = self.state.checkpoint(CHECKPOINT).await?;
                session.stored = session.confirmed;
            }
            return Ok(Outcome::Idle);
        };
        if let Some(first) = events.first() {
            infra::follow::record_event_age("relay", first.recorded_at);
        }
        let publishing = Instant::now();
        let mut confirms = Vec::with_capacity(events.len());
        for event in &events {
            confirms.push(self.publish(&session.channel, event).await?);
        }
        let confirmations = tokio::time::timeout(amqp::CONFIRM_TIMEOUT, try_join_all(confirms))
            .await
            .map_err(|_| broker_error("awaiting publisher confirms", "timed out"))?
            .map_err(broker("awaiting publisher confirms"))?;
        if let Some(refused) = confirmations
            .iter()
            .position(|confirmation| !matches!(confirmation, Confirmation::Ack(_)))
        {
            return Err(broker_error(
                "publishing events",
                &format!(
                    "the broker did not confirm event {}",
                    events[refused].event_id
                ),
            ));
        }
        metrics::histogram!("relay_window_seconds").record(publishing.elapsed().as_secs_f64());
        session.confirmed = last;
        if session.stored_at.elapsed() >= CHECKPOINT_EVERY {
            self.store_checkpoint(session).await?;
        }
        metrics::counter!("relay_published_total").increment(events.len() as u64);
        tracing::info!(
            published = events.len(),
            position = %last,
            correlation_ids = %events
                .iter()
                .map(|event| event.metadata.correlation_id.as_str())
                .collect::<Vec<_>>()
                .join(","),
            "relay batch published"
        );
        Ok(Outcome::of_batch(
            events.len(),
            self.settings.window,
            &*self.log,
        ))
    }

    async fn store_checkpoint(&self, session: &mut RelaySession) -> Result<()> {
        if session.confirmed > session.stored {
            self.state
                .store_checkpoint(CHECKPOINT, session.confirmed)
                .await?;
            session.stored = session.confirmed;
        }
        session.stored_at = Instant::now();
        Ok(())
    }

    async fn publish(
        &self,
        channel: &Channel,
        event: &RecordedEvent,
    ) -> Result<lapin::PublisherConfirm> {
        let message = EventMessage::from_log(event);
        let body = serde_json::to_vec(&message).map_err(|error| Error::Store {
            context: "serialising an event message",
            message: error.to_string(),
        })?;
        let metadata = &event.metadata;
        let mut headers = FieldTable::default();
        headers.insert(
            amqp::CORRELATION_ID_HEADER.into(),
            amqp::string(&metadata.correlation_id),
        );
        headers.insert(
            amqp::CAUSATION_ID_HEADER.into(),
            amqp::string(&metadata.causation_id),
        );
        headers.insert("event_type".into(), amqp::string(&event.event_type));
        headers.insert("event_version".into(), amqp::string(&event.event_version));
        headers.insert(
            "aggregate_type".into(),
            amqp::string(&event.stream.aggregate_type),
        );
        headers.insert(
            "aggregate_id".into(),
            amqp::string(&event.stream.aggregate_id),
        );
        let properties = amqp::persistent_json(
            &event.event_id.to_string(),
            &event.event_type,
            &metadata.correlation_id,
            headers,
        );
        let routing_key =
            EventMessage::routing_key(&event.stream.aggregate_type, &event.event_type);
        channel
            .basic_publish(
                self.settings.topology.events_exchange().as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .map_err(broker("publishing an event"))
    }
}

#[async_trait]
impl Follower for Relay {
    type Session = RelaySession;
    type Error = Error;

    fn name(&self) -> &'static str {
        "relay"
    }

    async fn lead(&self) -> Result<RelaySession> {
        let connection = amqp::connect(&self.settings.amqp_url).await?;
        let channel = amqp::confirm_channel(&connection).await?;
        self.settings.topology.declare(&channel).await?;
        let checkpoint = self.state.checkpoint(CHECKPOINT).await?;
        tracing::info!(checkpoint = %checkpoint, "relay publishing");
        Ok(RelaySession {
            connection,
            channel,
            confirmed: checkpoint,
            stored: checkpoint,
            stored_at: Instant::now(),
        })
    }

    async fn try_process_batch(&self, session: &mut RelaySession) -> Result<Outcome> {
        self.publish_window(session).await
    }

    /// A confirmed position not stored yet is stored [`CHECKPOINT_EVERY`] after the last store.
    fn record_due(&self, session: &RelaySession) -> Option<Duration> {
        (session.confirmed > session.stored)
            .then(|| CHECKPOINT_EVERY.saturating_sub(session.stored_at.elapsed()))
    }

    async fn end(&self, mut session: RelaySession) {
        // What was confirmed is kept; closing waits for outstanding confirms.
        if let Err(error) = self.store_checkpoint(&mut session).await {
            tracing::warn!(error.message = %error, "relay checkpoint not stored at the end of its session");
        }
        let _ = session.channel.close(200, "relay stopping".into()).await;
        let _ = session.connection.close(200, "relay stopping".into()).await;
    }
}

fn broker(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    let map = amqp::error(context);
    move |error| Error::Infra(map(error))
}

fn broker_error(context: &'static str, message: &str) -> Error {
    Error::Infra(infra::Error::Broker {
        context,
        message: message.to_owned(),
    })
}
