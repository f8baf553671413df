//! The bus on RabbitMQ: THE one consumer (the fraud worker's input, command-api's decisions) and
//! a publisher with confirms. Topology, retry and dead-letter queues: [`crate::amqp`].
//!
//! [`RabbitConsumer`]:
//! - consumes one queue with manual acknowledgements and a bounded prefetch; up to `prefetch`
//!   deliveries are handled concurrently, and the broker sends no more until one is settled;
//! - settles a delivery only after its handler returned ([`crate::amqp::settle`]): acknowledges
//!   it, or parks a copy in a retry queue (a back-off) or the dead-letter queue (poison, with the
//!   reason in a header) with a publisher confirm first, so a crash in between only duplicates.
//!   A panicking handler dead-letters its message instead of leaking a prefetch slot;
//! - reconnects after the broker goes away, declaring the topology again, with a back-off that
//!   grows from [`crate::amqp::RECONNECT_DELAY`] to [`RECONNECT_DELAY_MAX`] while attempts fail;
//! - on shutdown cancels its consumer (no new work), lets the messages in hand finish within
//!   the drain timeout, and closes its channels, which returns anything unacknowledged.
//!
//! Acknowledgements go in windows ([`super::acks`], decision 51): every [`ACK_INTERVAL`], or
//! as soon as half the prefetch waits, one ack with `multiple` settles the finished deliveries
//! below the oldest one still being handled, and a finished delivery held back by a slow one
//! goes singly at the next flush. A crash before a flush delivers those messages again, which
//! the handlers already allow (at least once).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use super::acks::AckWindow;
use super::{Disposition, Handler, Message, Outgoing, Publisher};
use crate::amqp::{self, CAUSATION_ID_HEADER, CORRELATION_ID_HEADER, Settlement, Topology};
use crate::error::{Error, Result};
use crate::tasks::pause;

/// The longest pause between two reconnection attempts.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);

/// How long closing a channel or a connection may take before we give up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `/health` waits for the broker.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// How long a finished delivery waits for its ack at most (twice this behind a slow one): long
/// enough to gather several into one frame at a few hundred messages a second, short against
/// the prefetch it holds.
pub const ACK_INTERVAL: Duration = Duration::from_millis(5);

/// The broker connection a consumer uses now, shared with `/health`. Empty while reconnecting.
#[derive(Clone, Default)]
pub struct BrokerLink {
    current: Arc<Mutex<Option<Arc<Connection>>>>,
    connected: Arc<AtomicBool>,
}

impl BrokerLink {
    fn set(&self, connection: Option<Arc<Connection>>) {
        self.connected
            .store(connection.is_some(), Ordering::Relaxed);
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
    }

    pub fn current(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The flag behind [`BrokerLink::is_connected`], for a state that only reads a boolean.
    pub fn connected_flag(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    /// Whether the consumer holds a live connection (no round trip).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
            && self
                .current()
                .is_some_and(|connection| connection.status().connected())
    }

    /// Asks the broker for real: opens a channel on the current connection, checks that `queue`
    /// exists (a passive declare) and closes the channel, within [`HEALTH_TIMEOUT`].
    pub async fn check(&self, queue: &str) -> bool {
        let Some(connection) = self.current() else {
            return false;
        };
        if !connection.status().connected() {
            return false;
        }
        let probe = async {
            let channel = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await?;
            channel
                .close(REPLY_SUCCESS, "health check done".into())
                .await
        };
        matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, probe).await,
            Ok(Ok(()))
        )
    }
}

/// Where and how a [`RabbitConsumer`] consumes.
#[derive(Debug, Clone)]
pub struct RabbitConsumerSettings {
    pub amqp_url: String,
    /// Declared on every connection; its retry and dead-letter queues serve `queue`.
    pub topology: Topology,
    /// One of the topology's consumer queues.
    pub queue: String,
    /// Unacknowledged deliveries in hand at once.
    pub prefetch: u16,
    /// Who we are in the broker's tools and in log lines (`fraud-worker <prefix>`).
    pub name: String,
    /// How long a shutdown lets the deliveries in hand finish.
    pub drain_timeout: Duration,
    /// A gauge set to 1 while connected and 0 otherwise (e.g. `fraud_broker_connected`).
    pub connected_gauge: Option<&'static str>,
}

