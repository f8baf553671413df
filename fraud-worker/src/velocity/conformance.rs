//! The velocity counters' conformance suite: one set of checks every implementation passes
//! (Redis, SQLite). Each check takes fresh, empty counters and panics with what it found.
//!
//! ```ignore
//! fraud_worker::velocity_conformance!(fresh_redis_counters);
//! ```

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use domain::{AccountId, TransactionId};
use uuid::Uuid;

use super::{Payment, VelocityCounters};

/// Instantiates every check as a `#[tokio::test]`, each on counters from `$fresh`, an
/// `async fn() -> (Arc<dyn VelocityCounters>, G)` where `G` is dropped after the check.
#[macro_export]
macro_rules! velocity_conformance {
    ($fresh:path) => {
        $crate::velocity_conformance!(@checks $fresh;
            a_payment_counts_once_however_often_it_is_recorded,
            a_payment_over_the_limit_is_taken_back_out,
            reaching_the_limit_exactly_is_allowed,
            payments_leave_the_window,
            accounts_have_windows_of_their_own,
            an_overflowing_total_is_an_error,
            concurrent_payments_never_exceed_the_limit_together,
            a_failing_count_fails_alone
        );
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (counters, _keep) = $fresh().await;
                $crate::velocity::conformance::$check(counters).await;
            }
        )*
    };
}

/// Ten minutes.
const WINDOW_MS: i64 = 600_000;

fn account() -> AccountId {
    AccountId(Uuid::new_v4())
}

fn payment(account_id: AccountId, amount_minor: i64, created_at: DateTime<Utc>) -> Payment {
    Payment {
        account_id,
        transaction_id: TransactionId(Uuid::new_v4()),
        amount_minor,
        created_at,
    }
}

async fn record(counters: &dyn VelocityCounters, payment: &Payment, limit_minor: i64) -> i64 {
    counters
        .record(payment, WINDOW_MS, limit_minor)
        .await
        .expect("the counters answer")
}

pub async fn a_payment_counts_once_however_often_it_is_recorded(
    counters: Arc<dyn VelocityCounters>,
) {
    let (account, now) = (account(), Utc::now());
    let first = payment(account, 100, now);
    assert_eq!(record(&*counters, &first, 1_000).await, 100);
    assert_eq!(record(&*counters, &first, 1_000).await, 100, "counted once");
    let second = payment(account, 250, now);
    assert_eq!(record(&*counters, &second, 1_000).await, 350);
    assert_eq!(record(&*counters, &first, 1_000).await, 350, "still once");
    assert!(counters.ping().await, "the store answers");
}

pub async fn a_payment_over_the_limit_is_taken_back_out(counters: Arc<dyn VelocityCounters>) {
    let (account, now) = (account(), Utc::now());
    assert_eq!(
        record(&*counters, &payment(account, 100, now), 250).await,
        100
    );
    let over = payment(account, 200, now);
    assert_eq!(
        record(&*counters, &over, 250).await,
        300,
        "the total includes the payment being decided"
    );
    assert_eq!(
        record(&*counters, &over, 250).await,
        300,
        "a rejected payment recorded again is rejected again"
    );
    assert_eq!(
        record(&*counters, &payment(account, 100, now), 250).await,
        200,
        "the rejected payment does not use up the allowance"
    );
}

pub async fn reaching_the_limit_exactly_is_allowed(counters: Arc<dyn VelocityCounters>) {
    let (account, now) = (account(), Utc::now());
    assert_eq!(
        record(&*counters, &payment(account, 100, now), 300).await,
        100
    );
    assert_eq!(
        record(&*counters, &payment(account, 200, now), 300).await,
        300
    );
    assert_eq!(
        record(&*counters, &payment(account, 1, now), 300).await,
        301
    );
    assert_eq!(
        record(&*counters, &payment(account, 0, now), 300).await,
        300,
        "the payment at the limit stayed counted"
    );
}

