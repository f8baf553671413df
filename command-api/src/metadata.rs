//! The metadata written on every event (SPEC §4): who acted, on which command, caused by what,
//! within which correlation. cqrs-es copies one map onto every event of a commit; the event id
//! and the recorded time are columns of the store, filled as the row is written.

use std::collections::HashMap;

use uuid::Uuid;

/// The actor recorded for steps the saga takes on its own.
pub const SAGA_ACTOR: &str = "saga";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    /// Follows a request through every service and event (SPEC §6).
    pub correlation_id: String,
    /// What caused this command: the request's command id, or the event the saga reacted to.
    pub causation_id: String,
    /// The acting `sub`, or `saga` for the process manager.
    pub actor: String,
    /// This command's own id.
    pub command_id: String,
}

impl EventMetadata {
    /// Metadata of a command received over HTTP: the request is its own cause.
    pub fn for_request(correlation_id: &str, actor: Uuid) -> Self {
        let command_id = Uuid::now_v7().to_string();
        EventMetadata {
            correlation_id: correlation_id.to_owned(),
            causation_id: command_id.clone(),
            actor: actor.to_string(),
            command_id,
        }
    }

    /// Metadata of a command the saga issues in reaction to `cause` (an event id, or a timer).
    pub fn for_saga(correlation_id: &str, cause: &str) -> Self {
        EventMetadata {
            correlation_id: correlation_id.to_owned(),
            causation_id: cause.to_owned(),
            actor: SAGA_ACTOR.to_owned(),
            command_id: Uuid::now_v7().to_string(),
        }
    }

    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("correlation_id".to_owned(), self.correlation_id.clone()),
            ("causation_id".to_owned(), self.causation_id.clone()),
            ("actor".to_owned(), self.actor.clone()),
            ("command_id".to_owned(), self.command_id.clone()),
        ])
    }
}
