//! Shutdown and broker loss: nothing is lost, nothing is taken while stopped, and the worker
//! comes back by itself when the broker drops its connection.

use std::process::Stdio;
use std::time::Duration;

use domain::{AccountId, FraudOutcome};
use fraud_worker::testing::{TestApp, TestOptions, TestPayment, spawn_app};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::Command;
use uuid::Uuid;

use crate::WAIT;

#[tokio::test]
async fn a_stopped_worker_takes_nothing_and_a_restarted_one_decides_what_waited() {
    // Proves graceful shutdown: after a stop the worker has left the queue (no consumer) and a
    // message published meanwhile waits there untouched; the next worker decides it.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let queue = app.topology.fraud_queue();
    let before = TestPayment::deposit("15.00", "USD", AccountId(Uuid::new_v4()));
    app.decide(&before.event("corr-before")).await;

    app.stop().await;
    let (_, consumers) = app.queue_state(&queue).await;
    assert_eq!(consumers, 0, "the worker cancelled its consumer");
    let waiting = TestPayment::deposit("16.00", "USD", AccountId(Uuid::new_v4()));
    app.publish_event(&waiting.event("corr-waiting")).await;
    let (ready, _) = app
        .wait_for_queue(&queue, WAIT, |ready, _| ready == 1)
        .await;
    assert_eq!(ready, 1, "the message waits in the queue");

    app.restart().await.expect("the worker starts again");
    let decision = app
        .decision_for(waiting.transaction_id, WAIT)
        .await
        .expect("the restarted worker decides the waiting message")
        .message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    app.cleanup().await;
}

#[tokio::test]
async fn messages_in_flight_at_shutdown_are_finished_or_returned_to_the_queue() {
    // Proves SPEC §6's graceful shutdown: stopping while a batch is being handled loses nothing.
    // Every message is either decided before the stop or returned to the queue and decided by
    // the next worker.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let payments: Vec<_> = (0..30)
        .map(|_| TestPayment::deposit("5.00", "USD", AccountId(Uuid::new_v4())))
        .collect();
    for payment in &payments {
        app.publish_event(&payment.event("corr-shutdown")).await;
    }
    app.restart().await.expect("the worker starts again");
    for payment in &payments {
        let decision = app
            .decision_for(payment.transaction_id, WAIT)
            .await
            .expect("no message is lost across a restart")
            .message;
        assert_eq!(decision.outcome, FraudOutcome::Approved);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn the_worker_reconnects_when_the_broker_drops_its_connection() {
    // Proves that `/health` asks the broker for real and that the worker reconnects: when
    // RabbitMQ closes the worker's connection, `/health` answers 503 until the worker is back,
    // and a message published meanwhile is decided.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let Some(pid) = worker_connection(&app).await else {
        eprintln!("skipped: rabbitmqctl cannot list this broker's connections");
        app.cleanup().await;
        return;
    };
    let health = format!("{}/health", app.address);
    let mut closing = Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test: broker drops the worker"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rabbitmqctl runs");
    let down = poll_health(&health, StatusCode::SERVICE_UNAVAILABLE).await;
    let _ = closing.wait().await;
    let down = down.expect("/health reports the broker down while the worker reconnects");
    assert_eq!(down["checks"]["broker"], "down", "{down}");

    let payment = TestPayment::deposit("17.00", "USD", AccountId(Uuid::new_v4()));
    app.publish_event(&payment.event("corr-reconnect")).await;
    let up = poll_health(&health, StatusCode::OK).await;
    assert!(up.is_some(), "/health recovers once the worker reconnected");
    let decision = app
        .decision_for(payment.transaction_id, WAIT)
        .await
        .expect("the reconnected worker decides the message")
        .message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    app.cleanup().await;
}

/// Polls `/health` until it answers `status`, at most [`WAIT`]; the body of that answer.
async fn poll_health(url: &str, status: StatusCode) -> Option<Value> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(response) = client.get(url).send().await
            && response.status() == status
        {
            return response.json().await.ok();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The broker's id of the worker's connection (named `fraud-worker <prefix>`), if rabbitmqctl
/// can tell. Its tab-separated output has the pid in the form `close_connection` accepts.
async fn worker_connection(app: &TestApp) -> Option<String> {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .output()
        .await
        .ok()?;
    let name = format!("fraud-worker {}", app.prefix);
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.contains(&name))
        .and_then(|line| line.split('\t').next())
        .map(str::to_owned)
}
