//! RabbitMQ: the topology as code, publishing with confirms, and what a consumer does with a
//! message it could not handle (SPEC §4: durable queues, persistent messages, publisher
//! confirms, manual acks, a dead-letter queue for poison messages).
//!
//! Every name derives from one prefix (`AMQP_PREFIX`, default `ledger`), so tests run side by
//! side with their own topology. For each consumer queue `Q` the topology declares:
//! - `Q` itself, dead-lettering to `<prefix>.dead-letter` with routing key `Q`;
//! - `Q.dead-letter`, where poison messages end, with the reason in a header;
//! - `Q.retry.<n>` for each back-off delay: a message parked there expires back into `Q`.
//!
//! Declaring is idempotent; every service declares the whole topology at start.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{
    BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::error::{Error, Result};

/// Back-off queues for a message that failed for a passing reason (a database, Redis or broker
/// outage): the first retry waits 1 s, the second 5 s, every later one 30 s.
pub const RETRY_DELAYS_MS: [u32; 3] = [1_000, 5_000, 30_000];

/// Retries before a message that keeps failing for a passing reason is dead-lettered: 1 + 5 +
/// 11 × 30 s ≈ 5.6 minutes, longer than the default fraud decision timeout (300 s), so an
/// outage shorter than that loses no message, and a transaction whose decision could not be
/// delivered ends `fraud_check_timeout` (and its late decision is ignored) before the message
/// reaches the dead-letter queue.
pub const RETRY_ATTEMPTS_MAX: u32 = 13;

/// How long a publish may wait for the broker's confirm. A broker that blocks publishers (memory
/// or disk alarm) must not hang a relay batch, a consumer or a shutdown forever.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Header carrying the correlation id that follows a request through every service (SPEC §6).
pub const CORRELATION_ID_HEADER: &str = "correlation_id";
/// Header naming what caused a message: the event or command it follows from.
pub const CAUSATION_ID_HEADER: &str = "causation_id";

/// Header counting a message's retries.
pub const ATTEMPTS_HEADER: &str = "x-ledger-attempts";
/// Header saying why a message was dead-lettered.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-ledger-dead-letter-reason";

/// Routing key of `TransactionCreated`, the fraud worker's input.
pub const TRANSACTION_CREATED_KEY: &str = "transaction.created";
/// Routing key of fraud decisions.
pub const FRAUD_DECISION_KEY: &str = "fraud.decision";

