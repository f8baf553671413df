//! The RabbitMQ side of the worker: consume `transaction.created` from the fraud queue with
//! manual acknowledgements and a bounded prefetch, evaluate each message, publish its decision
//! with a publisher confirm, and only then acknowledge (SPEC §4).
//!
//! - Up to `FRAUD_PREFETCH` deliveries are handled concurrently; the broker sends no more until
//!   one is settled, so memory and concurrency are both bounded by the prefetch.
//! - A message that can never be evaluated (unparseable, another event, another version) is
//!   dead-lettered at once with the reason; one that failed for a passing reason (Redis, the
//!   publish) is retried after a back-off. Neither blocks the queue.
//! - A crash anywhere before the acknowledgement redelivers the message; evaluating it again is
//!   harmless (the velocity count is idempotent per transaction, the decision id is derived from
//!   the transaction), so a decision is published at least once and never counted twice.
//! - When the broker goes away the worker reconnects with a growing back-off, declaring the
//!   topology again. On shutdown it cancels its consumer (no new work), lets the in-flight
//!   messages finish within a bound, and closes its channels, which returns anything
//!   unacknowledged to the queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use domain::FraudOutcome;
use futures::FutureExt;
use futures::StreamExt;
use infra::amqp::{Disposition, Topology};
use infra::problem::cause_chain;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Error, Result, within};
use crate::evaluator::Evaluator;
use crate::messages::{
    CAUSATION_ID_HEADER, CORRELATION_ID_HEADER, CreatedEvent, DECISION_MESSAGE_TYPE,
    correlation_id_of, decision_message, parse_transaction_created,
};
use crate::rules::Verdict;

/// How long evaluating one message and publishing its decision may take before the message is
/// retried later. Both steps normally take milliseconds; this bounds a stalled Redis or broker.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the broker has to confirm a decision.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a shutdown waits for in-flight messages. Each is bounded by [`MESSAGE_TIMEOUT`] and
/// then settled, so this leaves room for one full attempt; whatever is still running after it
/// is returned to the queue when the channel closes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long closing a channel or the connection may take before we give up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `/health` waits for the broker.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest pause between two reconnection attempts. Pauses start at
/// `infra::amqp::RECONNECT_DELAY` and double after each failed attempt.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);

/// The AMQP reply code of a normal close.
const REPLY_SUCCESS: u16 = 200;

/// The broker connection in use, shared with `/health`. Empty while reconnecting.
#[derive(Clone, Default)]
pub struct BrokerLink {
    current: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl BrokerLink {
    fn set(&self, connection: Option<Arc<Connection>>) {
        metrics::gauge!("fraud_broker_connected").set(if connection.is_some() { 1.0 } else { 0.0 });
        *self
            .current
            .lock()
            .expect("the lock is only held to swap an Arc, which cannot panic") = connection;
    }

    pub fn current(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .expect("the lock is only held to swap an Arc, which cannot panic")
            .clone()
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

/// Connects to the broker under a name that says who we are (`fraud-worker <prefix>`), so an
/// operator can tell the worker's connection apart in the broker's tools.
pub async fn connect(url: &str, topology_prefix: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("fraud-worker {topology_prefix}").into());
    Connection::connect(url, properties)
        .await
        .map_err(broker("connecting to RabbitMQ"))
}

/// Declares the whole topology on a short-lived channel. Idempotent.
pub async fn declare(connection: &Connection, topology: &Topology) -> Result<()> {
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("opening a channel"))?;
    topology.declare(&channel).await?;
    channel
        .close(REPLY_SUCCESS, "topology declared".into())
        .await
        .map_err(broker("closing a channel"))
}

/// Why a consuming session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Shutdown was requested.
    Stopped,
    /// The broker went away or cancelled the consumer.
    Lost(String),
}

/// What handling one delivery came to.
enum Handled {
    /// Evaluated and its decision published: acknowledge.
    Decided(Verdict),
    /// Failed for a passing reason (Redis, the broker): retry after a back-off.
    Failed(String),
    /// Can never be evaluated: dead-letter with the reason.
    Poison(String),
}

