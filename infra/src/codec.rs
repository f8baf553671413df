//! The one owner of the stored event format: how a domain event becomes a stored event and back.
//!
//! A stored payload is exactly the domain event's JSON, written at [`EVENT_VERSION`] "1". The
//! write side encodes through [`encode`], and every reader (the write side's loads, the saga,
//! the projector, the fraud worker's messages, the CLI) decodes through [`decode`]. A future
//! change of an event's meaning gets a new version and an upcaster here; stored events are never
//! rewritten.

use domain::{AccountEvent, AccountId, TransactionEvent, TransactionId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::eventlog::{EventMetadata, NewEvent, RecordedEvent, StreamEvent, StreamId, event_id};

/// The aggregate type of account streams.
pub const ACCOUNT_STREAM: &str = "account";
/// The aggregate type of transaction streams.
pub const TRANSACTION_STREAM: &str = "transaction";
/// The only payload format written so far.
pub const EVENT_VERSION: &str = "1";
/// The event type the fraud worker evaluates and the relay publishes.
pub const TRANSACTION_CREATED: &str = "TransactionCreated";

/// A stored event decoded into the domain.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    Account(AccountId, AccountEvent),
    Transaction(TransactionId, TransactionEvent),
}

/// A domain event type that is stored in a stream of one aggregate type.
pub trait StoredEvent: Serialize + DeserializeOwned {
    /// The aggregate type of the streams these events live in.
    const AGGREGATE_TYPE: &'static str;
    /// The name stored in the `event_type` column.
    fn stored_type(&self) -> &'static str;
}

impl StoredEvent for AccountEvent {
    const AGGREGATE_TYPE: &'static str = ACCOUNT_STREAM;
    fn stored_type(&self) -> &'static str {
        self.event_type()
    }
}

impl StoredEvent for TransactionEvent {
    const AGGREGATE_TYPE: &'static str = TRANSACTION_STREAM;
    fn stored_type(&self) -> &'static str {
        self.event_type()
    }
}

/// The stream of an account.
pub fn account_stream(id: AccountId) -> StreamId {
    StreamId::new(ACCOUNT_STREAM, id.to_string())
}

/// The stream of a transaction.
pub fn transaction_stream(id: TransactionId) -> StreamId {
    StreamId::new(TRANSACTION_STREAM, id.to_string())
}

/// The events a command decided, ready to append: their ids derived from the command's id (so a
/// retry of the command appends the same ids), each with the command's metadata.
pub fn encode<E: StoredEvent>(
    events: &[E],
    metadata: &EventMetadata,
) -> Result<Vec<NewEvent>, String> {
    events
        .iter()
        .enumerate()
        .map(|(index, event)| {
            Ok(NewEvent {
                event_id: event_id(&metadata.command_id, index),
                event_type: event.stored_type().to_owned(),
                event_version: EVENT_VERSION.to_owned(),
                payload: serde_json::to_string(event)
                    .map_err(|error| format!("{}: {error}", event.stored_type()))?,
                metadata: metadata.clone(),
            })
        })
        .collect()
}

/// Reads a stored payload of a known stream type, or says why it cannot be read.
pub fn decode_payload<E: StoredEvent>(
    event_type: &str,
    event_version: &str,
    payload: &str,
) -> Result<E, String> {
    if event_version != EVENT_VERSION {
        return Err(format!(
            "unknown event version {event_version:?} of {event_type}"
        ));
    }
    serde_json::from_str::<E>(payload).map_err(|error| format!("{event_type}: {error}"))
}

/// Reads an event of one stream (an aggregate load).
pub fn decode_stream_event<E: StoredEvent>(event: &StreamEvent) -> Result<E, String> {
    decode_payload(&event.event_type, &event.event_version, &event.payload)
}

/// Decodes one committed event, or says why it cannot be read (unknown stream type, id, version
/// or payload): data to report, never a panic.
pub fn decode(event: &RecordedEvent) -> Result<DomainEvent, String> {
    let id = Uuid::parse_str(&event.stream.aggregate_id)
        .map_err(|error| format!("stream id {:?}: {error}", event.stream.aggregate_id))?;
    match event.stream.aggregate_type.as_str() {
        ACCOUNT_STREAM => decode_payload(&event.event_type, &event.event_version, &event.payload)
            .map(|payload| DomainEvent::Account(AccountId(id), payload)),
        TRANSACTION_STREAM => {
            decode_payload(&event.event_type, &event.event_version, &event.payload)
                .map(|payload| DomainEvent::Transaction(TransactionId(id), payload))
        }
        kind => Err(format!("unknown stream type {kind:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    #[test]
    fn an_encoded_event_decodes_to_itself_with_ids_derived_from_its_command() {
        // Proves the round trip through the stored format, and that a retried command derives
        // the same event ids while another command derives others.
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("in range");
        let event = TransactionEvent::FundsReserved { at };
        let metadata = EventMetadata {
            command_id: "command-1".to_owned(),
            ..EventMetadata::default()
        };
        let encoded = encode(std::slice::from_ref(&event), &metadata).expect("encodes");
        let again = encode(std::slice::from_ref(&event), &metadata).expect("encodes");
        assert_eq!(encoded[0].event_id, again[0].event_id);
        let other = EventMetadata {
            command_id: "command-2".to_owned(),
            ..metadata.clone()
        };
        assert_ne!(
            encode(std::slice::from_ref(&event), &other).expect("encodes")[0].event_id,
            encoded[0].event_id
        );
        assert_eq!(encoded[0].event_type, "FundsReserved");
        let id = TransactionId(Uuid::from_u128(7));
        let recorded = RecordedEvent {
            position: crate::log::LogPosition::START,
            event_id: encoded[0].event_id,
            recorded_at: at,
            stream: transaction_stream(id),
            sequence: 2,
            event_type: encoded[0].event_type.clone(),
            event_version: encoded[0].event_version.clone(),
            payload: encoded[0].payload.clone(),
            metadata,
        };
        assert_eq!(decode(&recorded), Ok(DomainEvent::Transaction(id, event)));
    }

    #[test]
    fn unreadable_events_are_reported_not_panicked_on() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("in range");
        let mut recorded = RecordedEvent {
            position: crate::log::LogPosition::START,
            event_id: Uuid::nil(),
            recorded_at: at,
            stream: StreamId::new(TRANSACTION_STREAM, Uuid::from_u128(1).to_string()),
            sequence: 1,
            event_type: "FundsReserved".to_owned(),
            event_version: "2".to_owned(),
            payload: "{}".to_owned(),
            metadata: EventMetadata::default(),
        };
        assert!(decode(&recorded).expect_err("version").contains("version"));
        recorded.event_version = EVENT_VERSION.to_owned();
        assert!(decode(&recorded).is_err(), "an empty payload is no event");
        recorded.stream.aggregate_type = "ledger".to_owned();
        assert!(decode(&recorded).expect_err("type").contains("stream type"));
        recorded.stream = StreamId::new(ACCOUNT_STREAM, "not-a-uuid");
        assert!(decode(&recorded).expect_err("id").contains("stream id"));
    }
}
