//! What a customer party sees of a transaction's audit trail (SPEC §5): its own side only.
//! Admins and auditors see every event as stored; a customer (the payer or the payee) sees each
//! event reduced to an allow-list of fields, so that it never learns
//! - the other party's identity: the initiator's customer id (`initiated_by`, the metadata's
//!   `actor`), nor the correlation id the initiator chose (free text that may name them);
//! - the fraud rules' inputs (the payer's recent spending, the thresholds), which
//!   `GET /api/v1/fraud/rules` refuses customers too: a customer sees the outcome and the rule;
//! - the other side's leg of a confirmed transaction.
//!
//! The allow-list fails closed: an event type added later shows its type and time, and an empty
//! payload, until this module learns what of it a customer may see.

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::model::transactions::TransactionRecord;

/// Actors that are the ledger itself, not a person: shown to every party.
const SYSTEM_ACTORS: [&str; 2] = ["saga", "fraud-worker"];

/// The fields of a stored event a customer party `me` may see. `event_type` names the payload's
/// variant (events are stored externally tagged: `{"FraudChecked": {...}}`).
pub fn customer_view(
    me: Uuid,
    record: &TransactionRecord,
    event_type: &str,
    payload: &Value,
    metadata: &Value,
) -> (Value, Value) {
    let body = &payload[event_type];
    let initiator = record.initiated_by == me;
    let kept = match event_type {
        "TransactionCreated" => {
            let request = &body["request"];
            let mut created = pick(body, &["transaction_id", "created_at"]);
            created.insert(
                "request".to_owned(),
                Value::Object(pick(
                    request,
                    &[
                        "kind",
                        "amount_minor",
                        "currency",
                        "source_account_id",
                        "destination_account_id",
                        "description",
                    ],
                )),
            );
            if initiator {
                created.insert("initiated_by".to_owned(), json!(me));
            }
            created
        }
        "FraudChecked" => {
            let mut checked = pick(body, &["at"]);
            checked.insert(
                "decision".to_owned(),
                Value::Object(pick(&body["decision"], &["outcome", "rule"])),
            );
            checked
        }
        "TransactionConfirmed" => {
            let mut confirmed = pick(body, &["at"]);
            let own: Vec<Value> = body["legs"]
                .as_array()
                .map(|legs| {
                    legs.iter()
                        .filter(|leg| owns_leg(me, record, leg))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            confirmed.insert("legs".to_owned(), Value::Array(own));
            confirmed
        }
        "TransactionRejected" => pick(body, &["reason", "at"]),
        "FundsReserved" | "SettlementCompleted" | "ReleaseCompleted" => pick(body, &["at"]),
        _ => Map::new(),
    };
    let payload = json!({ event_type: Value::Object(kept) });
    (payload, customer_metadata(me, initiator, metadata))
}

/// The initiator sees its own request's metadata; the other party only which system actor took
/// a step.
fn customer_metadata(me: Uuid, initiator: bool, metadata: &Value) -> Value {
    let actor = metadata["actor"].as_str();
    let shown_actor = actor.filter(|actor| {
        SYSTEM_ACTORS.contains(actor) || Uuid::parse_str(actor).is_ok_and(|id| id == me)
    });
    let mut kept = if initiator {
        pick(metadata, &["correlation_id", "causation_id", "command_id"])
    } else {
        Map::new()
    };
    if let Some(actor) = shown_actor {
        kept.insert("actor".to_owned(), json!(actor));
    }
    Value::Object(kept)
}

/// Whether a confirmed leg is on an account `me` owns.
fn owns_leg(me: Uuid, record: &TransactionRecord, leg: &Value) -> bool {
    let Some(account) = leg["account_id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
    else {
        return false;
    };
    let sides = [
        (record.source_account_id, record.source_owner_id),
        (record.destination_account_id, record.destination_owner_id),
    ];
    sides
        .iter()
        .any(|(id, owner)| *id == Some(account) && *owner == Some(me))
}

/// The named fields of an object (those present).
fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|field| {
            value
                .get(*field)
                .map(|found| ((*field).to_owned(), found.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn record(payer: Uuid, payee: Uuid) -> (TransactionRecord, Uuid, Uuid) {
        let (source, destination) = (Uuid::new_v4(), Uuid::new_v4());
        let record = TransactionRecord {
            id: Uuid::new_v4(),
            kind: "transfer".to_owned(),
            status: "CONFIRMED".to_owned(),
            amount_minor: 100,
            currency: "USD".to_owned(),
            source_account_id: Some(source),
            destination_account_id: Some(destination),
            source_owner_id: Some(payer),
            destination_owner_id: Some(payee),
            description: None,
            reason: None,
            fraud: None,
            initiated_by: payer,
            version: 5,
            created_at: Utc::now(),
            updated_at: Utc::now(),
            created_position: 1,
        };
        (record, source, destination)
    }

    #[test]
    fn the_payee_never_sees_the_payer_nor_the_fraud_inputs_nor_the_payers_leg() {
        // Proves finding 5: what the payee of a transfer sees of each event.
        let (payer, payee) = (Uuid::new_v4(), Uuid::new_v4());
        let (record, source, destination) = record(payer, payee);
        let metadata = json!({"actor": payer.to_string(), "correlation_id": "alice-phone",
                              "causation_id": "c", "command_id": "k"});
        let created = json!({"TransactionCreated": {"transaction_id": record.id,
            "request": {"kind": "transfer", "amount_minor": 100, "currency": "USD",
                        "source_account_id": source, "destination_account_id": destination,
                        "description": "rent"},
            "request_fingerprint": "f", "initiated_by": payer, "created_at": "t"}});
        let (payload, shown) =
            customer_view(payee, &record, "TransactionCreated", &created, &metadata);
        let text = format!("{payload}{shown}");
        assert!(!text.contains(&payer.to_string()), "{text}");
        assert!(!text.contains("alice-phone"), "{text}");
        assert_eq!(
            payload["TransactionCreated"]["request"]["description"],
            "rent"
        );

        let fraud = json!({"FraudChecked": {"decision": {"outcome": "approved", "rule": null,
            "details": {"velocity": {"spent_minor": 990_000, "limit_minor": 5_000_000}}}, "at": "t"}});
        let saga = json!({"actor": "fraud-worker", "correlation_id": "alice-phone"});
        let (payload, shown) = customer_view(payee, &record, "FraudChecked", &fraud, &saga);
        assert_eq!(
            payload,
            json!({"FraudChecked": {"decision": {"outcome": "approved", "rule": null}, "at": "t"}})
        );
        assert_eq!(shown, json!({"actor": "fraud-worker"}));

        let legs = json!({"TransactionConfirmed": {"legs": [
            {"account_id": source, "amount_minor": -100, "currency": "USD"},
            {"account_id": destination, "amount_minor": 100, "currency": "USD"}], "at": "t"}});
        let (payload, _) = customer_view(payee, &record, "TransactionConfirmed", &legs, &saga);
        let legs = payload["TransactionConfirmed"]["legs"]
            .as_array()
            .expect("legs");
        assert_eq!(legs.len(), 1);
        assert_eq!(legs[0]["account_id"], json!(destination));
    }

    #[test]
    fn the_initiator_sees_its_own_request_and_metadata_but_not_the_fraud_inputs() {
        let (payer, payee) = (Uuid::new_v4(), Uuid::new_v4());
        let (record, _, _) = record(payer, payee);
        let metadata = json!({"actor": payer.to_string(), "correlation_id": "mine"});
        let created = json!({"TransactionCreated": {"initiated_by": payer}});
        let (payload, shown) =
            customer_view(payer, &record, "TransactionCreated", &created, &metadata);
        assert_eq!(payload["TransactionCreated"]["initiated_by"], json!(payer));
        assert_eq!(shown["correlation_id"], "mine");
        let fraud = json!({"FraudChecked": {"decision": {"outcome": "rejected",
            "rule": "velocity", "details": {"secret": 1}}}});
        let (payload, _) = customer_view(payer, &record, "FraudChecked", &fraud, &metadata);
        assert!(payload["FraudChecked"]["decision"].get("details").is_none());
    }

    #[test]
    fn an_unknown_event_type_shows_nothing_of_its_payload() {
        // Proves the allow-list fails closed.
        let (payer, payee) = (Uuid::new_v4(), Uuid::new_v4());
        let (record, _, _) = record(payer, payee);
        let event = json!({"SomethingNew": {"secret": payer}});
        let (payload, _) = customer_view(payee, &record, "SomethingNew", &event, &json!({}));
        assert_eq!(payload, json!({"SomethingNew": {}}));
    }
}
