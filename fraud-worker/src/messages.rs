//! The worker's side of the wire contract (`infra::messages`): reading a `transaction.created`
//! message into the rules' [`Candidate`], and writing the [`DecisionMessage`] of a verdict.
//!
//! Reading is strict: anything but a version-1 `TransactionCreated` of the transaction aggregate
//! is refused with a reason, and the consumer dead-letters it. Such a message can never become
//! valid, so retrying it would only block the queue.

use chrono::{DateTime, Utc};
use domain::{TransactionEvent, TransactionId};
use infra::messages::{DECISION_MESSAGE_SCHEMA, DecisionMessage, EventMessage};
use uuid::Uuid;

use crate::rules::{Candidate, Verdict};

/// The only payload format of `TransactionCreated` this version reads.
pub const SUPPORTED_EVENT_VERSION: &str = "1";

/// The event type the worker evaluates.
pub const TRANSACTION_CREATED: &str = "TransactionCreated";

/// The aggregate whose events the worker reads.
pub const TRANSACTION_AGGREGATE: &str = "transaction";

/// The headers a decision carries: the correlation id of the transaction's request, and what
/// caused it (the id of the `TransactionCreated` event).
pub use infra::amqp::{CAUSATION_ID_HEADER, CORRELATION_ID_HEADER};

/// The AMQP `type` property of decisions.
pub const DECISION_MESSAGE_TYPE: &str = "FraudDecision";

/// Namespace of decision ids. Fixed forever: a decision's id is derived from its transaction,
/// so every evaluation of one transaction (a redelivery, a restart) publishes the same id and
/// consumers can de-duplicate on it.
const DECISION_NAMESPACE: Uuid = Uuid::from_u128(0x6672_6175_642d_4000_8000_6465_6369_7369);

/// A `TransactionCreated` as the worker needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedEvent {
    /// The event's id: the decision's causation.
    pub event_id: Uuid,
    /// The correlation id of the request that created the transaction, from the metadata.
    pub correlation_id: Option<String>,
    pub candidate: Candidate,
}

/// Reads a message body. `Err` says why the message can never be evaluated.
pub fn parse_transaction_created(body: &[u8]) -> Result<CreatedEvent, String> {
    let message: EventMessage = serde_json::from_slice(body)
        .map_err(|error| format!("the body is not an event message: {error}"))?;
    if message.aggregate_type != TRANSACTION_AGGREGATE || message.event_type != TRANSACTION_CREATED
    {
        return Err(format!(
            "expected a {TRANSACTION_AGGREGATE} {TRANSACTION_CREATED} event, got {} {}",
            clip(&message.aggregate_type),
            clip(&message.event_type)
        ));
    }
    if message.schema != infra::messages::EVENT_MESSAGE_SCHEMA {
        return Err(format!(
            "event message schema {} is not supported",
            message.schema
        ));
    }
    if message.event_version != SUPPORTED_EVENT_VERSION {
        return Err(format!(
            "{TRANSACTION_CREATED} version {} is not supported (this worker reads version \
             {SUPPORTED_EVENT_VERSION})",
            clip(&message.event_version)
        ));
    }
    let event: TransactionEvent = serde_json::from_value(message.payload)
        .map_err(|error| format!("the {TRANSACTION_CREATED} payload is invalid: {error}"))?;
    let TransactionEvent::TransactionCreated {
        transaction_id,
        request,
        created_at,
        ..
    } = event
    else {
        return Err(format!(
            "the payload is a {} event, not {TRANSACTION_CREATED}",
            event.event_type()
        ));
    };
    if transaction_id.to_string() != message.aggregate_id {
        return Err(format!(
            "the payload's transaction {transaction_id} is not the message's aggregate {}",
            clip(&message.aggregate_id)
        ));
    }
    let correlation_id = message
        .metadata
        .get("correlation_id")
        .and_then(|value| value.as_str())
        .filter(|text| infra::http::valid_correlation_id(text))
        .map(str::to_owned);
    Ok(CreatedEvent {
        event_id: message.event_id,
        correlation_id,
        candidate: Candidate::new(transaction_id, &request, created_at),
    })
}

/// The correlation id in the metadata of a message that may not be a valid event at all, so
/// that even a dead-lettered message is logged under its request's correlation id.
pub fn correlation_id_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        correlation_id: String,
    }
    #[derive(serde::Deserialize)]
    struct Envelope {
        metadata: Metadata,
    }
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|envelope| envelope.metadata.correlation_id)
        .filter(|text| infra::http::valid_correlation_id(text))
}

/// The id of a transaction's decision: the same for every evaluation of that transaction.
pub fn decision_id(transaction_id: TransactionId) -> Uuid {
    Uuid::new_v5(&DECISION_NAMESPACE, transaction_id.as_uuid().as_bytes())
}

