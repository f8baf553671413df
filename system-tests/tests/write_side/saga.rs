//! The saga (SPEC §4): lifecycle outcomes, contention on one account, steps run twice, and
//! crashes between any two steps. SPEC §8 is audited over the whole log after each scenario.

use chrono::Utc;
use command_api::aggregates::{AccountAggregate, TransactionAggregate};
use command_api::saga::Work;
use command_api::store::{AggregateStore, Executed};
use command_api::testing::{TestOptions, spawn_app};
use domain::{
    AccountCommand, AccountId, Amount, Currency, CustomerId, FraudDecision, FraudOutcome,
    RejectionReason, TransactionCommand, TransactionId, TransactionKind, TransactionRequest,
};
use infra::eventlog::EventLog;
use infra::follow::Outcome;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use crate::support::{Audited, Harness, balance_of, eventually};

#[tokio::test]
async fn approved_rejected_and_timed_out_transactions_end_as_spec_section_4_says() {
    // Proves the three endings: approved → CONFIRMED and settled; fraud rejected → REJECTED
    // fraud_suspected with the hold released; no decision → REJECTED fraud_check_timeout.
    let harness = Harness::start_with(TestOptions {
        decision_timeout_seconds: 5,
        ..TestOptions::default()
    })
    .await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    harness.fund(source, "500.00", "USD").await;
    let transfer = |amount: &str| json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": source, "destination_account_id": destination});
    let approved = harness.transact(&alice, transfer("100.00")).await;
    let rejected = harness.transact(&alice, transfer("50.00")).await;
    let timed_out = harness.transact(&alice, transfer("25.00")).await;
    harness.decide(approved, FraudOutcome::Approved).await;
    harness.decide(rejected, FraudOutcome::Rejected).await;
    harness.wait_settled(&[approved, rejected, timed_out]).await;
    assert_eq!(
        harness.outcome(approved).await,
        ("CONFIRMED".to_owned(), None)
    );
    assert_eq!(
        harness.outcome(rejected).await,
        ("REJECTED".to_owned(), Some("fraud_suspected".to_owned()))
    );
    assert_eq!(
        harness.outcome(timed_out).await,
        (
            "REJECTED".to_owned(),
            Some("fraud_check_timeout".to_owned())
        )
    );
    let report = harness.assert_invariants().await;
    assert_eq!(
        balance_of(&report, source),
        (40_000, 40_000),
        "only the approved 100.00 left"
    );
    assert_eq!(balance_of(&report, destination), (10_000, 10_000));
    // A late decision is acknowledged and changes nothing.
    let events = harness.event_count().await;
    harness.decide(timed_out, FraudOutcome::Approved).await;
    assert_eq!(harness.event_count().await, events);
    harness.finish().await;
}

