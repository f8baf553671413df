//! command-api's decision consumer (SPEC §4) over RabbitMQ: it records verdicts idempotently and
//! dead-letters what it cannot use; the log it leaves keeps SPEC §8 and the projector's read
//! models built from it verify. (Moved from command-api's tests, which keep the relay's.)

use std::time::Duration;

use chrono::Utc;
use domain::{FraudOutcome, TransactionId};
use infra::amqp::{self, FRAUD_DECISION_KEY, Topology};
use infra::messages::{DECISION_MESSAGE_SCHEMA, DecisionMessage};
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::json;
use uuid::Uuid;

use crate::support::{Audited, Harness, balance_of};

async fn channel() -> (Connection, Channel) {
    let connection = amqp::connect(&command_api::testing::amqp_url())
        .await
        .expect("connects");
    let channel = amqp::confirm_channel(&connection).await.expect("a channel");
    (connection, channel)
}

fn decision(transaction_id: Uuid, outcome: FraudOutcome) -> DecisionMessage {
    DecisionMessage {
        schema: DECISION_MESSAGE_SCHEMA,
        decision_id: Uuid::new_v5(&Uuid::NAMESPACE_OID, transaction_id.as_bytes()),
        transaction_id: TransactionId(transaction_id),
        outcome,
        rule: None,
        inputs: json!({"test": true}),
        decided_at: Utc::now(),
    }
}

async fn publish_decision(channel: &Channel, topology: &Topology, body: &[u8], message_id: &str) {
    let properties = amqp::persistent_json(
        message_id,
        "FraudDecision",
        "decision-test",
        FieldTable::default(),
    );
    amqp::publish_confirmed(
        channel,
        &topology.decisions_exchange(),
        FRAUD_DECISION_KEY,
        body,
        properties,
    )
    .await
    .expect("published");
}

#[tokio::test]
async fn decisions_arrive_once_however_often_they_are_delivered_and_poison_is_dead_lettered() {
    // Proves the decision consumer: the same decision delivered three times records one
    // FraudChecked and one settlement; an unparseable message and a decision for an unknown
    // transaction land in the dead-letter queue with a reason, without blocking the queue.
    let harness = Harness::start().await;
    let topology = Topology::new(&harness.amqp_prefix).expect("valid");
    let (connection, channel) = channel().await;
    topology.declare(&channel).await.expect("declares");
    let (_, alice) = harness.customer();
    let account = harness.open_account(&alice, "USD").await;
    let id = harness
        .transact(&harness.operator(), json!({"type": "deposit", "amount": "7.00", "currency": "USD", "destination_account_id": account}))
        .await;
    publish_decision(&channel, &topology, b"{not json", "poison-1").await;
    publish_decision(
        &channel,
        &topology,
        &serde_json::to_vec(&decision(Uuid::new_v4(), FraudOutcome::Approved)).expect("JSON"),
        "unknown-1",
    )
    .await;
    let body = serde_json::to_vec(&decision(id, FraudOutcome::Approved)).expect("JSON");
    for _ in 0..3 {
        publish_decision(&channel, &topology, &body, "same-decision").await;
    }
    harness.wait_settled(&[id]).await;
    let checks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM command_api.events WHERE aggregate_id = $1 AND event_type = 'FraudChecked'",
    )
    .bind(id.to_string())
    .fetch_one(&harness.app.pool)
    .await
    .expect("counts");
    assert_eq!(checks, 1);
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM command_api.events WHERE aggregate_id = $1 AND event_type = 'FraudChecked'",
    )
    .bind(id.to_string())
    .fetch_one(&harness.app.pool)
    .await
    .expect("reads");
    assert_eq!(actor, "fraud-worker");
    let report = harness.assert_invariants().await;
    assert_eq!(balance_of(&report, account), (700, 700));

    let dead_letters = Topology::dead_letter_queue(&topology.decisions_queue());
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let delivery = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing reached the dead-letter queue"
            );
            let got = channel
                .basic_get(
                    dead_letters.as_str().into(),
                    lapin::options::BasicGetOptions::default(),
                )
                .await
                .expect("basic.get");
            if let Some(message) = got {
                break message;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("acks");
        reasons.push(
            amqp::header_str(&delivery.properties, amqp::DEAD_LETTER_REASON_HEADER)
                .expect("a reason"),
        );
    }
    reasons.sort();
    assert!(reasons[0].starts_with("unknown transaction"), "{reasons:?}");
    assert!(
        reasons[1].starts_with("unparseable decision"),
        "{reasons:?}"
    );
    let _ = connection.close(200, "done".into()).await;
    harness.finish().await;
}