impl Handled {
    fn disposition(&self) -> Disposition {
        match self {
            Handled::Decided(_) => Disposition::Ack,
            Handled::Failed(reason) => Disposition::Retry(reason.clone()),
            Handled::Poison(reason) => Disposition::DeadLetter(reason.clone()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Handled::Decided(_) => "acked",
            Handled::Failed(_) => "retried",
            Handled::Poison(_) => "dead_lettered",
        }
    }
}

/// The consumer: one session per broker connection, reconnecting until stopped.
pub struct Worker {
    topology: Topology,
    /// `topology.fraud_queue()`, computed once.
    queue: String,
    amqp_url: String,
    prefix: String,
    prefetch: u16,
    evaluator: Evaluator,
    broker: BrokerLink,
}

impl Worker {
    pub fn new(
        topology: Topology,
        amqp_url: &str,
        prefix: &str,
        prefetch: u16,
        evaluator: Evaluator,
        broker: BrokerLink,
    ) -> Self {
        Worker {
            queue: topology.fraud_queue(),
            topology,
            amqp_url: amqp_url.to_owned(),
            prefix: prefix.to_owned(),
            prefetch,
            evaluator,
            broker,
        }
    }

    /// Consumes on `first`, then on every new connection after a loss, until `cancel`.
    pub async fn run(self: Arc<Self>, first: Connection, cancel: CancellationToken) {
        let mut next = Some(first);
        let mut delay = infra::amqp::RECONNECT_DELAY;
        while !cancel.is_cancelled() {
            let connection = match next.take() {
                Some(connection) => connection,
                None => match self.reconnect().await {
                    Ok(connection) => {
                        tracing::info!("reconnected to RabbitMQ");
                        connection
                    }
                    Err(error) => {
                        tracing::warn!(error.message = %error, retry_in_ms = delay.as_millis(), "cannot reach RabbitMQ");
                        pause(delay, &cancel).await;
                        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                        continue;
                    }
                },
            };
            let connection = Arc::new(connection);
            self.broker.set(Some(connection.clone()));
            let end = self.session(&connection, &cancel).await;
            self.broker.set(None);
            let _closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                connection.close(REPLY_SUCCESS, "fraud-worker stopping".into()),
            )
            .await;
            match end {
                Ok(SessionEnd::Stopped) => break,
                Ok(SessionEnd::Lost(reason)) => {
                    // The session was consuming: a fresh loss, reconnect soon.
                    tracing::warn!(reason, "lost the RabbitMQ connection; reconnecting");
                    delay = infra::amqp::RECONNECT_DELAY;
                    pause(delay, &cancel).await;
                }
                Err(error) => {
                    // The session could not even start: back off like a failed connection.
                    tracing::warn!(error.message = %error, retry_in_ms = delay.as_millis(), "RabbitMQ session failed; reconnecting");
                    pause(delay, &cancel).await;
                    delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                }
            }
        }
        tracing::info!("fraud consumer stopped");
    }

    async fn reconnect(&self) -> Result<Connection> {
        let connection = connect(&self.amqp_url, &self.prefix).await?;
        declare(&connection, &self.topology).await?;
        Ok(connection)
    }