#[tokio::test]
async fn a_decision_arriving_after_the_reservation_records_the_step_it_completes_with_it() {
    // Proves decision 54: the decision consumer appends the confirmation (or the rejection) in
    // the very append of the `FraudChecked` that completes it, as the saga would have written
    // it, and the saga then settles or releases from there, once. And decision 55: the saga's
    // reservation commits with the account events it records.
    let harness = Harness::start().await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    harness.fund(source, "500.00", "USD").await;
    let transfer = |amount: &str| json!({"type": "transfer", "amount": amount, "currency": "USD", "source_account_id": source, "destination_account_id": destination});
    let approved = harness.transact(&alice, transfer("100.00")).await;
    let rejected = harness.transact(&alice, transfer("50.00")).await;
    let ids = [approved, rejected];
    // Nothing decides these but this test: wait for the saga's reservations first.
    eventually(Duration::from_secs(30), || async {
        let reserved: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM command_api.events WHERE aggregate_type = 'transaction' \
             AND aggregate_id = ANY($1) AND event_type = 'FundsReserved'",
        )
        .bind(ids.map(|id| id.to_string()).to_vec())
        .fetch_one(&harness.app.pool)
        .await
        .expect("counting reservations");
        reserved == 2
    })
    .await;
    harness.decide(approved, FraudOutcome::Approved).await;
    harness.decide(rejected, FraudOutcome::Rejected).await;
    harness.wait_settled(&ids).await;
    for (id, step, name, completion) in [
        (
            approved,
            "TransactionConfirmed",
            "confirm",
            "SettlementCompleted",
        ),
        (
            rejected,
            "TransactionRejected",
            "reject",
            "ReleaseCompleted",
        ),
    ] {
        // (event type, commit, actor, command id) of the transaction's events, in order.
        let events: Vec<(String, i64, String, String)> = sqlx::query_as(
            "SELECT event_type, tx_id::text::bigint, metadata->>'actor', \
                    metadata->>'command_id' \
             FROM command_api.events WHERE aggregate_type = 'transaction' \
             AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id.to_string())
        .fetch_all(&harness.app.pool)
        .await
        .expect("reading the transaction's events");
        let kinds: Vec<&str> = events.iter().map(|event| event.0.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "TransactionCreated",
                "FundsReserved",
                "FraudChecked",
                step,
                completion
            ],
            "{id}"
        );
        // Decision 55: the reservation committed with the hold and the credit it records.
        let reserved_in: Vec<(String, i64)> = sqlx::query_as(
            "SELECT event_type, tx_id::text::bigint FROM command_api.events \
             WHERE aggregate_type = 'account' AND event_type IN ('FundsHeld', 'CreditReserved') \
             AND payload->(event_type)->>'transaction_id' = $1",
        )
        .bind(id.to_string())
        .fetch_all(&harness.app.pool)
        .await
        .expect("reading the accounts' events of the transaction");
        assert_eq!(reserved_in.len(), 2, "{reserved_in:?}");
        for (kind, commit) in &reserved_in {
            assert_eq!(
                *commit, events[1].1,
                "{kind} committed apart from FundsReserved"
            );
        }
        let (decided, completed) = (&events[2], &events[3]);
        assert_eq!(
            decided.1, completed.1,
            "{step} committed apart from FraudChecked"
        );
        assert_eq!(completed.2, "saga");
        assert_eq!(completed.3, format!("saga/{id}/{name}"));
    }
    let report = harness.assert_invariants().await;
    assert_eq!(balance_of(&report, source), (40_000, 40_000));
    assert_eq!(balance_of(&report, destination), (10_000, 10_000));
    // The decisions delivered again change nothing.
    let events = harness.event_count().await;
    harness.decide(approved, FraudOutcome::Approved).await;
    harness.decide(rejected, FraudOutcome::Rejected).await;
    assert_eq!(harness.event_count().await, events);
    harness.finish().await;
}

#[tokio::test]
async fn fifty_concurrent_transfers_from_three_hundred_confirm_exactly_thirty() {
    // Proves no overdraft under contention: 50 concurrent 10.00 transfers out of 300.00 → exactly
    // 30 confirmed, 20 rejected insufficient_funds, balance 0.00, never negative, no write
    // conflict reaching a client.
    let harness = Harness::start().await;
    let (alice, source, destination) = harness.payer_and_payee().await;
    harness.fund(source, "300.00", "USD").await;
    let body = json!({"type": "transfer", "amount": "10.00", "currency": "USD", "source_account_id": source, "destination_account_id": destination});
    let posts = (0..50).map(|_| harness.transact(&alice, body.clone()));
    let ids = futures::future::join_all(posts).await;
    futures::future::join_all(
        ids.iter()
            .map(|id| harness.decide(*id, FraudOutcome::Approved)),
    )
    .await;
    harness.wait_settled(&ids).await;
    let mut outcomes: HashMap<(String, Option<String>), usize> = HashMap::new();
    for id in &ids {
        *outcomes.entry(harness.outcome(*id).await).or_default() += 1;
    }
    assert_eq!(
        outcomes.get(&("CONFIRMED".to_owned(), None)),
        Some(&30),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.get(&("REJECTED".to_owned(), Some("insufficient_funds".to_owned()))),
        Some(&20),
        "{outcomes:?}"
    );
    let report = harness.assert_invariants().await;
    assert_eq!(balance_of(&report, source), (0, 0));
    assert_eq!(balance_of(&report, destination), (30_000, 30_000));
    // Never negative: every hold recorded what was left, and none went below zero.
    let lowest: Option<i64> = sqlx::query_scalar(
        "SELECT min((payload->'FundsHeld'->>'available_after_minor')::bigint) FROM command_api.events \
         WHERE aggregate_id = $1 AND event_type = 'FundsHeld'",
    )
    .bind(source.to_string())
    .fetch_one(&harness.app.pool)
    .await
    .expect("reading holds");
    assert_eq!(lowest, Some(0));
    harness.finish().await;
}