pub async fn payments_leave_the_window(counters: Arc<dyn VelocityCounters>) {
    let (account, start) = (account(), Utc::now() - TimeDelta::minutes(30));
    assert_eq!(
        record(&*counters, &payment(account, 100, start), 1_000).await,
        100
    );
    let inside = start + TimeDelta::milliseconds(WINDOW_MS - 1);
    assert_eq!(
        record(&*counters, &payment(account, 10, inside), 1_000).await,
        110
    );
    let edge = start + TimeDelta::milliseconds(WINDOW_MS);
    assert_eq!(
        record(&*counters, &payment(account, 1, edge), 1_000).await,
        11,
        "a payment exactly one window old has left it"
    );
    let later = start + TimeDelta::milliseconds(3 * WINDOW_MS);
    assert_eq!(
        record(&*counters, &payment(account, 5, later), 1_000).await,
        5
    );
}

pub async fn accounts_have_windows_of_their_own(counters: Arc<dyn VelocityCounters>) {
    let now = Utc::now();
    let (one, other) = (account(), account());
    assert_eq!(
        record(&*counters, &payment(one, 400, now), 1_000).await,
        400
    );
    assert_eq!(
        record(&*counters, &payment(other, 30, now), 1_000).await,
        30
    );
    assert_eq!(record(&*counters, &payment(one, 1, now), 1_000).await, 401);
}

pub async fn an_overflowing_total_is_an_error(counters: Arc<dyn VelocityCounters>) {
    let (account, now) = (account(), Utc::now());
    let big = i64::MAX - 10;
    assert_eq!(
        record(&*counters, &payment(account, big, now), i64::MAX).await,
        big
    );
    let overflow = counters
        .record(&payment(account, 100, now), WINDOW_MS, i64::MAX)
        .await;
    assert!(
        overflow.is_err(),
        "a total past i64 is an error, not a wrapped number: {overflow:?}"
    );
}

pub async fn concurrent_payments_never_exceed_the_limit_together(
    counters: Arc<dyn VelocityCounters>,
) {
    let (account, now) = (account(), Utc::now());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let counters = counters.clone();
        tasks.spawn(async move {
            counters
                .record(&payment(account, 100, now), WINDOW_MS, 1_000)
                .await
        });
    }
    let mut accepted = 0;
    while let Some(joined) = tasks.join_next().await {
        let total = joined.expect("no panic").expect("the counters answer");
        if total <= 1_000 {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 10, "exactly the allowance was accepted");
    assert_eq!(
        record(&*counters, &payment(account, 0, now), 1_000).await,
        1_000
    );
}

/// A count that fails (an overflow) fails only itself: the payments recorded at the same time,
/// which an implementation may commit together with it, are counted and answered.
pub async fn a_failing_count_fails_alone(counters: Arc<dyn VelocityCounters>) {
    let (full, now) = (account(), Utc::now());
    let big = i64::MAX - 10;
    record(&*counters, &payment(full, big, now), i64::MAX).await;
    let others: Vec<AccountId> = (0..8).map(|_| account()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let counters = counters.clone();
        tasks.spawn(async move {
            let failed = counters
                .record(&payment(full, 100, now), WINDOW_MS, i64::MAX)
                .await;
            (None, failed.is_err())
        });
    }
    for other in others.iter().copied() {
        let counters = counters.clone();
        tasks.spawn(async move {
            let counted = counters
                .record(&payment(other, 7, now), WINDOW_MS, 1_000)
                .await;
            (
                Some(counted.expect("a payment beside a failing one is counted")),
                false,
            )
        });
    }
    let mut overflows = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("no panic") {
            (Some(total), _) => assert_eq!(total, 7, "each other account counted its payment once"),
            (None, failed) => {
                assert!(failed, "a total past i64 is an error");
                overflows += 1;
            }
        }
    }
    assert_eq!(overflows, 4);
    assert_eq!(
        record(&*counters, &payment(full, 0, now), i64::MAX).await,
        big,
        "a failed count left nothing in its window"
    );
    for other in others {
        assert_eq!(
            record(&*counters, &payment(other, 0, now), 1_000).await,
            7,
            "the payment beside the failing ones was committed"
        );
    }
}