impl RabbitConsumerSettings {
    pub fn new(amqp_url: &str, topology: Topology, queue: String, name: &str) -> Self {
        RabbitConsumerSettings {
            amqp_url: amqp_url.to_owned(),
            topology,
            queue,
            prefetch: 32,
            name: name.to_owned(),
            drain_timeout: Duration::from_secs(20),
            connected_gauge: None,
        }
    }
}

/// Why a consuming session ended.
enum SessionEnd {
    Stopped,
    Lost(String),
}

/// THE RabbitMQ consumer (module documentation).
pub struct RabbitConsumer {
    settings: RabbitConsumerSettings,
    handler: Arc<dyn Handler>,
    link: BrokerLink,
}

impl RabbitConsumer {
    pub fn new(settings: RabbitConsumerSettings, handler: Arc<dyn Handler>) -> Self {
        RabbitConsumer {
            settings,
            handler,
            link: BrokerLink::default(),
        }
    }

    /// The connection in use, for `/health`.
    pub fn link(&self) -> BrokerLink {
        self.link.clone()
    }

    /// Connects and declares the topology: a service calls it at start to fail fast on an
    /// unreachable broker, and hands the connection to [`RabbitConsumer::run`].
    pub async fn connect(&self) -> Result<Connection> {
        let properties = ConnectionProperties::default()
            .with_connection_name(self.settings.name.as_str().into());
        let connection = Connection::connect(&self.settings.amqp_url, properties)
            .await
            .map_err(amqp::error("connecting to RabbitMQ"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp::error("opening a channel"))?;
        self.settings.topology.declare(&channel).await?;
        let _closed = channel
            .close(REPLY_SUCCESS, "topology declared".into())
            .await;
        Ok(connection)
    }

    /// Consumes on `first` (or a fresh connection), then on every new connection after a loss,
    /// until `cancel`.
    pub async fn run(self: Arc<Self>, first: Option<Connection>, cancel: CancellationToken) {
        let name = self.settings.name.as_str();
        let mut next = first;
        let mut delay = amqp::RECONNECT_DELAY;
        while !cancel.is_cancelled() {
            let connection = match next.take() {
                Some(connection) => connection,
                None => match self.connect().await {
                    Ok(connection) => {
                        tracing::info!(consumer = name, "connected to RabbitMQ");
                        connection
                    }
                    Err(error) => {
                        tracing::warn!(consumer = name, error.message = %error, retry_in_ms = delay.as_millis(), "cannot reach RabbitMQ");
                        pause(&cancel, delay).await;
                        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                        continue;
                    }
                },
            };
            let connection = Arc::new(connection);
            self.connected(Some(connection.clone()));
            let end = self.session(&connection, &cancel).await;
            self.connected(None);
            let _closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                connection.close(REPLY_SUCCESS, "consumer stopping".into()),
            )
            .await;
            match end {
                Ok(SessionEnd::Stopped) => break,
                Ok(SessionEnd::Lost(reason)) => {
                    // The session was consuming: a fresh loss, reconnect soon.
                    tracing::warn!(
                        consumer = name,
                        reason,
                        "lost the RabbitMQ connection; reconnecting"
                    );
                    delay = amqp::RECONNECT_DELAY;
                    pause(&cancel, delay).await;
                }
                Err(error) => {
                    tracing::warn!(consumer = name, error.message = %error, retry_in_ms = delay.as_millis(), "RabbitMQ session failed; reconnecting");
                    pause(&cancel, delay).await;
                    delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                }
            }
        }
        tracing::info!(consumer = name, "consumer stopped");
    }

    fn connected(&self, connection: Option<Arc<Connection>>) {
        if let Some(gauge) = self.settings.connected_gauge {
            metrics::gauge!(gauge).set(if connection.is_some() { 1.0 } else { 0.0 });
        }
        self.link.set(connection);
    }