#[tokio::test]
async fn every_saga_step_run_twice_changes_nothing() {
    // Proves exactly-once: after everything settled, advancing every transaction again, replaying
    // the whole log through the saga from its start, and recording every decision again append
    // no event and move no money.
    let harness = Harness::start().await;
    let (_, alice) = harness.customer();
    let (_, bob) = harness.customer();
    let source = harness.open_account(&alice, "EUR").await;
    let destination = harness.open_account(&bob, "EUR").await;
    harness.fund(source, "100.00", "EUR").await;
    let mut ids = Vec::new();
    for (amount, outcome) in [
        ("30.00", FraudOutcome::Approved),
        ("20.00", FraudOutcome::Rejected),
        ("90.00", FraudOutcome::Approved),
    ] {
        let id = harness
            .transact(&alice, json!({"type": "transfer", "amount": amount, "currency": "EUR", "source_account_id": source, "destination_account_id": destination}))
            .await;
        harness.decide(id, outcome).await;
        // One at a time: a batch of the saga advances its transactions concurrently, so
        // three in flight at once would contend for the funds in no defined order.
        harness.wait_settled(&[id]).await;
        ids.push(id);
    }
    let before = harness.assert_invariants().await;
    let events = harness.event_count().await;

    for id in &ids {
        harness.decide(*id, FraudOutcome::Approved).await;
        for _ in 0..2 {
            let results = harness
                .app
                .saga
                .advance_all(vec![Work {
                    transaction_id: TransactionId(*id),
                    correlation_id: "again".to_owned(),
                    cause: "test".to_owned(),
                }])
                .await;
            assert!(
                results.iter().all(|(_, result)| result.is_ok()),
                "advancing a finished transaction works: {results:?}"
            );
        }
    }
    sqlx::query("UPDATE command_api.follower_checkpoints SET tx_id = 0, position = 0")
        .execute(&harness.app.pool)
        .await
        .expect("rewinding the saga");
    while harness.app.saga.process_log_batch().await.expect("a batch") != Outcome::Idle {}

    assert_eq!(
        harness.event_count().await,
        events,
        "nothing was appended the second time"
    );
    let after = harness.assert_invariants().await;
    assert_eq!(balance_of(&after, source), balance_of(&before, source));
    assert_eq!(
        balance_of(&after, destination),
        balance_of(&before, destination)
    );
    assert_eq!(
        balance_of(&after, source),
        (7_000, 7_000),
        "90.00 could not be covered after 30.00"
    );
    harness.finish().await;
}

/// The commands of a whole approved transfer, in the order the saga issues them.
fn approved_path(
    id: TransactionId,
    request: &TransactionRequest,
    source: AccountId,
    destination: AccountId,
) -> Vec<Step> {
    let at = Utc::now();
    let amount = request.amount;
    vec![
        Step::Transaction(TransactionCommand::RecordFraudDecision {
            decision: decision(FraudOutcome::Approved),
            at,
        }),
        Step::Account(
            source,
            AccountCommand::PlaceHold {
                transaction_id: id,
                amount,
                at,
            },
        ),
        Step::Account(
            destination,
            AccountCommand::ReserveCredit {
                transaction_id: id,
                amount,
                at,
            },
        ),
        Step::Transaction(TransactionCommand::RecordReservation { at }),
        Step::Transaction(TransactionCommand::Confirm { at }),
        Step::Account(
            source,
            AccountCommand::SettleHold {
                transaction_id: id,
                at,
            },
        ),
        Step::Account(
            destination,
            AccountCommand::PostCredit {
                transaction_id: id,
                at,
            },
        ),
        Step::Transaction(TransactionCommand::CompleteSettlement { at }),
    ]
}

