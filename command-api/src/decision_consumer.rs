//! Fraud decisions as a bus handler: [`DecisionHandler`] turns one decision message into a
//! `FraudChecked` event through [`FraudDecisions`]. The same handler serves both modes: THE
//! RabbitMQ consumer (`infra::bus::rabbit::RabbitConsumer`) hands it the decisions queue in the
//! distributed mode; in the embedded mode the fraud rules publish through an
//! `infra::bus::local::LocalPublisher` that calls it directly, so a decision is in the log
//! before the fraud rules' consumer moves its checkpoint.
//!
//! Idempotent: a duplicate or late decision is acknowledged and changes nothing. Unparseable
//! decisions and decisions about unknown transactions are poison (dead-lettered with the
//! reason); passing failures (the database away) are retried with back-off. Every instance
//! consumes (RabbitMQ spreads the messages); the transaction stream's expected version
//! serialises concurrent decisions on one transaction.

use async_trait::async_trait;
use domain::FraudDecision;
use infra::bus::{Disposition, Handler, Message};
use infra::messages::{DECISION_MESSAGE_SCHEMA, DecisionMessage};
use tracing::Instrument;

use crate::decisions::{DecisionOutcome, FraudDecisions};
use crate::metadata::{self, FRAUD_WORKER_ACTOR};

/// Records each decision message it is handed (module documentation).
pub struct DecisionHandler {
    decisions: FraudDecisions,
}

impl DecisionHandler {
    pub fn new(decisions: FraudDecisions) -> Self {
        DecisionHandler { decisions }
    }
}

#[async_trait]
impl Handler for DecisionHandler {
    async fn handle(&self, message: &Message) -> Disposition {
        let correlation_id = message.correlation_id.clone().unwrap_or_default();
        let span = tracing::info_span!("decision", correlation_id = %correlation_id);
        async {
            let decision: DecisionMessage = match serde_json::from_slice(&message.body) {
                Ok(decision) => decision,
                Err(error) => {
                    return Disposition::DeadLetter(format!("unparseable decision: {error}"));
                }
            };
            if decision.schema != DECISION_MESSAGE_SCHEMA {
                return Disposition::DeadLetter(format!(
                    "unknown decision schema {}",
                    decision.schema
                ));
            }
            let correlation = if correlation_id.is_empty() {
                decision.transaction_id.to_string()
            } else {
                correlation_id.clone()
            };
            // The command is the decision itself: a redelivery appends the same event ids.
            let mut metadata = metadata::for_saga(
                &correlation,
                &decision.decision_id.to_string(),
                format!("decision/{}", decision.decision_id),
            );
            metadata.actor = FRAUD_WORKER_ACTOR.to_owned();
            let verdict = FraudDecision {
                outcome: decision.outcome,
                rule: decision.rule.clone(),
                details: decision.inputs.clone().into(),
            };
            let started = std::time::Instant::now();
            let outcome = self
                .decisions
                .record(decision.transaction_id, verdict, &metadata)
                .await;
            metrics::histogram!("fraud_decision_record_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("fraud_decisions_consumed_total", "result" => match &outcome {
                Ok(DecisionOutcome::Recorded(_)) => "recorded",
                Ok(DecisionOutcome::Ignored) => "ignored",
                Ok(DecisionOutcome::UnknownTransaction) => "unknown",
                Err(_) => "failed",
            })
            .increment(1);
            tracing::info!(transaction_id = %decision.transaction_id, outcome = ?outcome.as_ref().ok(), "decision message handled");
            match outcome {
                Ok(DecisionOutcome::Recorded(_) | DecisionOutcome::Ignored) => Disposition::Ack,
                Ok(DecisionOutcome::UnknownTransaction) => Disposition::DeadLetter(format!(
                    "unknown transaction {}",
                    decision.transaction_id
                )),
                Err(error) => Disposition::Retry(error.to_string()),
            }
        }
        .instrument(span)
        .await
    }
}