    /// Consumes on one connection until it is lost or `cancel` fires, then drains what is in
    /// hand and closes the channels.
    async fn session(
        self: &Arc<Self>,
        connection: &Connection,
        cancel: &CancellationToken,
    ) -> Result<SessionEnd> {
        let settings = &self.settings;
        // Retry and dead-letter copies are published with confirms on a channel of their own.
        let parking = amqp::confirm_channel(connection).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp::error("opening the consumer channel"))?;
        channel
            .basic_qos(settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp::error("setting the prefetch"))?;
        let tag = format!(
            "{}-{}",
            settings.name.replace(' ', "-"),
            uuid::Uuid::new_v4()
        );
        let mut deliveries = channel
            .basic_consume(
                settings.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp::error("starting the consumer"))?;
        tracing::info!(consumer = %settings.name, queue = %settings.queue, prefetch = settings.prefetch, "consuming");
        let capacity = usize::from(settings.prefetch.max(1));
        let mut in_flight = JoinSet::new();
        let mut acks = Acks::default();
        let end = loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break SessionEnd::Stopped,
                Some(joined) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    if !acks.record(joined) {
                        break SessionEnd::Lost("a message could not be settled".to_owned());
                    }
                    // A broker error on the parking channel closes it for good; every retry
                    // would then fail. Start over on a fresh connection instead.
                    if !parking.status().connected() {
                        break SessionEnd::Lost("the parking channel closed".to_owned());
                    }
                    if acks.window.waiting() >= capacity.div_ceil(2)
                        && let Err(error) = acks.flush(&channel, false).await
                    {
                        break SessionEnd::Lost(error.to_string());
                    }
                }
                () = acks.due(), if acks.flush_at.is_some() => {
                    if let Err(error) = acks.flush(&channel, false).await {
                        break SessionEnd::Lost(error.to_string());
                    }
                }
                next = deliveries.next(), if in_flight.len() < capacity => match next {
                    Some(Ok(delivery)) => {
                        let tag = delivery.delivery_tag;
                        acks.window.delivered(tag);
                        let task = in_flight.spawn(self.clone().settle_one(delivery, parking.clone()));
                        acks.tags.insert(task.id(), tag);
                    }
                    Some(Err(error)) => break SessionEnd::Lost(error.to_string()),
                    None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
                },
            }
        };
        if matches!(end, SessionEnd::Stopped) {
            // Deliveries the broker already sent but we never started stay unacknowledged and
            // go back to the queue when the channel closes.
            let _cancelled = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
        }
        drain(in_flight, &mut acks, settings.drain_timeout).await;
        if let Err(error) = acks.flush(&channel, true).await {
            // The channel is gone: the broker delivers those messages again.
            tracing::warn!(consumer = %settings.name, error.message = %error, "could not acknowledge the last messages; they come again");
        }
        for channel in [&channel, &parking] {
            let _closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.close(REPLY_SUCCESS, "consumer stopping".into()),
            )
            .await;
        }
        Ok(end)
    }

    /// Hands one delivery to the handler and carries out what it said, except the ack, which
    /// the session's window sends.
    async fn settle_one(self: Arc<Self>, delivery: Delivery, parking: Channel) -> Settlement {
        let message = message_of(&delivery);
        let disposition = AssertUnwindSafe(self.handler.handle(&message))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Disposition::DeadLetter("handling the message panicked".to_owned())
            });
        amqp::settle(
            &parking,
            &self.settings.topology,
            &self.settings.queue,
            &delivery,
            disposition,
        )
        .await
    }
}

/// A session's acknowledgements: the window, which task holds which delivery, when to flush.
#[derive(Default)]
struct Acks {
    window: AckWindow,
    tags: HashMap<tokio::task::Id, u64>,
    flush_at: Option<tokio::time::Instant>,
}

impl Acks {
    /// Records a finished task. `false` when its delivery could not be settled: the session
    /// should end, so that the broker delivers it again.
    fn record(
        &mut self,
        joined: std::result::Result<(tokio::task::Id, Settlement), JoinError>,
    ) -> bool {
        let (id, settlement) = match joined {
            Ok((id, settlement)) => (id, settlement),
            Err(error) => {
                report_panic(&error);
                (error.id(), Settlement::Unsettled)
            }
        };
        let Some(tag) = self.tags.remove(&id) else {
            return true;
        };
        match settlement {
            Settlement::AckDue => {
                self.window.finished(tag);
                if self.flush_at.is_none() {
                    self.flush_at = Some(tokio::time::Instant::now() + ACK_INTERVAL);
                }
                true
            }
            Settlement::Returned => {
                self.window.settled(tag);
                true
            }
            // Stays in hand: no ack ever covers it.
            Settlement::Unsettled => false,
        }
    }

