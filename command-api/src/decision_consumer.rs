//! Consumes fraud decisions from RabbitMQ and records them through [`FraudDecisions`]: manual
//! acks, a bounded prefetch, idempotent (a duplicate or late decision is acknowledged and changes
//! nothing). Unparseable decisions and decisions about unknown transactions are dead-lettered
//! with the reason; passing failures (the database away) are retried with back-off.
//!
//! Every instance consumes (RabbitMQ spreads the messages); the transaction stream's expected
//! version serialises concurrent decisions on one transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use domain::FraudDecision;
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use infra::amqp::{self, Disposition, Topology};
use infra::messages::{DECISION_MESSAGE_SCHEMA, DecisionMessage};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::decisions::{DecisionOutcome, FraudDecisions};
use crate::error::{Error, Result};
use crate::metadata::{self, FRAUD_WORKER_ACTOR};

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub amqp_url: String,
    pub topology: Topology,
    /// Unacknowledged decisions in flight per instance.
    pub prefetch: u16,
}

pub struct DecisionConsumer {
    decisions: FraudDecisions,
    settings: ConsumerSettings,
    /// Whether the consumer currently holds a live broker connection: `/health`'s broker check.
    connected: Arc<AtomicBool>,
}

impl DecisionConsumer {
    pub fn new(decisions: FraudDecisions, settings: ConsumerSettings) -> Self {
        DecisionConsumer {
            decisions,
            settings,
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn connection_flag(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    /// Consumes until `cancel`, reconnecting after the broker goes away. On cancel it stops
    /// taking deliveries, finishes the ones in hand, and closes the channel, which returns any
    /// unstarted prefetched message to the queue.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        while !cancel.is_cancelled() {
            if let Err(error) = self.consume(&cancel).await {
                self.connected.store(false, Ordering::Relaxed);
                tracing::error!(error.message = %error, "decision consumer stopped; reconnecting");
                infra::tasks::pause(&cancel, amqp::RECONNECT_DELAY).await;
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        tracing::info!("decision consumer stopped");
    }

    async fn consume(&self, cancel: &CancellationToken) -> Result<()> {
        let connection = amqp::connect(&self.settings.amqp_url).await?;
        let channel = amqp::confirm_channel(&connection).await?;
        let topology = &self.settings.topology;
        topology.declare(&channel).await?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(broker("setting the prefetch"))?;
        let queue = topology.decisions_queue();
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "command-api".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker("starting to consume decisions"))?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %queue, "consuming fraud decisions");
        consumer
            .take_until(cancel.cancelled())
            .for_each_concurrent(usize::from(self.settings.prefetch), |delivery| {
                let (channel, queue) = (&channel, &queue);
                async move {
                    match delivery {
                        Ok(delivery) => {
                            // A panic while handling one message (a bug, or a corrupt stream
                            // the aggregate refuses to fold) dead-letters that message instead
                            // of killing the consumer and redelivering it to the next one.
                            let disposition = AssertUnwindSafe(self.handle(&delivery))
                                .catch_unwind()
                                .await
                                .unwrap_or_else(|_| Disposition::DeadLetter("handling the decision panicked".to_owned()));
                            if let Err(error) = amqp::settle(channel, topology, queue, &delivery, disposition).await {
                                tracing::error!(error.message = %error, "could not settle a decision message");
                            }
                        }
                        Err(error) => tracing::error!(error.message = %error, "decision delivery failed"),
                    }
                }
            })
            .await;
        let _ = channel.close(200, "command-api stopping".into()).await;
        let _ = connection.close(200, "command-api stopping".into()).await;
        if cancel.is_cancelled() {
            Ok(())
        } else {
            Err(Error::Infra(infra::Error::Broker {
                context: "consuming decisions",
                message: "the broker ended the consumer".to_owned(),
            }))
        }
    }

    /// Decides what to do with one decision message.
    async fn handle(&self, delivery: &Delivery) -> Disposition {
        let correlation_id =
            amqp::header_str(&delivery.properties, amqp::CORRELATION_ID_HEADER).unwrap_or_default();
        let span = tracing::info_span!("decision", correlation_id = %correlation_id);
        async {
            let message: DecisionMessage = match serde_json::from_slice(&delivery.data) {
                Ok(message) => message,
                Err(error) => return Disposition::DeadLetter(format!("unparseable decision: {error}")),
            };
            if message.schema != DECISION_MESSAGE_SCHEMA {
                return Disposition::DeadLetter(format!("unknown decision schema {}", message.schema));
            }
            let correlation = if correlation_id.is_empty() {
                message.transaction_id.to_string()
            } else {
                correlation_id.clone()
            };
            // The command is the decision itself: a redelivery appends the same event ids.
            let mut metadata = metadata::for_saga(
                &correlation,
                &message.decision_id.to_string(),
                format!("decision/{}", message.decision_id),
            );
            metadata.actor = FRAUD_WORKER_ACTOR.to_owned();
            let decision = FraudDecision {
                outcome: message.outcome,
                rule: message.rule.clone(),
                details: message.inputs.clone(),
            };
            let started = std::time::Instant::now();
            let outcome = self.decisions.record(message.transaction_id, decision, &metadata).await;
            metrics::histogram!("fraud_decision_record_seconds").record(started.elapsed().as_secs_f64());
            metrics::counter!("fraud_decisions_consumed_total", "result" => match &outcome {
                Ok(DecisionOutcome::Recorded(_)) => "recorded",
                Ok(DecisionOutcome::Ignored) => "ignored",
                Ok(DecisionOutcome::UnknownTransaction) => "unknown",
                Err(_) => "failed",
            })
            .increment(1);
            tracing::info!(transaction_id = %message.transaction_id, outcome = ?outcome.as_ref().ok(), "decision message handled");
            match outcome {
                Ok(DecisionOutcome::Recorded(_) | DecisionOutcome::Ignored) => Disposition::Ack,
                Ok(DecisionOutcome::UnknownTransaction) => {
                    Disposition::DeadLetter(format!("unknown transaction {}", message.transaction_id))
                }
                Err(error) => Disposition::Retry(error.to_string()),
            }
        }
        .instrument(span)
        .await
    }
}

fn broker(context: &'static str) -> impl Fn(lapin::Error) -> Error {
    let map = amqp::error(context);
    move |error| Error::Infra(map(error))
}
