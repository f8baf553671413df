//! The fraud rules as a bus handler: one `transaction.created` message in, its decision
//! published, and what to do with the message out. The same in both modes: on RabbitMQ with the
//! Redis counters (the worker's binary), and on the embedded bus with the SQLite counters
//! (`ledger serve`, where publishing hands the decision to command-api's handler, which appends
//! it to the log, before the consumer's checkpoint moves).
//!
//! - A message that can never be evaluated (unparseable, another event, another version) is
//!   poison, with the reason; one that failed for a passing reason (the counters, the publish)
//!   is retried later. Neither blocks the others for long.
//! - Handling a message again is harmless: the velocity count is idempotent per transaction and
//!   the decision id is derived from the transaction, so a decision is published at least once
//!   and never counted twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use domain::FraudOutcome;
use infra::bus::{Disposition, Handler, Message, Outgoing, Publisher};
use infra::problem::cause_chain;
use tracing::Instrument;

use crate::error::{Error, within};
use crate::evaluator::Evaluator;
use crate::messages::{
    CreatedEvent, DECISION_MESSAGE_TYPE, correlation_id_of, decision_message,
    parse_transaction_created,
};
use crate::rules::{Rules, Verdict};
use crate::velocity::VelocityCounters;

/// How long evaluating one message and publishing its decision may take before the message is
/// retried later. Both steps normally take milliseconds; this bounds a stalled store or broker.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// What handling one message came to.
enum Handled {
    /// Evaluated and its decision published.
    Decided(Verdict),
    /// Failed for a passing reason: retry later.
    Failed(String),
    /// Can never be evaluated.
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

/// The fraud rules, constructible without a broker or Redis: the rules, their counters and where
/// decisions go.
pub struct FraudRules {
    evaluator: Evaluator,
    publisher: Arc<dyn Publisher>,
}

impl FraudRules {
    pub fn new(
        rules: Arc<Rules>,
        counters: Arc<dyn VelocityCounters>,
        publisher: Arc<dyn Publisher>,
    ) -> Self {
        FraudRules {
            evaluator: Evaluator::new(rules, counters),
            publisher,
        }
    }

    pub fn rules(&self) -> &Rules {
        self.evaluator.rules()
    }

    /// Evaluates and publishes; says what became of the message.
    async fn process(&self, message: &Message) -> Handled {
        let span = tracing::Span::current();
        let created = match parse_transaction_created(&message.body) {
            Ok(created) => created,
            Err(reason) => {
                let correlation_id = correlation_id_of(&message.body)
                    .or_else(|| message.correlation_id.clone())
                    .or_else(|| message.message_id.clone())
                    .unwrap_or_else(|| "-".to_owned());
                span.record("correlation_id", correlation_id.as_str());
                return Handled::Poison(reason);
            }
        };
        let correlation_id = created
            .correlation_id
            .clone()
            .or_else(|| message.correlation_id.clone())
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
                self.publish(&created, &correlation_id, &verdict).await?;
                Ok(verdict)
            },
        )
        .await;
        match outcome {
            Ok(verdict) => Handled::Decided(verdict),
            Err(error) => Handled::Failed(cause_chain(&error)),
        }
    }

    /// Publishes the decision; returns once it is safe (confirmed, or recorded).
    async fn publish(
        &self,
        created: &CreatedEvent,
        correlation_id: &str,
        verdict: &Verdict,
    ) -> crate::Result<()> {
        let decision = decision_message(created.candidate.transaction_id, verdict, Utc::now());
        let body = serde_json::to_vec(&decision)
            .expect("a decision message is plain data, which always serialises");
        self.publisher
            .publish(Outgoing {
                message_id: decision.decision_id.to_string(),
                kind: DECISION_MESSAGE_TYPE.to_owned(),
                correlation_id: correlation_id.to_owned(),
                causation_id: created.event_id.to_string(),
                body,
            })
            .await
            .map_err(Error::from)
    }
}

#[async_trait]
impl Handler for FraudRules {
    /// Handles one message to the end and logs one line, in a span carrying the correlation id.
    async fn handle(&self, message: &Message) -> Disposition {
        let started = Instant::now();
        let span = tracing::info_span!(
            "message",
            correlation_id = tracing::field::Empty,
            transaction_id = tracing::field::Empty,
        );
        async {
            let handled = self.process(message).await;
            let elapsed = started.elapsed();
            record(&handled, elapsed);
            log(&handled, message, elapsed);
            handled.disposition()
        }
        .instrument(span)
        .await
    }
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

/// The one line per message of SPEC §6.
fn log(handled: &Handled, message: &Message, elapsed: Duration) {
    let message_id = message.message_id.as_deref().unwrap_or("-");
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let redelivered = message.redelivered;
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
