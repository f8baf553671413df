//! The aggregate store: snapshot and cache loads equal a full replay, and concurrent writers on
//! one stream (two instances) lose no update.

use std::sync::Arc;

use chrono::Utc;
use command_api::aggregates::AccountAggregate;
use command_api::store::{AggregateStore, Executed, SNAPSHOT_EVERY};
use domain::{
    AccountCommand, AccountError, AccountId, Amount, Currency, CustomerId, TransactionId,
};
use infra::eventlog::AppendOutcome;
use uuid::Uuid;

use crate::support::{Gated, Harness, gate};

async fn open(store: &AggregateStore<AccountAggregate>, id: AccountId) {
    let command = AccountCommand::Open {
        account_id: id,
        owner_id: CustomerId(Uuid::new_v4()),
        currency: Currency::from_code("USD").expect("known"),
        name: None,
        at: Utc::now(),
    };
    let outcome = store
        .execute(&id.to_string(), command, &metadata(&format!("open/{id}")))
        .await
        .expect("stored");
    assert!(matches!(outcome, Executed::Appended { .. }), "{outcome:?}");
}

fn metadata(command_id: &str) -> infra::eventlog::EventMetadata {
    command_api::metadata::for_saga("t", "t", command_id.to_owned())
}

async fn credit(store: &AggregateStore<AccountAggregate>, id: AccountId, minor: i64) {
    let transaction_id = TransactionId(Uuid::new_v4());
    let amount = Amount::from_minor(minor).expect("positive");
    for command in [
        AccountCommand::ReserveCredit {
            transaction_id,
            amount,
            at: Utc::now(),
        },
        AccountCommand::PostCredit {
            transaction_id,
            at: Utc::now(),
        },
    ] {
        let outcome = store
            .execute(
                &id.to_string(),
                command,
                &metadata(&Uuid::new_v4().to_string()),
            )
            .await
            .expect("stored");
        assert!(matches!(outcome, Executed::Appended { .. }), "{outcome:?}");
    }
}

#[tokio::test]
async fn snapshot_and_cache_loads_equal_a_full_replay() {
    // Proves the shortcuts are only shortcuts: an account with 251 events loads identically
    // through the cache, through its snapshot (taken at 200), and by replaying every event; a
    // snapshot in an unknown format is ignored.
    let harness = Harness::start().await;
    let pool = harness.app.pool.clone();
    let log = harness.writer_log().await;
    let writer = AggregateStore::<AccountAggregate>::new(log.clone());
    let id = AccountId(Uuid::new_v4());
    open(&writer, id).await;
    for index in 0..125 {
        credit(&writer, id, 100 + index).await;
    }
    let (cached, cached_version) = writer.load(&id.to_string()).await.expect("loads");
    let (snapshotted, snapshot_version) =
        AggregateStore::<AccountAggregate>::snapshots_only(log.clone())
            .load(&id.to_string())
            .await
            .expect("loads");
    let (replayed, replayed_version) = AggregateStore::<AccountAggregate>::full_replay(log.clone())
        .load(&id.to_string())
        .await
        .expect("loads");
    assert_eq!(replayed_version, 251);
    assert_eq!((&cached, cached_version), (&replayed, replayed_version));
    assert_eq!(
        (&snapshotted, snapshot_version),
        (&replayed, replayed_version)
    );
    let expected_balance: i64 = (0..125).map(|index| 100 + index).sum();
    assert_eq!(
        replayed.0.as_ref().map(|account| account.balance_minor),
        Some(expected_balance)
    );

    let snapshot_sequence: i64 = sqlx::query_scalar(
        "SELECT sequence FROM aggregate_snapshots WHERE aggregate_type = 'account' AND aggregate_id = $1",
    )
    .bind(id.to_string())
    .fetch_one(&pool)
    .await
    .expect("a snapshot was written");
    assert_eq!(
        snapshot_sequence,
        i64::try_from(2 * SNAPSHOT_EVERY).expect("small")
    );

    sqlx::query(
        "UPDATE aggregate_snapshots SET state_version = 999, state = '{\"garbage\": true}'",
    )
    .execute(&pool)
    .await
    .expect("corrupting the snapshot");
    let (ignored, ignored_version) =
        AggregateStore::<AccountAggregate>::snapshots_only(log.clone())
            .load(&id.to_string())
            .await
            .expect("loads despite the unknown snapshot");
    assert_eq!((&ignored, ignored_version), (&replayed, replayed_version));
    harness.finish().await;
}

