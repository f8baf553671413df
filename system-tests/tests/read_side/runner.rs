//! The live runner under crashes (SPEC §8.3 for the read side): a batch and its checkpoint
//! commit together, so a projector killed anywhere neither skips nor re-applies an event.

use std::time::Duration;

use domain::FraudOutcome;
use projector::testing::TestOptions;
use uuid::Uuid;

use crate::support::Harness;

/// How many times the projector is killed while traffic flows.
const KILLS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_batch_neither_loses_nor_doubles_a_row() {
    // Proves exactly-once projection: with batches of 5 and transactions being posted, the
    // projector is aborted wherever it is (most likely inside a batch transaction) and started
    // again, over and over; at the end every row equals the replay, each projection has applied
    // exactly as many events as the log holds, and the history has exactly one row per
    // customer account a transaction touches.
    let mut harness = Harness::start_with(TestOptions {
        batch_size: 5,
        ..TestOptions::default()
    })
    .await;
    let (_, token) = harness.customer();
    let alice = harness.open_account(&token, "EUR").await;
    let bob = harness.open_account(&token, "EUR").await;
    let mut transactions: Vec<Uuid> = Vec::new();
    let mut history_rows = 0;
    transactions.push(harness.fund(alice, "500.00", "EUR").await);
    history_rows += 1;

    for round in 0..KILLS {
        for _ in 0..4 {
            let id = harness.transfer(&token, alice, bob, "1.50", "EUR").await;
            harness.decide(id, FraudOutcome::Approved).await;
            transactions.push(id);
            history_rows += 2;
        }
        let id = harness.deposit(bob, "3.00", "EUR").await;
        harness.decide(id, FraudOutcome::Approved).await;
        transactions.push(id);
        history_rows += 1;
        // Not for correctness: a varying moment, so the kills land at different points of the
        // runners' batches while the saga is still settling.
        tokio::time::sleep(Duration::from_millis(5 * round as u64)).await;
        harness.restart_projector().await;
    }

    harness.wait_settled(&transactions).await;
    harness.caught_up().await;
    harness.assert_verified().await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM command_api.events")
        .fetch_one(&harness.app.pool)
        .await
        .expect("counting events");
    let applied: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.projection, c.events_applied FROM projector.checkpoints c
         JOIN projector.projections p
           ON p.name = c.projection AND p.live_generation = c.generation
         ORDER BY c.projection",
    )
    .fetch_all(&harness.projector.pool)
    .await
    .expect("reading the checkpoints");
    assert_eq!(applied.len(), 3);
    for (projection, count) in applied {
        assert_eq!(
            count, events,
            "{projection} applied {count} of {events} events"
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM projector.account_history")
        .fetch_one(&harness.projector.pool)
        .await
        .expect("counting history rows");
    assert_eq!(stored, history_rows);
    let settled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projector.account_history WHERE balance_after_minor IS NOT NULL",
    )
    .fetch_one(&harness.projector.pool)
    .await
    .expect("counting settled history rows");
    assert_eq!(settled, history_rows, "every transaction was approved");
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_instance_takes_over_when_the_leader_dies() {
    // Proves one active runner per projection across instances, with failover: a second
    // projector on the same database serves queries while standing by, and when the first is
    // killed it takes the projections over and applies the rest of the log exactly once.
    let mut harness = Harness::start().await;
    let mut standby = projector::testing::spawn_projector(
        &harness.database_url(),
        &harness.projector.options.clone(),
    )
    .await
    .expect("a second instance starts");
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    let first = harness.fund(account, "10.00", "USD").await;
    harness.caught_up().await;
    let via_standby = harness
        .client
        .get(format!("{}/api/v1/transactions/{first}", standby.address))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the standby answers");
    assert_eq!(via_standby.status(), reqwest::StatusCode::OK);

    harness.projector.kill().await;
    // The standby is the projector now; the killed one's sessions are closed.
    std::mem::swap(&mut harness.projector, &mut standby);
    let second = harness.fund(account, "5.00", "USD").await;
    harness.caught_up().await;
    let body = harness
        .client
        .get(format!(
            "{}/api/v1/accounts/{account}",
            harness.projector.address
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the standby answers")
        .json::<serde_json::Value>()
        .await
        .expect("an account");
    assert_eq!(
        body["balance"], "15.00",
        "{second} not applied by the new leader"
    );
    harness.assert_verified().await;
    standby.stop().await;
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_measured_from_the_checkpoints_while_no_runner_moves() {
    // Proves the lag the projector reports does not depend on its runners: with the projector
    // killed and transactions still settling, every projection shows the events it has not
    // applied and an age that keeps growing; once a projector runs again and catches up, the
    // lag is zero.
    let mut harness = Harness::start().await;
    let (_, token) = harness.customer();
    let account = harness.open_account(&token, "USD").await;
    harness.caught_up().await;
    harness.projector.kill().await;
    harness.fund(account, "10.00", "USD").await;

    let pool = projector::startup::open_read_models(&harness.database_url(), 2)
        .await
        .expect("the read models open");
    let reader = harness.log_reader().await;
    let stalled = projector::runner::measure_lag(&pool, &reader)
        .await
        .expect("the lag is measured");
    assert_eq!(stalled.len(), 3);
    for (name, lag) in &stalled {
        assert!(lag.events > 0, "{name}: {lag:?}");
        assert!(lag.oldest_unread > Duration::ZERO, "{name}: {lag:?}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = projector::runner::measure_lag(&pool, &reader)
        .await
        .expect("the lag is measured");
    for (name, before) in &stalled {
        let (_, after) = later
            .iter()
            .find(|(other, _)| other == name)
            .expect("every projection is measured again");
        assert!(
            after.oldest_unread > before.oldest_unread,
            "{name}: {after:?}"
        );
    }

    harness.restart_projector().await;
    harness.caught_up().await;
    for (name, lag) in projector::runner::measure_lag(&pool, &reader)
        .await
        .expect("the lag is measured")
    {
        assert_eq!(
            (lag.events, lag.oldest_unread),
            (0, Duration::ZERO),
            "{name}"
        );
    }
    pool.close().await;
    harness.finish().await;
}