    /// Consumes on one connection until it is lost or `cancel` fires, then settles or returns
    /// what is in flight and closes the channels.
    async fn session(
        self: &Arc<Self>,
        connection: &Connection,
        cancel: &CancellationToken,
    ) -> Result<SessionEnd> {
        let publisher = infra::amqp::confirm_channel(connection).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(broker("opening the consumer channel"))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting the prefetch"))?;
        let tag = format!("fraud-worker-{}", Uuid::new_v4());
        let mut deliveries = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("starting the consumer"))?;
        tracing::info!(queue = %self.queue, prefetch = self.prefetch, "consuming");
        let capacity = usize::from(self.prefetch);
        let mut in_flight = JoinSet::new();
        let end = loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break SessionEnd::Stopped,
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    report_panic(joined);
                    // A broker error on the publishing channel closes it for good; every
                    // message would then fail. Start over on a fresh connection instead.
                    if !publisher.status().connected() {
                        break SessionEnd::Lost("the publishing channel closed".to_owned());
                    }
                }
                next = deliveries.next(), if in_flight.len() < capacity => match next {
                    Some(Ok(delivery)) => {
                        in_flight.spawn(self.clone().handle(delivery, publisher.clone()));
                    }
                    Some(Err(error)) => break SessionEnd::Lost(error.to_string()),
                    None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
                },
            }
        };
        if matches!(end, SessionEnd::Stopped) {
            // Stop taking work. Deliveries the broker already sent but we never started stay
            // unacknowledged and go back to the queue when the channel closes.
            let _cancelled = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await;
        }
        drain(in_flight).await;
        for (name, channel) in [("consumer", &channel), ("publisher", &publisher)] {
            let closed = tokio::time::timeout(
                CLOSE_TIMEOUT,
                channel.close(REPLY_SUCCESS, "fraud-worker stopping".into()),
            )
            .await;
            if !matches!(closed, Ok(Ok(()))) && matches!(end, SessionEnd::Stopped) {
                tracing::warn!(channel = name, "could not close a channel cleanly");
            }
        }
        Ok(end)
    }

    /// Handles one delivery to the end: decide what to do with it, do it, log one line. Runs in
    /// a span carrying the correlation id, so every line logged on its behalf has it.
    async fn handle(self: Arc<Self>, delivery: Delivery, publisher: Channel) {
        let started = Instant::now();
        let span = tracing::info_span!(
            "message",
            correlation_id = tracing::field::Empty,
            transaction_id = tracing::field::Empty,
        );
        async {
            // A panic while evaluating one message (a bug) dead-letters that message instead of
            // leaking its prefetch slot and panicking again on every redelivery.
            let handled = std::panic::AssertUnwindSafe(self.process(&delivery, &publisher))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Handled::Poison("evaluating the message panicked".to_owned()));
            let settled = infra::amqp::settle(
                &publisher,
                &self.topology,
                &self.queue,
                &delivery,
                handled.disposition(),
            )
            .await;
            let elapsed = started.elapsed();
            record(&handled, elapsed);
            log(&handled, &delivery, elapsed);
            if let Err(error) = settled {
                tracing::error!(
                    error.message = %error,
                    "could not settle a message; the broker will deliver it again"
                );
            }
        }
        .instrument(span)
        .await;
    }

    /// Evaluates and publishes; says what to do with the delivery.
    async fn process(&self, delivery: &Delivery, publisher: &Channel) -> Handled {
        let span = tracing::Span::current();
        let property =
            |value: &Option<ShortString>| value.as_ref().map(|id| id.as_str().to_owned());
        let created = match parse_transaction_created(&delivery.data) {
            Ok(created) => created,
            Err(reason) => {
                let correlation_id = correlation_id_of(&delivery.data)
                    .or_else(|| property(delivery.properties.correlation_id()))
                    .or_else(|| property(delivery.properties.message_id()))
                    .unwrap_or_else(|| "-".to_owned());
                span.record("correlation_id", correlation_id.as_str());
                return Handled::Poison(reason);
            }
        };
        let correlation_id = created
            .correlation_id
            .clone()
            .or_else(|| property(delivery.properties.correlation_id()))
            .unwrap_or_else(|| created.event_id.to_string());
        span.record("correlation_id", correlation_id.as_str());
        span.record(
            "transaction_id",
            tracing::field::display(created.candidate.transaction_id),
        );
        let outcome = within(
            MESSAGE_TIMEOUT,
            "evaluating and publishing a decision",
            async {
                let verdict = self.evaluator.evaluate(&created.candidate).await?;
                self.publish(publisher, &created, &correlation_id, &verdict)
                    .await?;
                Ok(verdict)
            },
        )
        .await;
        match outcome {
            Ok(verdict) => Handled::Decided(verdict),
            Err(error) => Handled::Failed(cause_chain(&error)),
        }
    }

    /// Publishes the decision and waits for the broker's confirm.
    async fn publish(
        &self,
        publisher: &Channel,
        created: &CreatedEvent,
        correlation_id: &str,
        verdict: &Verdict,
    ) -> Result<()> {
        let message = decision_message(created.candidate.transaction_id, verdict, Utc::now());
        let payload = serde_json::to_vec(&message)
            .expect("a decision message is plain data, which always serialises");
        let mut headers = FieldTable::default();
        headers.insert(
            CORRELATION_ID_HEADER.into(),
            infra::amqp::string(correlation_id),
        );
        headers.insert(
            CAUSATION_ID_HEADER.into(),
            infra::amqp::string(&created.event_id.to_string()),
        );
        let properties = infra::amqp::persistent_json(
            &message.decision_id.to_string(),
            DECISION_MESSAGE_TYPE,
            correlation_id,
            headers,
        );
        within(PUBLISH_TIMEOUT, "publishing a decision", async {
            infra::amqp::publish_confirmed(
                publisher,
                &self.topology.decisions_exchange(),
                infra::amqp::FRAUD_DECISION_KEY,
                &payload,
                properties,
            )
            .await
            .map_err(Error::from)
        })
        .await
    }
}