#[tokio::test]
async fn two_instances_holding_on_one_account_lose_no_update() {
    // Proves optimistic concurrency with retry: two stores with their own caches (two instances)
    // place 25 holds of 10 each, concurrently, on an account holding 300: exactly 30 succeed,
    // the rest are refused for lack of funds, and the held total is exact.
    let harness = Harness::start().await;
    let first = Arc::new(AggregateStore::<AccountAggregate>::new(
        harness.writer_log().await,
    ));
    let second = Arc::new(AggregateStore::<AccountAggregate>::new(
        harness.writer_log().await,
    ));
    let id = AccountId(Uuid::new_v4());
    open(&first, id).await;
    credit(&first, id, 300).await;
    let attempts = (0..50).map(|index| {
        let store = if index % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        async move {
            let command = AccountCommand::PlaceHold {
                transaction_id: TransactionId(Uuid::new_v4()),
                amount: Amount::from_minor(10).expect("positive"),
                at: Utc::now(),
            };
            store
                .execute(
                    &id.to_string(),
                    command,
                    &metadata(&format!("hold/{index}")),
                )
                .await
                .expect("no infrastructure failure, conflicts are retried")
        }
    });
    let results = futures::future::join_all(attempts).await;
    let held = results
        .iter()
        .filter(|result| matches!(result, Executed::Appended { .. }))
        .count();
    let refused = results
        .iter()
        .filter(|result| {
            matches!(
                result,
                Executed::Refused(AccountError::InsufficientFunds { .. })
            )
        })
        .count();
    assert_eq!((held, refused), (30, 20));
    let (state, _) = AggregateStore::<AccountAggregate>::full_replay(first.log().clone())
        .load(&id.to_string())
        .await
        .expect("loads");
    let account = state.0.expect("opened");
    assert_eq!((account.held_minor, account.available_minor()), (300, 0));
    harness.finish().await;
}

/// An account opened past `log`'s gates (its count too), and a store reading and writing
/// through them.
async fn opened_behind(log: &Arc<Gated>) -> (AccountId, Arc<AggregateStore<AccountAggregate>>) {
    let id = AccountId(Uuid::new_v4());
    open(
        &AggregateStore::<AccountAggregate>::full_replay(log.inner.clone()),
        id,
    )
    .await;
    let log: Arc<dyn infra::eventlog::EventLog> = log.clone();
    (id, Arc::new(AggregateStore::<AccountAggregate>::new(log)))
}

#[tokio::test]
async fn a_load_that_finishes_late_never_takes_the_cache_back_to_an_older_state() {
    // Proves the cache only moves forward: a load that read the stream before an append of the
    // same process, and finishes after it, must not replace the newer cached state. (It did: an
    // HTTP request's account load raced the saga's hold, the saga then settled on the older state,
    // found no hold, believed "already settled", and the debit was never written.)
    let harness = Harness::start().await;
    let (read, was_read, release) = gate();
    let log = Arc::new(Gated {
        read,
        ..Gated::new(harness.writer_log().await)
    });
    let (id, store) = opened_behind(&log).await;
    let late = tokio::spawn({
        let store = store.clone();
        async move { store.load(&id.to_string()).await.expect("loads").1 }
    });
    was_read.await.expect("the late load read the stream");
    credit(&store, id, 500).await;
    let _ = release.send(());
    assert_eq!(
        late.await.expect("no panic"),
        1,
        "it read the opened account"
    );

    let (state, version) = store.load(&id.to_string()).await.expect("loads");
    assert_eq!(
        version, 3,
        "the cache holds the credit written after the late read"
    );
    assert_eq!(
        state.0.map(|account| account.balance_minor),
        Some(500),
        "and its state"
    );
    harness.finish().await;
}

#[tokio::test]
async fn a_command_waits_for_an_append_in_flight_on_its_stream_instead_of_conflicting() {
    // Proves decision 56: while this process has an append to a stream in flight (the saga's,
    // here through `append_all`), a command on that stream waits for its outcome and decides on
    // the state after it: one append each, none conflicting. Without the wait, the command
    // decides on the state before, writes first, and the append in flight conflicts.
    let harness = Harness::start().await;
    let (append, was_appending, go_on) = gate();
    let log = Arc::new(Gated {
        append,
        ..Gated::new(harness.writer_log().await)
    });
    let (id, store) = opened_behind(&log).await;
    let (opened, version) = store.load(&id.to_string()).await.expect("loads");
    let reserve = |minor: i64| AccountCommand::ReserveCredit {
        transaction_id: TransactionId(Uuid::new_v4()),
        amount: Amount::from_minor(minor).expect("positive"),
        at: Utc::now(),
    };
    let (state_after, events) = AggregateStore::<AccountAggregate>::decide(&opened, reserve(100))
        .await
        .expect("decided");
    let in_flight = tokio::spawn({
        let store = store.clone();
        let pending = command_api::store::Pending {
            id: id.to_string(),
            expected_version: version,
            state_after,
            decisions: vec![(events, metadata("in-flight"))],
        };
        async move { store.append_all(vec![pending]).await.expect("answered") }
    });
    was_appending.await.expect("the append is in flight");
    let command = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .execute(&id.to_string(), reserve(200), &metadata("command"))
                .await
                .expect("stored")
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !command.is_finished(),
        "the command decided while an append to its stream was in flight"
    );
    let _ = go_on.send(());
    let outcomes = in_flight.await.expect("no panic");
    assert!(
        matches!(outcomes[..], [AppendOutcome::Appended { version: 2, .. }]),
        "{outcomes:?}"
    );
    let executed = command.await.expect("no panic");
    assert!(
        matches!(executed, Executed::Appended { version: 3, .. }),
        "{executed:?}"
    );
    assert_eq!(
        log.appends.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one append each, none written again after a conflict"
    );
    harness.finish().await;
}