/// The names of the ledger's exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Result<Self> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !valid {
            return Err(Error::Config(format!(
                "AMQP_PREFIX {prefix:?} must be 1-64 characters of [a-z0-9._-]"
            )));
        }
        Ok(Topology {
            prefix: prefix.to_owned(),
        })
    }

    /// Every committed event, routed by `<aggregate>.<event>` (e.g. `transaction.created`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Fraud decisions, from the fraud worker to command-api.
    pub fn decisions_exchange(&self) -> String {
        format!("{}.decisions", self.prefix)
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }

    /// The fraud worker's input: `TransactionCreated` events.
    pub fn fraud_queue(&self) -> String {
        format!("{}.fraud-worker.transaction-created", self.prefix)
    }

    /// command-api's input: fraud decisions.
    pub fn decisions_queue(&self) -> String {
        format!("{}.command-api.fraud-decisions", self.prefix)
    }

    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead-letter")
    }

    pub fn retry_queue(queue: &str, level: usize) -> String {
        format!("{queue}.retry.{level}")
    }

    fn consumer_queues(&self) -> [(String, String, &'static str); 2] {
        [
            (
                self.fraud_queue(),
                self.events_exchange(),
                TRANSACTION_CREATED_KEY,
            ),
            (
                self.decisions_queue(),
                self.decisions_exchange(),
                FRAUD_DECISION_KEY,
            ),
        ]
    }

    /// Declares every exchange, queue and binding; idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (exchange, kind) in [
            (self.events_exchange(), ExchangeKind::Topic),
            (self.decisions_exchange(), ExchangeKind::Topic),
            (self.dead_letter_exchange(), ExchangeKind::Direct),
            (self.retry_exchange(), ExchangeKind::Direct),
        ] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("declaring an exchange"))?;
        }
        for (queue, exchange, key) in self.consumer_queues() {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-dead-letter-exchange".into(),
                string(&self.dead_letter_exchange()),
            );
            arguments.insert("x-dead-letter-routing-key".into(), string(&queue));
            self.declare_queue(channel, &queue, arguments).await?;
            self.bind(channel, &queue, &exchange, key).await?;

            let dead_letter = Topology::dead_letter_queue(&queue);
            self.declare_queue(channel, &dead_letter, FieldTable::default())
                .await?;
            self.bind(channel, &dead_letter, &self.dead_letter_exchange(), &queue)
                .await?;

            for (level, delay_ms) in RETRY_DELAYS_MS.iter().enumerate() {
                let retry = Topology::retry_queue(&queue, level);
                let mut arguments = FieldTable::default();
                arguments.insert("x-message-ttl".into(), AMQPValue::LongUInt(*delay_ms));
                arguments.insert("x-dead-letter-exchange".into(), string(""));
                arguments.insert("x-dead-letter-routing-key".into(), string(&queue));
                self.declare_queue(channel, &retry, arguments).await?;
                self.bind(channel, &retry, &self.retry_exchange(), &retry)
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes everything `declare` made: for tests, which each use their own prefix.
    pub async fn delete(&self, channel: &Channel) -> Result<()> {
        for (queue, _, _) in self.consumer_queues() {
            let mut queues = vec![Topology::dead_letter_queue(&queue)];
            queues.extend(
                (0..RETRY_DELAYS_MS.len()).map(|level| Topology::retry_queue(&queue, level)),
            );
            queues.push(queue);
            for queue in queues {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(amqp("deleting a queue"))?;
            }
        }
        for exchange in [
            self.events_exchange(),
            self.decisions_exchange(),
            self.dead_letter_exchange(),
            self.retry_exchange(),
        ] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(amqp("deleting an exchange"))?;
        }
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .map_err(amqp("declaring a queue"))?;
        Ok(())
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<()> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("binding a queue"))
    }
}

/// Connects to `url` and deletes everything `topology` declared: for tests and benchmarks, which
/// each use a prefix of their own.
pub async fn delete_topology(url: &str, topology: &Topology) -> Result<()> {
    let connection = connect(url).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    topology.delete(&channel).await?;
    let _ = connection.close(200, "topology deleted".into()).await;
    Ok(())
}

/// Connects to the broker (`AMQP_URL`).
pub async fn connect(url: &str) -> Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(amqp("connecting to RabbitMQ"))
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling publisher confirms"))?;
    Ok(channel)
}

/// Properties of a persistent JSON message.
pub fn persistent_json(
    message_id: &str,
    kind: &str,
    correlation_id: &str,
    headers: FieldTable,
) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_type(kind.into())
        .with_correlation_id(correlation_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
        .with_headers(headers)
}

/// Publishes and waits for the broker's confirmation.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        )
        .await
        .map_err(amqp("publishing"))?;
    match confirm
        .await
        .map_err(amqp("awaiting a publisher confirm"))?
    {
        Confirmation::Ack(_) => Ok(()),
        Confirmation::Nack(_) => Err(Error::Broker {
            context: "publishing",
            message: "the broker refused the message (nack)".to_owned(),
        }),
        Confirmation::NotRequested => Err(Error::Broker {
            context: "publishing",
            message: "the channel is not in confirm mode".to_owned(),
        }),
    }
}

/// A string header value.
pub fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// A string header of a delivery, if present.
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

