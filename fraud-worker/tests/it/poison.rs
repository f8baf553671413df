//! Messages that can never be evaluated go to the dead-letter queue, with the reason, and do
//! not hold up the messages behind them.

use domain::{AccountId, FraudOutcome};
use fraud_worker::testing::{TestOptions, TestPayment, spawn_app};
use infra::amqp::Topology;
use uuid::Uuid;

use crate::WAIT;

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_their_reason_and_the_queue_moves_on() {
    // Proves SPEC §4's dead-letter queue: garbage, another event type and an unknown event
    // version each land in `<fraud queue>.dead-letter` with a reason header, while a good
    // message published after them is still decided.
    let options = TestOptions {
        // One at a time: the good message really is behind the poison ones.
        prefetch: 1,
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options).await.expect("the worker starts");
    let good = TestPayment::deposit("20.00", "USD", AccountId(Uuid::new_v4()));

    app.publish_raw(b"{ this is not json", "garbage-1").await;
    let mut other_event = good.event("corr-other");
    other_event.event_type = "FundsReserved".to_owned();
    app.publish_event(&other_event).await;
    let mut future_version = good.event("corr-future");
    future_version.event_version = "9".to_owned();
    app.publish_event(&future_version).await;
    let decision = app.decide(&good.event("corr-good")).await.message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);

    let dead_letter_queue = Topology::dead_letter_queue(&app.topology.fraud_queue());
    let dead = app.take_messages(&dead_letter_queue, 3, WAIT).await;
    assert_eq!(dead.len(), 3, "three poison messages: {dead:?}");
    assert_eq!(dead[0].body, b"{ this is not json");
    let reasons: Vec<_> = dead
        .iter()
        .map(|message| message.reason.clone().expect("a reason header"))
        .collect();
    assert!(reasons[0].contains("not an event message"), "{reasons:?}");
    assert!(reasons[1].contains("FundsReserved"), "{reasons:?}");
    assert!(reasons[2].contains("version 9"), "{reasons:?}");
    let (ready, _) = app.queue_state(&app.topology.fraud_queue()).await;
    assert_eq!(ready, 0, "nothing is stuck in the fraud queue");
    app.cleanup().await;
}
