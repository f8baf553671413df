//! The relay: publishes every committed event from the log to RabbitMQ (SPEC §4: events are
//! published from the committed log, no dual write).
//!
//! It follows the log with the gap-safe reader from its own checkpoint, publishes a batch as a
//! window of persistent messages in flight (`message_id` = event id, headers with the correlation
//! id, causation id, event type and version), waits for every publisher confirm, and only then
//! moves its checkpoint. A crash or a refused message republishes the batch: consumers are
//! idempotent (by message id, or by the aggregate's own rules). One active relay across
//! instances (a leader lock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use infra::amqp::{self, Topology};
use infra::leader::Leadership;
use infra::log::{LogEvent, LogReader};
use infra::messages::EventMessage;
use infra::tasks::pause;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::checkpoints;
use crate::error::{DatabaseContext, Error, Result};
use crate::saga::BatchOutcome;

/// The relay's checkpoint row.
pub(crate) const CHECKPOINT: &str = "relay";

/// How often the leader checks its lock: a deposed leader publishes at most
/// a second of duplicates (harmless) before it notices.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub amqp_url: String,
    pub topology: Topology,
    /// Messages published before waiting for their confirms: the window. ~20k msg/s with a
    /// window against ~2k/s confirming one by one (NOTES).
    pub window: i64,
    pub poll_interval: Duration,
}

pub struct Relay {
    reader: LogReader,
    pool: PgPool,
    settings: RelaySettings,
}

impl Relay {
    pub fn new(pool: PgPool, settings: RelaySettings) -> Self {
        Relay {
            reader: LogReader::new(pool.clone(), "events"),
            pool,
            settings,
        }
    }

    /// Runs while this instance holds the relay's leader lock, reconnecting to the broker after
    /// failures, until `cancel`. `lead` returns `Ok` when the lock is lost or the service stops,
    /// `Err` when the broker failed.
    pub async fn run(self: Arc<Self>, lock_options: PgConnectOptions, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            let mut leadership = match Leadership::acquire(&lock_options, "relay", &cancel).await {
                Ok(Some(leadership)) => leadership,
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(error.message = %error, "relay cannot take its leader lock");
                    pause(&cancel, amqp::RECONNECT_DELAY).await;
                    continue;
                }
            };
            // Lead until the lock is lost or the service stops. A broker failure only
            // reconnects: the lock is kept, so a broker outage does not churn leadership.
            while !cancel.is_cancelled() {
                match self.lead(&mut leadership, &cancel).await {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::error!(error.message = %error, "relay stopped; reconnecting");
                        pause(&cancel, amqp::RECONNECT_DELAY).await;
                        if !leadership.still_held().await {
                            break;
                        }
                    }
                }
            }
        }
        tracing::info!("relay stopped");
    }

    async fn lead(&self, leadership: &mut Leadership, cancel: &CancellationToken) -> Result<()> {
        let connection = amqp::connect(&self.settings.amqp_url).await?;
        let channel = amqp::confirm_channel(&connection).await?;
        self.settings.topology.declare(&channel).await?;
        tracing::info!("relay publishing");
        let mut housekeeping = Instant::now();
        let result = loop {
            if cancel.is_cancelled() {
                break Ok(());
            }
            if housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
                housekeeping = Instant::now();
                if !leadership.still_held().await {
                    break Ok(());
                }
            }
            match self.try_publish_batch(&channel, self.settings.window).await {
                Ok(BatchOutcome::Processed(_)) => {}
                Ok(BatchOutcome::Idle) => pause(cancel, self.settings.poll_interval).await,
                Err(error) => break Err(error),
            }
        };
        // Closing waits for outstanding confirms; the checkpoint only moved for confirmed ones.
        let _ = channel.close(200, "relay stopping".into()).await;
        let _ = connection.close(200, "relay stopping".into()).await;
        result
    }

    /// Publishes up to `max` events after the checkpoint and moves it once all are confirmed.
    pub async fn try_publish_batch(&self, channel: &Channel, max: i64) -> Result<BatchOutcome> {
        let checkpoint = checkpoints::load(&self.pool, CHECKPOINT).await?;
        let events = self.reader.read_after(checkpoint, max, None).await?;
        let Some(last) = events.last().map(|event| event.position) else {
            return Ok(BatchOutcome::Idle);
        };
        let mut confirms = Vec::with_capacity(events.len());
        for event in &events {
            confirms.push(self.publish(channel, event).await?);
        }
        let confirmations = try_join_all(confirms)
            .await
            .map_err(broker("awaiting publisher confirms"))?;
        if let Some(refused) = confirmations
            .iter()
            .position(|confirmation| !matches!(confirmation, Confirmation::Ack(_)))
        {
            return Err(Error::Infra(infra::Error::Broker {
                context: "publishing events",
                message: format!(
                    "the broker did not confirm event {}",
                    events[refused].event_id
                ),
            }));
        }
        let mut transaction = self.pool.begin().await.context("starting a relay batch")?;
        checkpoints::store(&mut transaction, CHECKPOINT, last).await?;
        transaction
            .commit()
            .await
            .context("committing a relay batch")?;
        metrics::counter!("relay_published_total").increment(events.len() as u64);
        for event in &events {
            tracing::info!(
                event_id = %event.event_id,
                event_type = %event.event_type,
                correlation_id = event.metadata_str("correlation_id").unwrap_or("-"),
                "event published"
            );
        }
        Ok(BatchOutcome::Processed(events.len()))
    }

    async fn publish(
        &self,
        channel: &Channel,
        event: &LogEvent,
    ) -> Result<lapin::PublisherConfirm> {
        let message = EventMessage::from_log(event);
        let body = serde_json::to_vec(&message).map_err(|error| Error::Store {
            context: "serialising an event message",
            message: error.to_string(),
        })?;
        let correlation_id = event.metadata_str("correlation_id").unwrap_or_default();
        let mut headers = FieldTable::default();
        headers.insert(
            amqp::CORRELATION_ID_HEADER.into(),
            amqp::string(correlation_id),
        );
        headers.insert(
            amqp::CAUSATION_ID_HEADER.into(),
            amqp::string(event.metadata_str("causation_id").unwrap_or_default()),
        );
        headers.insert("event_type".into(), amqp::string(&event.event_type));
        headers.insert("event_version".into(), amqp::string(&event.event_version));
        headers.insert("aggregate_type".into(), amqp::string(&event.aggregate_type));
        headers.insert("aggregate_id".into(), amqp::string(&event.aggregate_id));
        let properties = amqp::persistent_json(
            &event.event_id.to_string(),
            &event.event_type,
            correlation_id,
            headers,
        );
        let routing_key = EventMessage::routing_key(&event.aggregate_type, &event.event_type);
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

fn broker(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    let map = amqp::error(context);
    move |error| Error::Infra(map(error))
}
