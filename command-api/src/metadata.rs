//! The metadata written on every event (SPEC §4), as command-api fills it: who acted, on which
//! command, caused by what, within which correlation. The event ids derive from the command id,
//! so a command that may be retried (a request with its idempotency key, a saga step, a
//! redelivered decision) gets an id derived from what it is, never a random one.

use infra::eventlog::EventMetadata;
use uuid::Uuid;

/// The actor recorded for steps the saga takes on its own.
pub const SAGA_ACTOR: &str = "saga";

/// The actor recorded on `FraudChecked`.
pub const FRAUD_WORKER_ACTOR: &str = "fraud-worker";

/// Metadata of a command received over HTTP: the request is its own cause.
pub fn for_request(correlation_id: &str, actor: Uuid, command_id: String) -> EventMetadata {
    EventMetadata {
        correlation_id: correlation_id.to_owned(),
        causation_id: command_id.clone(),
        actor: actor.to_string(),
        command_id,
    }
}

/// Metadata of a command the saga issues in reaction to `cause` (an event id, or a timer).
pub fn for_saga(correlation_id: &str, cause: &str, command_id: String) -> EventMetadata {
    EventMetadata {
        correlation_id: correlation_id.to_owned(),
        causation_id: cause.to_owned(),
        actor: SAGA_ACTOR.to_owned(),
        command_id,
    }
}