/// The commands of a transfer whose decision was a rejection that arrived after the hold.
fn rejected_path(
    id: TransactionId,
    request: &TransactionRequest,
    source: AccountId,
    destination: AccountId,
) -> Vec<Step> {
    let at = Utc::now();
    let amount = request.amount;
    vec![
        Step::Account(
            source,
            AccountCommand::PlaceHold {
                transaction_id: id,
                amount,
                at,
            },
        ),
        Step::Account(
            destination,
            AccountCommand::ReserveCredit {
                transaction_id: id,
                amount,
                at,
            },
        ),
        Step::Transaction(TransactionCommand::RecordFraudDecision {
            decision: decision(FraudOutcome::Rejected),
            at,
        }),
        Step::Transaction(TransactionCommand::Reject {
            reason: RejectionReason::FraudSuspected,
            at,
        }),
        Step::Account(
            source,
            AccountCommand::ReleaseHold {
                transaction_id: id,
                at,
            },
        ),
        Step::Account(
            destination,
            AccountCommand::CancelCredit {
                transaction_id: id,
                at,
            },
        ),
        Step::Transaction(TransactionCommand::CompleteRelease { at }),
    ]
}

enum Step {
    Account(AccountId, AccountCommand),
    Transaction(TransactionCommand),
}

fn decision(outcome: FraudOutcome) -> FraudDecision {
    FraudDecision {
        outcome,
        rule: Some("test".to_owned()),
        details: json!({}).into(),
    }
}

/// A writer of the test's log with a pool and a committer of its own, as another instance is.
async fn open_writer(database_url: &str) -> (sqlx::PgPool, Arc<dyn EventLog>) {
    let pool = infra::db::connect(database_url, "command_api", 4, "test")
        .await
        .expect("connects");
    let log = command_api::testing::writer_log(&pool, database_url).await;
    (pool, log)
}

/// Creates a transfer of `minor` from `source` to `destination` and runs the first `prefix` of
/// its `path` (each step must write), through stores of its own: what another writer (an
/// earlier leader, a saga killed after that step) leaves in the log.
async fn write_transfer_prefix(
    log: &Arc<dyn EventLog>,
    (source, destination): (AccountId, AccountId),
    minor: i64,
    path: fn(TransactionId, &TransactionRequest, AccountId, AccountId) -> Vec<Step>,
    prefix: usize,
) -> TransactionId {
    let accounts = AggregateStore::<AccountAggregate>::full_replay(log.clone());
    let transactions = AggregateStore::<TransactionAggregate>::full_replay(log.clone());
    let metadata =
        || command_api::metadata::for_saga("written", "test", Uuid::new_v4().to_string());
    let id = TransactionId(Uuid::new_v4());
    let request = TransactionRequest::new(
        TransactionKind::Transfer,
        Amount::from_minor(minor).expect("positive"),
        Currency::from_code("USD").expect("known"),
        Some(source),
        Some(destination),
        None,
    )
    .expect("a valid transfer");
    let create = TransactionCommand::Create {
        transaction_id: id,
        request: request.clone(),
        initiated_by: CustomerId(Uuid::new_v4()),
        at: Utc::now(),
    };
    let created = transactions
        .execute(&id.to_string(), create, &metadata())
        .await
        .expect("stored");
    assert!(matches!(created, Executed::Appended { .. }));
    for step in path(id, &request, source, destination)
        .into_iter()
        .take(prefix)
    {
        let written = match step {
            Step::Account(account, command) => matches!(
                accounts
                    .execute(&account.to_string(), command, &metadata())
                    .await
                    .expect("stored"),
                Executed::Appended { .. }
            ),
            Step::Transaction(command) => matches!(
                transactions
                    .execute(&id.to_string(), command, &metadata())
                    .await
                    .expect("stored"),
                Executed::Appended { .. }
            ),
        };
        assert!(written, "every step of the prefix writes");
    }
    id
}