/// The decision message of `verdict`.
pub fn decision_message(
    transaction_id: TransactionId,
    verdict: &Verdict,
    decided_at: DateTime<Utc>,
) -> DecisionMessage {
    DecisionMessage {
        schema: DECISION_MESSAGE_SCHEMA,
        decision_id: decision_id(transaction_id),
        transaction_id,
        outcome: verdict.outcome,
        rule: verdict.rule.map(|rule| rule.as_str().to_owned()),
        inputs: verdict.inputs.clone(),
        decided_at,
    }
}

/// At most 64 characters of a value from a message, for a dead-letter reason.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use domain::{AccountId, Amount, Currency, CustomerId, FraudOutcome, TransactionKind};
    use domain::{TransactionEvent, TransactionRequest};
    use serde_json::json;

    use super::*;
    use crate::rules::RuleName;

    fn created_message() -> (TransactionId, EventMessage) {
        let usd = Currency::from_code("USD").expect("known");
        let request = TransactionRequest::new(
            TransactionKind::Transfer,
            Amount::parse("125.50", usd).expect("valid"),
            usd,
            Some(AccountId(Uuid::from_u128(1))),
            Some(AccountId(Uuid::from_u128(2))),
            None,
        )
        .expect("valid");
        let transaction_id = TransactionId(Uuid::from_u128(42));
        let event = TransactionEvent::TransactionCreated {
            transaction_id,
            request_fingerprint: request.fingerprint(),
            request,
            initiated_by: CustomerId(Uuid::from_u128(9)),
            created_at: Utc::now(),
        };
        let message = EventMessage {
            schema: 1,
            event_id: Uuid::from_u128(77),
            position: "1.1".to_owned(),
            recorded_at: Utc::now(),
            aggregate_type: "transaction".to_owned(),
            aggregate_id: transaction_id.to_string(),
            sequence: 1,
            event_type: "TransactionCreated".to_owned(),
            event_version: "1".to_owned(),
            payload: serde_json::to_value(&event).expect("serialises"),
            metadata: json!({"correlation_id": "corr-1", "causation_id": "cmd", "actor": "x", "command_id": "cmd"}),
        };
        (transaction_id, message)
    }

    fn body(message: &EventMessage) -> Vec<u8> {
        serde_json::to_vec(message).expect("serialises")
    }

    #[test]
    fn a_transaction_created_message_reads_into_a_candidate() {
        let (transaction_id, message) = created_message();
        let created = parse_transaction_created(&body(&message)).expect("a valid message");
        assert_eq!(created.event_id, Uuid::from_u128(77));
        assert_eq!(created.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(created.candidate.transaction_id, transaction_id);
        assert_eq!(created.candidate.amount_minor, 12_550);
        assert_eq!(created.candidate.currency.code(), "USD");
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        let refused = |body: &[u8]| parse_transaction_created(body).expect_err("refused");
        assert!(refused(b"not json").contains("not an event message"));
        let (_, message) = created_message();
        let mut other = message.clone();
        other.event_type = "FundsReserved".to_owned();
        assert!(refused(&body(&other)).contains("FundsReserved"));
        assert_eq!(correlation_id_of(&body(&other)).as_deref(), Some("corr-1"));
        assert_eq!(correlation_id_of(b"not json"), None);
        let mut future = message.clone();
        future.event_version = "2".to_owned();
        assert!(refused(&body(&future)).contains("version 2"));
        let mut broken = message.clone();
        broken.payload["TransactionCreated"]["request"]["amount_minor"] = json!(0);
        assert!(refused(&body(&broken)).contains("payload is invalid"));
        let mut mislabelled = message.clone();
        mislabelled.payload = json!({"FundsReserved": {"at": Utc::now()}});
        assert!(refused(&body(&mislabelled)).contains("not TransactionCreated"));
        let mut elsewhere = message;
        elsewhere.aggregate_id = Uuid::from_u128(1).to_string();
        assert!(refused(&body(&elsewhere)).contains("not the message's aggregate"));
    }

    #[test]
    fn every_evaluation_of_a_transaction_shares_its_decision_id() {
        let (transaction_id, _) = created_message();
        assert_eq!(decision_id(transaction_id), decision_id(transaction_id));
        assert_ne!(
            decision_id(transaction_id),
            decision_id(TransactionId(Uuid::from_u128(43)))
        );
        let verdict = Verdict {
            outcome: FraudOutcome::Rejected,
            rule: Some(RuleName::Velocity),
            inputs: json!({"velocity": {"status": "fired"}}),
        };
        let message = decision_message(transaction_id, &verdict, Utc::now());
        assert_eq!(message.decision_id, decision_id(transaction_id));
        assert_eq!(message.rule.as_deref(), Some("velocity"));
        assert_eq!(message.schema, DECISION_MESSAGE_SCHEMA);
    }
}