/// Waits for the in-flight handlers, at most [`DRAIN_TIMEOUT`]; aborts the rest, whose
/// deliveries the broker returns to the queue when the channel closes.
async fn drain(mut in_flight: JoinSet<()>) {
    let count = in_flight.len();
    if count == 0 {
        return;
    }
    tracing::info!(count, "finishing in-flight messages");
    let finished = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = in_flight.join_next().await {
            report_panic(joined);
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

fn report_panic(joined: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(
            "a message handler panicked; its message returns to the queue when the channel closes"
        );
    }
}

/// Pauses for `delay`, or less if `cancel` fires.
async fn pause(delay: Duration, cancel: &CancellationToken) {
    let _cancelled = tokio::time::timeout(delay, cancel.cancelled()).await;
}

fn outcome_name(outcome: FraudOutcome) -> &'static str {
    match outcome {
        FraudOutcome::Approved => "approved",
        FraudOutcome::Rejected => "rejected",
    }
}

fn record(handled: &Handled, elapsed: Duration) {
    let outcome = handled.name();
    metrics::counter!("fraud_messages_total", "outcome" => outcome).increment(1);
    metrics::histogram!("fraud_message_duration_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    if let Handled::Decided(verdict) = handled {
        let rule = verdict.rule.map_or("none", |rule| rule.as_str());
        metrics::counter!(
            "fraud_decisions_total",
            "outcome" => outcome_name(verdict.outcome),
            "rule" => rule
        )
        .increment(1);
    }
}

/// The one line per message of SPEC §6. The correlation and transaction ids come from the
/// span [`Worker::handle`] runs in.
fn log(handled: &Handled, delivery: &Delivery, elapsed: Duration) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map_or("-", ShortString::as_str);
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let redelivered = delivery.redelivered;
    match handled {
        Handled::Decided(verdict) => tracing::info!(
            message_id,
            redelivered,
            outcome = outcome_name(verdict.outcome),
            rule = verdict.rule.map_or("none", |rule| rule.as_str()),
            latency_ms,
            "fraud decision published"
        ),
        Handled::Failed(reason) => tracing::warn!(
            message_id,
            redelivered,
            reason = %reason,
            latency_ms,
            "message could not be evaluated now; retrying later"
        ),
        Handled::Poison(reason) => tracing::info!(
            message_id,
            redelivered,
            reason = %reason,
            latency_ms,
            "message dead-lettered: it can never be evaluated"
        ),
    }
}

fn broker(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    move |error| {
        Error::Infra(infra::Error::Broker {
            context,
            message: error.to_string(),
        })
    }
}
