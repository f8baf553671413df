//! The messages between services over RabbitMQ: the wire contract. Both are versioned by their
//! `schema` field; fields are only ever added.
//!
//! - [`EventMessage`]: a committed event as the relay publishes it (message_id = event id).
//! - [`DecisionMessage`]: a fraud verdict as the fraud worker publishes it.

use chrono::{DateTime, Utc};
use domain::{FraudOutcome, TransactionId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::eventlog::RecordedEvent;

/// The version of [`EventMessage`] written today.
pub const EVENT_MESSAGE_SCHEMA: u32 = 1;
/// The version of [`DecisionMessage`] written today.
pub const DECISION_MESSAGE_SCHEMA: u32 = 1;

/// A committed event, as published to the events exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    pub schema: u32,
    pub event_id: Uuid,
    /// The event's place in the log, `tx_id.position`.
    pub position: String,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
}

impl EventMessage {
    /// The message of a committed event. The payload is stored JSON, so it parses; a row that
    /// does not is published with a `null` payload, and the consumer dead-letters it.
    pub fn from_log(event: &RecordedEvent) -> Self {
        EventMessage {
            schema: EVENT_MESSAGE_SCHEMA,
            event_id: event.event_id,
            position: event.position.to_string(),
            recorded_at: event.recorded_at,
            aggregate_type: event.stream.aggregate_type.clone(),
            aggregate_id: event.stream.aggregate_id.clone(),
            sequence: i64::try_from(event.sequence).unwrap_or(i64::MAX),
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload: serde_json::from_str(&event.payload).unwrap_or(Value::Null),
            metadata: serde_json::to_value(&event.metadata).unwrap_or(Value::Null),
        }
    }

    /// The routing key: `<aggregate>.<event>` in snake case, without the aggregate's name
    /// repeated (`TransactionCreated` → `transaction.created`, `FundsHeld` → `account.funds_held`).
    pub fn routing_key(aggregate_type: &str, event_type: &str) -> String {
        let mut prefix = aggregate_type.chars();
        let capitalised: String = prefix
            .next()
            .map(|first| first.to_ascii_uppercase().to_string() + prefix.as_str())
            .unwrap_or_default();
        let event = event_type
            .strip_prefix(&capitalised)
            .filter(|rest| !rest.is_empty())
            .unwrap_or(event_type);
        let mut snake = String::with_capacity(event.len() + 4);
        for (index, c) in event.chars().enumerate() {
            if c.is_ascii_uppercase() {
                if index > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            } else {
                snake.push(c);
            }
        }
        format!("{aggregate_type}.{snake}")
    }
}

/// A fraud verdict for one transaction, as published to the decisions exchange.
/// Fields added later by a newer fraud worker are ignored by an older command-api (a rolling
/// upgrade must not dead-letter every decision); a change of meaning bumps `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionMessage {
    pub schema: u32,
    /// Derived from the transaction: a redelivered or re-evaluated decision has the same id.
    pub decision_id: Uuid,
    pub transaction_id: TransactionId,
    pub outcome: FraudOutcome,
    /// The rule that rejected, or `None` when every rule passed.
    pub rule: Option<String>,
    /// What every rule saw and concluded, for the audit trail.
    pub inputs: Value,
    pub decided_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_drop_the_repeated_aggregate_name() {
        assert_eq!(
            EventMessage::routing_key("transaction", "TransactionCreated"),
            "transaction.created"
        );
        assert_eq!(
            EventMessage::routing_key("transaction", "FundsReserved"),
            "transaction.funds_reserved"
        );
        assert_eq!(
            EventMessage::routing_key("transaction", "FraudChecked"),
            "transaction.fraud_checked"
        );
        assert_eq!(
            EventMessage::routing_key("account", "AccountOpened"),
            "account.opened"
        );
        assert_eq!(
            EventMessage::routing_key("account", "HoldSettled"),
            "account.hold_settled"
        );
        assert_eq!(
            EventMessage::routing_key("account", "Account"),
            "account.account"
        );
    }
}