/// Writes, for every prefix of both paths, a transaction that stopped after that prefix — as if
/// the saga had been killed between those two steps. Returns the ids with the expected outcome.
async fn write_interrupted_transactions(
    database_url: &str,
    source: AccountId,
    destination: AccountId,
) -> Vec<(Uuid, &'static str)> {
    let (pool, log) = open_writer(database_url).await;
    let mut expected = Vec::new();
    for (path, steps) in [(0, 8), (1, 7)] {
        for prefix in 0..steps {
            // The rejected path records its decision in its third step; interrupted before it,
            // the transaction takes the approval the test sends after the restart.
            let outcome = if path == 1 && prefix >= 3 {
                "REJECTED"
            } else {
                "CONFIRMED"
            };
            let steps = if path == 0 {
                approved_path
            } else {
                rejected_path
            };
            let id = write_transfer_prefix(&log, (source, destination), 100, steps, prefix).await;
            expected.push((id.as_uuid(), outcome));
        }
    }
    pool.close().await;
    expected
}

#[tokio::test]
async fn a_saga_killed_between_any_two_steps_finishes_every_transaction_on_restart() {
    // Proves recovery: transactions interrupted after every possible prefix of both the approved
    // and the rejected path are finished by a restarted saga — once from the log (checkpoint
    // behind) and once from its in-flight table alone (checkpoint already past them).
    for checkpoint_past_them in [false, true] {
        let mut harness = Harness::start().await;
        let (_, alice) = harness.customer();
        let (_, bob) = harness.customer();
        let source = harness.open_account(&alice, "USD").await;
        let destination = harness.open_account(&bob, "USD").await;
        harness.fund(source, "100.00", "USD").await;
        harness.app.kill().await;

        let url = harness.app.database_url.clone();
        let interrupted =
            write_interrupted_transactions(&url, AccountId(source), AccountId(destination)).await;
        if checkpoint_past_them {
            let pool = infra::db::connect(&url, "command_api", 2, "test")
                .await
                .expect("connects");
            sqlx::query(
                "INSERT INTO follower_checkpoints (name, tx_id, position) \
                 SELECT 'saga', tx_id::text::bigint, position FROM events ORDER BY tx_id DESC, position DESC LIMIT 1 \
                 ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position",
            )
            .execute(&pool)
            .await
            .expect("moving the checkpoint");
            let ids: Vec<Uuid> = interrupted.iter().map(|(id, _)| *id).collect();
            sqlx::query("INSERT INTO saga_inflight (transaction_id, due_at) SELECT unnest($1::uuid[]), now() + interval '1 hour'")
                .bind(&ids)
                .execute(&pool)
                .await
                .expect("recording in-flight transactions");
            pool.close().await;
        }

        let options = TestOptions {
            amqp_prefix: harness.amqp_prefix.clone(),
            ..TestOptions::default()
        };
        harness.app = spawn_app(&url, &options).await.expect("restarts");
        let ids: Vec<Uuid> = interrupted.iter().map(|(id, _)| *id).collect();
        // Transactions interrupted before their decision was recorded get one now; the rest
        // ignore it as a duplicate.
        for id in &ids {
            harness.decide(*id, FraudOutcome::Approved).await;
        }
        harness.wait_settled(&ids).await;
        for (id, expected) in &interrupted {
            assert_eq!(harness.outcome(*id).await.0, *expected, "transaction {id}");
        }
        let report = harness.assert_invariants().await;
        let confirmed = interrupted
            .iter()
            .filter(|(_, outcome)| *outcome == "CONFIRMED")
            .count();
        assert_eq!(
            confirmed,
            8 + 3,
            "every approved prefix, and the rejected path before its decision"
        );
        assert_eq!(
            report.transactions_confirmed,
            1 + confirmed,
            "plus the funding deposit"
        );
        let moved = 100 * i64::try_from(confirmed).expect("small");
        assert_eq!(
            balance_of(&report, source),
            (10_000 - moved, 10_000 - moved)
        );
        assert_eq!(balance_of(&report, destination), (moved, moved));
        harness.finish().await;
    }
}

