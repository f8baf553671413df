//! The velocity counters' conformance suite (`fraud_worker::velocity_conformance!`) against both
//! implementations: Redis (a key prefix of its own per test, deleted after) and SQLite (a
//! temporary directory).

use std::sync::Arc;

use fraud_worker::velocity::{RedisCounters, SqliteCounters, VelocityCounters};
use uuid::Uuid;

mod on_redis {
    use super::*;

    /// Deletes the test's keys when the check ends, passed or not.
    struct Cleanup(String);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let prefix = self.0.clone();
            infra::tasks::block_on_own_runtime(async move {
                let _ = fraud_worker::testing::delete_redis_keys(&prefix).await;
            });
        }
    }

    async fn fresh() -> (Arc<dyn VelocityCounters>, Cleanup) {
        let prefix = format!("test:counters:{}", Uuid::new_v4().simple());
        let counters = RedisCounters::new(&fraud_worker::testing::redis_url(), &prefix)
            .expect("a Redis client");
        (Arc::new(counters), Cleanup(prefix))
    }

    fraud_worker::velocity_conformance!(fresh);
}

mod on_sqlite {
    use super::*;

    async fn fresh() -> (Arc<dyn VelocityCounters>, tempfile::TempDir) {
        let (pool, directory) = super::scratch_sqlite().await;
        let counters = SqliteCounters::open(pool).await.expect("migrates");
        (Arc::new(counters), directory)
    }

    fraud_worker::velocity_conformance!(fresh);
}

/// A directory whose counters were written before the running totals existed (migration 1
/// only) keeps its windows: migration 2 fills each account's total from its entries.
#[tokio::test]
async fn the_totals_migration_keeps_the_windows_already_counted() {
    use chrono::Utc;
    use domain::{AccountId, TransactionId};
    use fraud_worker::velocity::Payment;
    use fraud_worker::velocity::sqlite::MIGRATIONS;

    let (pool, _directory) = scratch_sqlite().await;
    infra::sqlite::migrate(&pool, "fraud_velocity", &MIGRATIONS[..1])
        .await
        .expect("the first migration applies");
    let (account, now) = (AccountId(Uuid::new_v4()), Utc::now());
    for amount in [300_i64, 450] {
        sqlx::query(
            "INSERT INTO velocity_entries (account_id, transaction_id, amount_minor, created_ms) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(account.to_string())
        .bind(Uuid::new_v4().to_string())
        .bind(amount)
        .bind(now.timestamp_millis())
        .execute(&pool)
        .await
        .expect("an entry of the old schema");
    }
    let counters = SqliteCounters::open(pool)
        .await
        .expect("migrates to the totals");
    let payment = Payment {
        account_id: account,
        transaction_id: TransactionId(Uuid::new_v4()),
        amount_minor: 50,
        created_at: now,
    };
    let total = counters
        .record(&payment, 600_000, 10_000)
        .await
        .expect("counts");
    assert_eq!(
        total, 800,
        "the entries counted before the upgrade are in the total"
    );
}

/// Counts that fail on their own (each would overflow the window's total), however they fall
/// into the writer's batches, are each answered with the overflow, not with an error of their
/// batch, and nothing of them is kept: the writer's reruns without the failed counts (down to
/// none left) keep each count's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_every_count_overflows_answers_each_with_the_overflow() {
    use chrono::Utc;
    use domain::{AccountId, TransactionId};
    use fraud_worker::Error;
    use fraud_worker::velocity::Payment;

    let (pool, _directory) = scratch_sqlite().await;
    let counters = Arc::new(SqliteCounters::open(pool).await.expect("migrates"));
    let (account, now) = (AccountId(Uuid::new_v4()), Utc::now());
    let payment = |amount_minor| Payment {
        account_id: account,
        transaction_id: TransactionId(Uuid::new_v4()),
        amount_minor,
        created_at: now,
    };
    let big = i64::MAX - 10;
    assert_eq!(
        counters
            .record(&payment(big), 600_000, i64::MAX)
            .await
            .expect("counts"),
        big
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let counters = counters.clone();
        let overflowing = payment(100);
        tasks.spawn(async move { counters.record(&overflowing, 600_000, i64::MAX).await });
    }
    while let Some(answer) = tasks.join_next().await {
        let answer = answer.expect("the task ran");
        assert!(
            matches!(answer, Err(Error::Overflow)),
            "each overflowing count is answered with the overflow, got {answer:?}"
        );
    }
    assert_eq!(
        counters
            .record(&payment(0), 600_000, i64::MAX)
            .await
            .expect("counts"),
        big,
        "nothing of the failed counts was kept"
    );
}

/// A pool on a SQLite file of its own, in a directory deleted when the second half is dropped.
async fn scratch_sqlite() -> (sqlx::SqlitePool, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("ledger.sqlite");
    let pool = infra::sqlite::pool(infra::sqlite::options(&path, true), 4)
        .await
        .expect("opens");
    (pool, directory)
}
