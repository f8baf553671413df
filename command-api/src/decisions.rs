//! The entry point of fraud decisions: the one function through which a verdict becomes a
//! `FraudChecked` event. The decision consumer calls it for each decision message; tests call
//! it directly. There is deliberately no HTTP route to it.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use domain::saga;
use domain::{FraudDecision, TransactionCommand, TransactionError, TransactionId};
use infra::eventlog::{EventMetadata, event_id};
use infra::log::LogPosition;

use crate::aggregates::TransactionAggregate;
use crate::error::{Error, Result};
use crate::saga::command_name;
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
    /// The saga's decision timeout, for the step chained onto a decision.
    decision_timeout: TimeDelta,
}

impl FraudDecisions {
    pub fn new(
        transactions: Arc<AggregateStore<TransactionAggregate>>,
        decision_timeout: TimeDelta,
    ) -> Self {
        FraudDecisions {
            transactions,
            decision_timeout,
        }
    }

    /// Records `decision` for `transaction_id`. Idempotent: a duplicate or late decision is
    /// ignored; the saga picks a recorded one up from the log. `metadata.command_id` should name
    /// the decision (its id), so a redelivered one is recognised.
    ///
    /// The step the decision completes rides in the same append (decision 54): an approval of
    /// a transaction whose funds are reserved appends `TransactionConfirmed` with it, a rejection
    /// appends `TransactionRejected`, both as the saga would have (its actor, its command ids),
    /// so the transfer does not wait for the saga to read the decision and append once more.
    /// The saga settles or releases from there, as after its own confirmation.
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
        // Caused by the `FraudChecked` this append starts with.
        let cause = event_id(&metadata.command_id, 0).to_string();
        let follow = |state: &TransactionAggregate| {
            let transaction = state.0.as_ref()?;
            let next = saga::chained_command(transaction, Utc::now(), self.decision_timeout)?;
            let command_id = format!("saga/{transaction_id}/{}", command_name(&next));
            Some((
                next,
                crate::metadata::for_saga(&metadata.correlation_id, &cause, command_id),
            ))
        };
        match self
            .transactions
            .execute_then(&stream, command, metadata, follow)
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
