//! Dependencies that fail: Redis going away mid-stream, and dependencies unreachable at start.

use std::process::Stdio;
use std::time::Duration;

use domain::{AccountId, FraudOutcome};
use fraud_worker::rules::RuleName;
use fraud_worker::startup::App;
use fraud_worker::testing::{TestOptions, TestPayment, spawn_app, test_config};
use infra::amqp::Topology;
use infra::testing::free_port;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::WAIT;

/// A Redis of the test's own, on a free port, so the test can stop it without disturbing others.
struct PrivateRedis {
    port: u16,
    process: Option<Child>,
}

impl PrivateRedis {
    async fn start(port: u16) -> PrivateRedis {
        let process = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed, as the CI requires");
        let redis = PrivateRedis {
            port,
            process: Some(process),
        };
        let client = redis::Client::open(redis.url()).expect("a valid URL");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return redis;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private Redis did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process
                .kill()
                .await
                .expect("our own redis-server can be killed");
        }
    }
}

#[tokio::test]
async fn a_message_that_meets_a_redis_outage_is_retried_and_decided_once_redis_is_back() {
    // Proves that a passing failure is retried rather than dropped or dead-lettered: with Redis
    // down, the message moves to the first retry queue, `/health` reports Redis (required for
    // the velocity rule) down, and once Redis is back the retried message is decided.
    let port = free_port();
    let mut redis = PrivateRedis::start(port).await;
    let options = TestOptions {
        redis_url: Some(redis.url()),
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options).await.expect("the worker starts");
    redis.stop().await;

    let payment = TestPayment::withdrawal("30.00", "USD", AccountId(Uuid::new_v4()));
    app.publish_event(&payment.event("corr-outage")).await;
    // It waits one second in the first retry queue, then (Redis still down) five in the
    // second: either is proof, and a slow poll may miss the first's one second.
    let retry_queues =
        [0, 1].map(|attempt| Topology::retry_queue(&app.topology.fraud_queue(), attempt));
    let deadline = tokio::time::Instant::now() + WAIT;
    let parked = loop {
        let mut parked = 0;
        for queue in &retry_queues {
            parked += app.queue_state(queue).await.0;
        }
        if parked > 0 || tokio::time::Instant::now() >= deadline {
            break parked;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (Read one queue after the other, a message moving between them can be seen twice.)
    assert!(parked >= 1, "the message waits in a retry queue");
    let response = reqwest::get(format!("{}/health", app.address))
        .await
        .expect("the worker answers");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["checks"]["redis"], "down", "{body}");
    assert_eq!(body["checks"]["broker"], "ok", "{body}");

    let mut redis = PrivateRedis::start(port).await;
    // The first retry waits one second, the second five: well within the deadline.
    let decision = app
        .decision_for(payment.transaction_id, Duration::from_secs(20))
        .await
        .expect("the retried message is decided once Redis is back")
        .message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    assert_eq!(decision.inputs["velocity"]["window_total"], "30.00");
    let dead_letters = Topology::dead_letter_queue(&app.topology.fraud_queue());
    assert_eq!(
        app.queue_state(&dead_letters).await.0,
        0,
        "nothing was dead-lettered"
    );
    app.cleanup().await;
    redis.stop().await;
}

#[tokio::test]
async fn redis_is_only_reported_when_the_velocity_rule_is_off() {
    // Proves `/health` treats Redis as optional when no rule needs it: the worker starts without
    // it and answers 200 `degraded`, and decides payments all the same.
    let options = TestOptions {
        redis_url: Some(format!("redis://127.0.0.1:{}", free_port())),
        rules_disabled: vec![RuleName::Velocity],
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options)
        .await
        .expect("the worker starts without Redis");
    let response = reqwest::get(format!("{}/health", app.address))
        .await
        .expect("the worker answers");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["redis"], "down", "{body}");
    let payment = TestPayment::deposit("40.00", "USD", AccountId(Uuid::new_v4()));
    let decision = app.decide(&payment.event("corr-no-redis")).await.message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    app.cleanup().await;
}

#[tokio::test]
async fn the_worker_refuses_to_start_without_its_required_dependencies() {
    // Proves start-up fails with a clear message, rather than at the first message, when the
    // broker is unreachable or when Redis is unreachable while the velocity rule needs it.
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let mut config = test_config(&prefix, "test:unused", &TestOptions::default());
    config.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let error = App::build(config.clone())
        .await
        .err()
        .expect("no Redis, no start");
    assert!(
        error.to_string().contains("FRAUD_RULES_DISABLED=velocity"),
        "{error}"
    );

    let mut config = test_config(&prefix, "test:unused", &TestOptions::default());
    config.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let error = App::build(config).await.err().expect("no broker, no start");
    assert!(error.to_string().contains("RabbitMQ"), "{error}");
}