fn attempts_of(properties: &BasicProperties) -> u32 {
    let Some(headers) = properties.headers().as_ref() else {
        return 0;
    };
    match headers.inner().get(ATTEMPTS_HEADER) {
        Some(AMQPValue::LongUInt(value)) => *value,
        Some(AMQPValue::LongLongInt(value)) => u32::try_from(*value).unwrap_or(u32::MAX),
        Some(AMQPValue::LongInt(value)) => u32::try_from(*value).unwrap_or(u32::MAX),
        _ => 0,
    }
}

/// What a consumer decided about a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (or a harmless duplicate): acknowledge.
    Ack,
    /// Failed for a passing reason: retry after a back-off, dead-letter after the last one.
    Retry(String),
    /// Can never succeed (unparseable, unknown): dead-letter now, with the reason.
    DeadLetter(String),
}

/// What became of a delivery once its disposition was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Its effect is durable (handled, or its copy parked): acknowledge it. The consumer's
    /// window sends the ack ([`crate::bus::acks`]).
    AckDue,
    /// Returned to its queue with a `nack` (already sent): the broker delivers it again.
    Returned,
    /// Neither: the channel is likely gone, and the broker delivers it again when it closes.
    Unsettled,
}

/// Carries out a disposition, except the ack itself. The copy to a retry or dead-letter queue is
/// published with a confirm before the original may be acknowledged, so a crash in between only
/// duplicates. If even that fails, the delivery is returned to its queue.
pub async fn settle(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    delivery: &Delivery,
    disposition: Disposition,
) -> Settlement {
    let outcome = match disposition {
        Disposition::Ack => Ok(()),
        Disposition::Retry(reason) => {
            let attempts = attempts_of(&delivery.properties);
            let level = usize::try_from(attempts)
                .unwrap_or(usize::MAX)
                .min(RETRY_DELAYS_MS.len() - 1);
            if attempts >= RETRY_ATTEMPTS_MAX {
                dead_letter(
                    channel,
                    topology,
                    queue,
                    delivery,
                    &format!("gave up after {attempts} retries: {reason}"),
                )
                .await
            } else {
                tracing::warn!(queue, attempts, reason = %reason, "message will be retried");
                let mut headers = delivery.properties.headers().clone().unwrap_or_default();
                headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(attempts + 1));
                let properties = delivery.properties.clone().with_headers(headers);
                publish_confirmed(
                    channel,
                    &topology.retry_exchange(),
                    &Topology::retry_queue(queue, level),
                    &delivery.data,
                    properties,
                )
                .await
            }
        }
        Disposition::DeadLetter(reason) => {
            dead_letter(channel, topology, queue, delivery, &reason).await
        }
    };
    let Err(error) = outcome else {
        return Settlement::AckDue;
    };
    tracing::error!(queue, error.message = %error, "could not park the message; returning it to its queue");
    let returned = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
    match returned {
        Ok(_) => Settlement::Returned,
        Err(error) => {
            tracing::error!(queue, error.message = %error, "could not return the message; the broker delivers it again when the channel closes");
            Settlement::Unsettled
        }
    }
}

async fn dead_letter(
    channel: &Channel,
    topology: &Topology,
    queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<()> {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(ShortString::as_str)
        .unwrap_or("-");
    tracing::error!(queue, message_id, reason, "message dead-lettered");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(DEAD_LETTER_REASON_HEADER.into(), string(reason));
    let properties = delivery.properties.clone().with_headers(headers);
    publish_confirmed(
        channel,
        &topology.dead_letter_exchange(),
        queue,
        &delivery.data,
        properties,
    )
    .await
}

/// How long to wait before reconnecting after the broker went away: short enough that a broker
/// restart costs seconds, long enough not to spin against a broker that refuses connections.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Maps a lapin error to the infrastructure error, naming what we were doing.
pub fn error(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    amqp(context)
}

fn amqp(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    move |error| Error::Broker {
        context,
        message: error.to_string(),
    }
}
