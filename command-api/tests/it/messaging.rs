//! RabbitMQ on command-api's side (SPEC §4): the relay publishes every committed event once,
//! with its identity and headers, and moves its checkpoint only after the confirms. (The decision
//! consumer's test, which also verifies the projector's read models of the log it leaves, is in
//! `system-tests/tests/write_side/decisions.rs`.)

use std::collections::HashSet;
use std::time::Duration;

use domain::FraudOutcome;
use futures::StreamExt;
use infra::amqp::{self, Topology};
use infra::messages::EventMessage;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::json;
use uuid::Uuid;

use crate::support::{Harness, declare_tap, eventually};

async fn channel() -> (Connection, Channel) {
    let connection = amqp::connect(&command_api::testing::amqp_url())
        .await
        .expect("connects");
    let channel = amqp::confirm_channel(&connection).await.expect("a channel");
    (connection, channel)
}

/// A consumer of everything published to `exchange` with `key` from now on.
async fn tap(channel: &Channel, exchange: &str, key: &str) -> lapin::Consumer {
    let queue = declare_tap(channel, exchange, key).await;
    channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consumes")
}

async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a message arrives in time")
        .expect("the consumer is open")
        .expect("a delivery");
    delivery
        .ack(BasicAckOptions::default())
        .await
        .expect("acks");
    delivery
}

#[tokio::test]
async fn the_relay_publishes_every_consumed_event_once_with_its_identity() {
    // Proves the relay: each committed event that has a consumer (`TransactionCreated`) arrives
    // once on the events exchange, routed by `<aggregate>.<event>`, persistent, with
    // message_id = event id and the correlation id; no other event is published.
    let harness = Harness::start().await;
    let topology = Topology::new(&harness.amqp_prefix).expect("valid");
    let (connection, channel) = channel().await;
    topology.declare(&channel).await.expect("declares");
    let mut all = tap(&channel, &topology.events_exchange(), "#").await;
    let (_, alice) = harness.customer();
    let account = harness.open_account(&alice, "USD").await;
    let mut ids = Vec::new();
    for amount in ["12.00", "13.00"] {
        let id = harness
            .transact(&harness.operator(), json!({"type": "deposit", "amount": amount, "currency": "USD", "destination_account_id": account}))
            .await;
        harness.decide(id, FraudOutcome::Approved).await;
        ids.push(id);
    }
    harness.wait_settled(&ids).await;
    let stored: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT event_id, aggregate_type, event_type FROM command_api.events \
         WHERE event_type = 'TransactionCreated' ORDER BY tx_id, position",
    )
    .fetch_all(&harness.app.pool)
    .await
    .expect("reads");
    let mut seen = HashSet::new();
    for _ in 0..stored.len() {
        let delivery = next(&mut all).await;
        let message: EventMessage =
            serde_json::from_slice(&delivery.data).expect("an event message");
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .expect("a message id")
            .to_string();
        assert_eq!(message_id, message.event_id.to_string());
        assert_eq!(delivery.properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            delivery.routing_key.as_str(),
            EventMessage::routing_key(&message.aggregate_type, &message.event_type)
        );
        assert_eq!(
            amqp::header_str(&delivery.properties, "event_type").as_deref(),
            Some(message.event_type.as_str())
        );
        assert!(
            amqp::header_str(&delivery.properties, "correlation_id")
                .is_some_and(|id| !id.is_empty())
        );
        assert!(seen.insert(message.event_id), "published once");
    }
    let expected: HashSet<Uuid> = stored.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(seen, expected);
    assert_eq!(stored.len(), 2, "one per transaction");
    let all_events: i64 = sqlx::query_scalar("SELECT count(*) FROM command_api.events")
        .fetch_one(&harness.app.pool)
        .await
        .expect("counts");
    assert!(all_events > 2, "the log holds more than what was published");
    // Nothing else arrives: the next message would be a later one (there is none).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), all.next())
            .await
            .is_err(),
        "only TransactionCreated is published"
    );
    // The checkpoint reached the last published event.
    eventually(Duration::from_secs(10), || async {
        let relayed: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM command_api.follower_checkpoints WHERE name = 'relay'",
        )
        .fetch_optional(&harness.app.pool)
        .await
        .expect("reads");
        let last: i64 = sqlx::query_scalar(
            "SELECT max(position) FROM command_api.events WHERE event_type = 'TransactionCreated'",
        )
        .fetch_one(&harness.app.pool)
        .await
        .expect("reads");
        relayed == Some(last)
    })
    .await;
    let _ = connection.close(200, "done".into()).await;
    harness.finish().await;
}