#[tokio::test]
async fn two_instances_share_one_saga() {
    // Proves one active runner: with two command-api instances on one database, transactions
    // still settle exactly once, and stopping the leader hands the saga to the other.
    let mut first = Harness::start().await;
    let options = TestOptions {
        amqp_prefix: first.amqp_prefix.clone(),
        ..TestOptions::default()
    };
    let second_app = spawn_app(&first.app.database_url, &options)
        .await
        .expect("starts");
    let (_, alice) = first.customer();
    let account = first.open_account(&alice, "GBP").await;
    first.fund(account, "10.00", "GBP").await;
    first.app.stop().await;
    let old = std::mem::replace(&mut first.app, second_app);
    drop(old);
    first.fund(account, "5.00", "GBP").await;
    let report = first.assert_invariants().await;
    assert_eq!(balance_of(&report, account), (1_500, 1_500));
    first.finish().await;
}

#[tokio::test]
async fn a_settlement_is_never_decided_on_a_cached_account_that_has_not_seen_its_hold() {
    // Proves "already done" is believed only from the log: the saga's cache holds the source as
    // it was before another writer (an earlier leader) placed the transfer's hold. Settling on
    // that state finds no hold; believing it would record the settlement with the debit never
    // written — the destination credited, the source still holding, money created. The saga
    // must read the source from the log, settle the hold, and only then complete.
    let mut harness = Harness::start().await;
    let (_, source, destination) = harness.payer_and_payee().await;
    harness.fund(source, "100.00", "USD").await;
    harness.app.kill().await;

    let (pool, log) = open_writer(&harness.app.database_url).await;
    let accounts = Arc::new(AggregateStore::<AccountAggregate>::new(log.clone()));
    let transactions = Arc::new(AggregateStore::<TransactionAggregate>::new(log.clone()));
    let (_, cached_version) = accounts
        .load(&source.to_string())
        .await
        .expect("the saga's cache holds the funded source");

    // Another writer carries a transfer up to its confirmation: the hold is in the log, not in
    // the saga's cache.
    let accounts_pair = (AccountId(source), AccountId(destination));
    let id = write_transfer_prefix(&log, accounts_pair, 2_500, approved_path, 5).await;
    let (_, cached_after) = accounts.load(&source.to_string()).await.expect("loads");
    assert_eq!(
        cached_after, cached_version,
        "the saga's cache still holds the source before the hold"
    );

    let saga = command_api::saga::Saga::new(
        accounts,
        transactions,
        log,
        Arc::new(command_api::state::PgFollowerState::new(pool.clone())),
        command_api::saga::SagaSettings {
            batch_size: 16,
            concurrency: 4,
            decision_timeout: chrono::TimeDelta::seconds(30),
        },
    );
    let results = saga
        .advance_all(vec![Work {
            transaction_id: id,
            correlation_id: "stale".to_owned(),
            cause: "test".to_owned(),
        }])
        .await;
    assert!(
        matches!(results[..], [(_, Ok(command_api::saga::Progress::Done))]),
        "{results:?}"
    );
    let report = command_api::replay::audit(&pool, "command_api.events")
        .await
        .expect("audits");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(report.in_flight.is_empty(), "{:?}", report.in_flight);
    assert_eq!(balance_of(&report, source), (7_500, 7_500));
    assert_eq!(balance_of(&report, destination), (2_500, 2_500));
    pool.close().await;
    harness.finish().await;
}