    /// When the next flush is due (pending forever when nothing waits).
    async fn due(&self) {
        match self.flush_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Sends the window's frames: what is due, or (`all`, at the end of a session) everything
    /// finished.
    async fn flush(&mut self, channel: &Channel, all: bool) -> Result<()> {
        let frames = if all {
            self.window.flush_all()
        } else {
            self.window.flush()
        };
        self.flush_at =
            (self.window.waiting() > 0).then(|| tokio::time::Instant::now() + ACK_INTERVAL);
        for frame in frames {
            channel
                .basic_ack(
                    frame.tag,
                    BasicAckOptions {
                        multiple: frame.multiple,
                    },
                )
                .await
                .map_err(amqp::error("acknowledging messages"))?;
            metrics::counter!("bus_ack_frames_total").increment(1);
            metrics::counter!("bus_messages_acked_total").increment(frame.count as u64);
        }
        Ok(())
    }
}

/// A delivery as the handler sees it.
fn message_of(delivery: &Delivery) -> Message {
    let property = |value: &Option<ShortString>| value.as_ref().map(|id| id.as_str().to_owned());
    Message {
        message_id: property(delivery.properties.message_id()),
        correlation_id: amqp::header_str(&delivery.properties, CORRELATION_ID_HEADER)
            .filter(|text| !text.is_empty())
            .or_else(|| property(delivery.properties.correlation_id())),
        causation_id: amqp::header_str(&delivery.properties, CAUSATION_ID_HEADER),
        body: delivery.data.clone(),
        redelivered: delivery.redelivered
            || delivery
                .properties
                .headers()
                .as_ref()
                .is_some_and(|headers| headers.inner().contains_key(amqp::ATTEMPTS_HEADER)),
    }
}

/// Waits for the in-flight handlers, at most `timeout`, recording each in `acks`; aborts the
/// rest, whose deliveries the broker returns to the queue when the channel closes.
async fn drain(mut in_flight: JoinSet<Settlement>, acks: &mut Acks, timeout: Duration) {
    let count = in_flight.len();
    if count == 0 {
        return;
    }
    tracing::info!(count, "finishing in-flight messages");
    let finished = tokio::time::timeout(timeout, async {
        while let Some(joined) = in_flight.join_next_with_id().await {
            acks.record(joined);
        }
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            count = in_flight.len(),
            "in-flight messages did not finish in time; they return to the queue"
        );
        in_flight.shutdown().await;
    }
}

fn report_panic(error: &JoinError) {
    if error.is_panic() {
        tracing::error!(
            "a message task panicked; its message returns to the queue when the channel closes"
        );
    }
}

/// How long a publish may take, connecting included, before it fails (and is retried by its
/// caller).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes persistent JSON messages to one exchange and routing key, each confirmed by the
/// broker. Connects lazily and again after a failure.
pub struct RabbitPublisher {
    amqp_url: String,
    name: String,
    exchange: String,
    routing_key: String,
    channel: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl RabbitPublisher {
    pub fn new(amqp_url: &str, name: &str, exchange: String, routing_key: &str) -> Self {
        RabbitPublisher {
            amqp_url: amqp_url.to_owned(),
            name: name.to_owned(),
            exchange,
            routing_key: routing_key.to_owned(),
            channel: tokio::sync::Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel> {
        let mut current = self.channel.lock().await;
        if let Some((connection, channel)) = current.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.as_str().into());
        let connection = Connection::connect(&self.amqp_url, properties)
            .await
            .map_err(amqp::error("connecting to RabbitMQ"))?;
        let channel = amqp::confirm_channel(&connection).await?;
        *current = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Closes the connection, if any.
    pub async fn close(&self) {
        if let Some((connection, _)) = self.channel.lock().await.take() {
            let _closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                connection.close(REPLY_SUCCESS, "publisher closing".into()),
            )
            .await;
        }
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, message: Outgoing) -> Result<()> {
        let published = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            let channel = self.channel().await?;
            let mut headers = FieldTable::default();
            headers.insert(
                CORRELATION_ID_HEADER.into(),
                amqp::string(&message.correlation_id),
            );
            headers.insert(
                CAUSATION_ID_HEADER.into(),
                amqp::string(&message.causation_id),
            );
            let properties = amqp::persistent_json(
                &message.message_id,
                &message.kind,
                &message.correlation_id,
                headers,
            );
            amqp::publish_confirmed(
                &channel,
                &self.exchange,
                &self.routing_key,
                &message.body,
                properties,
            )
            .await
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::Broker {
                context: "publishing",
                message: format!("no confirm within {} s", PUBLISH_TIMEOUT.as_secs()),
            })
        });
        if published.is_err() {
            // Start from a fresh connection next time: the channel may be closed or stuck.
            self.channel.lock().await.take();
        }
        published
    }
}
