//! The entry point of fraud decisions: the one function through which a verdict becomes a
//! `FraudChecked` event. The decision consumer calls it for each decision message; tests call
//! it directly. There is deliberately no HTTP route to it.

use std::sync::Arc;

use chrono::Utc;
use domain::{FraudDecision, TransactionCommand, TransactionError, TransactionId};
use infra::eventlog::EventMetadata;
use infra::log::LogPosition;

use crate::aggregates::TransactionAggregate;
use crate::error::{Error, Result};
use crate::store::{AggregateStore, Executed};

/// What recording a decision did. Every outcome is final: a consumer acknowledges the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionOutcome {
    /// `FraudChecked` is in the log at this position (appended now, or by an earlier delivery
    /// of the same decision).
    Recorded(LogPosition),
    /// The transaction already had a decision, or already ended: the message changes nothing.
    Ignored,
    /// No such transaction: the message is not about this ledger (dead-letter it).
    UnknownTransaction,
}

#[derive(Clone)]
pub struct FraudDecisions {
    transactions: Arc<AggregateStore<TransactionAggregate>>,
}

impl FraudDecisions {
    pub fn new(transactions: Arc<AggregateStore<TransactionAggregate>>) -> Self {
        FraudDecisions { transactions }
    }

    /// Records `decision` for `transaction_id`. Idempotent: a duplicate or late decision is
    /// ignored; the saga picks a recorded one up from the log. `metadata.command_id` should name
    /// the decision (its id), so a redelivered one is recognised.
    pub async fn record(
        &self,
        transaction_id: TransactionId,
        decision: FraudDecision,
        metadata: &EventMetadata,
    ) -> Result<DecisionOutcome> {
        let stream = transaction_id.to_string();
        let command = TransactionCommand::RecordFraudDecision {
            decision,
            at: Utc::now(),
        };
        match self
            .transactions
            .execute(&stream, command, metadata)
            .await?
        {
            Executed::Appended { position, .. } => {
                tracing::debug!(transaction_id = %transaction_id, "fraud decision recorded");
                Ok(DecisionOutcome::Recorded(position))
            }
            Executed::Unchanged { .. } => {
                tracing::info!(transaction_id = %transaction_id, "fraud decision ignored: already decided or final");
                Ok(DecisionOutcome::Ignored)
            }
            Executed::Refused(TransactionError::NotCreated) => {
                Ok(DecisionOutcome::UnknownTransaction)
            }
            Executed::Refused(refusal) => Err(Error::Store {
                context: "recording a fraud decision",
                message: refusal.to_string(),
            }),
        }
    }
}
