//! The transaction cache's conformance suite: the rules every [`TransactionCache`] keeps
//! (Redis, memory). Each check takes a fresh, empty cache and panics with what it found.
//!
//! An implementation's tests instantiate the whole suite with
//! [`cache_conformance!`](crate::cache_conformance), giving it an async function that opens a
//! fresh cache with a TTL in seconds and the value to keep alive (and clean up) while it is used:
//!
//! ```ignore
//! projector::cache_conformance!(fresh_redis_cache);
//! ```

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use super::{Cache, Lookup};
use crate::model::transactions::TransactionRecord;

/// The TTL of the caches the checks open, but the expiry check's.
pub const TTL_SECONDS: u64 = 60;

/// Instantiates every check as a `#[tokio::test]` on a cache from `$fresh`, an
/// `async fn(ttl_seconds: u64) -> (Arc<projector::cache::Cache>, G)` where `G` is dropped after
/// the check.
#[macro_export]
macro_rules! cache_conformance {
    ($fresh:path) => {
        $crate::cache_conformance!(@checks $fresh;
            a_write_is_a_hit_and_an_unknown_id_a_miss,
            an_older_version_never_overwrites_a_newer_one,
            a_newer_version_replaces_the_entry,
            racing_writers_leave_the_newest_version,
            a_large_batch_guards_each_entry_on_its_own,
            a_flush_empties_the_cache,
            the_cache_answers_its_health_check
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn entries_expire_after_the_ttl() {
            let (cache, _keep) = $fresh(1).await;
            $crate::cache::conformance::entries_expire_after_the_ttl(cache).await;
        }
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (cache, _keep) = $fresh($crate::cache::conformance::TTL_SECONDS).await;
                $crate::cache::conformance::$check(cache).await;
            }
        )*
    };
}

/// A transaction row at `version` with `status`.
pub fn record(id: Uuid, status: &str, version: i64) -> TransactionRecord {
    let now = Utc::now();
    TransactionRecord {
        id,
        kind: "transfer".to_owned(),
        status: status.to_owned(),
        amount_minor: 700,
        currency: "USD".to_owned(),
        source_account_id: Some(Uuid::new_v4()),
        destination_account_id: Some(Uuid::new_v4()),
        source_owner_id: Some(Uuid::new_v4()),
        destination_owner_id: Some(Uuid::new_v4()),
        description: Some("rent".to_owned()),
        reason: None,
        fraud: None,
        initiated_by: Uuid::new_v4(),
        version,
        created_at: now,
        updated_at: now,
        created_position: 1,
    }
}

/// The cached row of `id`; panics if the cache did not answer.
async fn cached(cache: &Cache, id: Uuid) -> Option<TransactionRecord> {
    match cache.get(id).await {
        Lookup::Hit(record) => Some(*record),
        Lookup::Miss => None,
        Lookup::Unavailable => panic!("the cache did not answer"),
    }
}

/// A written row reads back whole (owners included: authorization is checked on a hit); an id
/// nobody wrote is a miss.
pub async fn a_write_is_a_hit_and_an_unknown_id_a_miss(cache: Arc<Cache>) {
    assert_eq!(cached(&*cache, Uuid::new_v4()).await, None);
    let written = record(Uuid::new_v4(), "PENDING", 1);
    cache.put_all([&written]).await;
    assert_eq!(cached(&*cache, written.id).await.as_ref(), Some(&written));
    let refilled = record(Uuid::new_v4(), "CONFIRMED", 4);
    cache.refill(&refilled).await;
    assert_eq!(cached(&*cache, refilled.id).await.as_ref(), Some(&refilled));
}

/// The version guard: a refill that read an older row, or a late older write, never replaces a
/// newer entry, so a cached PENDING never hides a CONFIRMED.
pub async fn an_older_version_never_overwrites_a_newer_one(cache: Arc<Cache>) {
    let id = Uuid::new_v4();
    let confirmed = record(id, "CONFIRMED", 5);
    cache.put_all([&confirmed]).await;
    cache.refill(&record(id, "PENDING", 3)).await;
    assert_eq!(
        cached(&*cache, id).await.map(|found| found.status),
        Some("CONFIRMED".to_owned()),
        "a refill of an older row replaced a newer entry"
    );
    cache.put_all([&record(id, "PENDING", 4)]).await;
    assert_eq!(cached(&*cache, id).await.as_ref(), Some(&confirmed));
}

/// A newer version replaces the entry; the same version may be written again (a projector batch
/// retried after a failure writes the same rows).
pub async fn a_newer_version_replaces_the_entry(cache: Arc<Cache>) {
    let id = Uuid::new_v4();
    cache.refill(&record(id, "PENDING", 1)).await;
    let confirmed = record(id, "CONFIRMED", 3);
    cache.put_all([&confirmed]).await;
    assert_eq!(cached(&*cache, id).await.as_ref(), Some(&confirmed));
    let rewritten = record(id, "CONFIRMED", 3);
    cache.put_all([&rewritten]).await;
    assert_eq!(cached(&*cache, id).await.as_ref(), Some(&rewritten));
}

/// Writers of one entry racing in any order leave the newest version: the guard and the write
/// are one step.
pub async fn racing_writers_leave_the_newest_version(cache: Arc<Cache>) {
    const VERSIONS: i64 = 24;
    let id = Uuid::new_v4();
    // Newest first and oldest last, interleaved with refills: the worst order for a
    // read-then-write guard.
    let writers = (1..=VERSIONS).rev().map(|version| {
        let cache = cache.clone();
        tokio::spawn(async move {
            let row = record(
                id,
                if version == VERSIONS {
                    "CONFIRMED"
                } else {
                    "PENDING"
                },
                version,
            );
            if version % 2 == 0 {
                cache.put_all([&row]).await;
            } else {
                cache.refill(&row).await;
            }
        })
    });
    for writer in futures::future::join_all(writers).await {
        writer.expect("a writer finished");
    }
    let found = cached(&*cache, id).await.expect("an entry");
    assert_eq!(
        (found.version, found.status.as_str()),
        (VERSIONS, "CONFIRMED")
    );
}

/// A batch of many rows (more than one call's worth in Redis) writes every row whose entry is
/// not newer and leaves each newer entry alone: the version guard is per entry, not per batch.
pub async fn a_large_batch_guards_each_entry_on_its_own(cache: Arc<Cache>) {
    const ROWS: usize = 300;
    let ids: Vec<Uuid> = (0..ROWS).map(|_| Uuid::new_v4()).collect();
    // Every third entry already holds a newer version, every fifth the same one.
    let newer: Vec<TransactionRecord> = ids
        .iter()
        .step_by(3)
        .map(|id| record(*id, "CONFIRMED", 5))
        .collect();
    cache.put_all(&newer).await;
    let same: Vec<TransactionRecord> = ids
        .iter()
        .enumerate()
        .filter(|(index, _)| index % 5 == 0 && index % 3 != 0)
        .map(|(_, id)| record(*id, "REJECTED", 3))
        .collect();
    cache.put_all(&same).await;
    let batch: Vec<TransactionRecord> = ids.iter().map(|id| record(*id, "PENDING", 3)).collect();
    cache.put_all(&batch).await;
    for (index, written) in batch.iter().enumerate() {
        let found = cached(&*cache, written.id)
            .await
            .unwrap_or_else(|| panic!("row {index} of the batch is missing"));
        if index % 3 == 0 {
            assert_eq!(
                (found.version, found.status.as_str()),
                (5, "CONFIRMED"),
                "row {index}: the batch replaced a newer entry"
            );
        } else {
            assert_eq!(&found, written, "row {index}: the batch did not write it");
        }
    }
}

/// A flush deletes every entry and says how many there were.
pub async fn a_flush_empties_the_cache(cache: Arc<Cache>) {
    let rows: Vec<TransactionRecord> = (1..=3)
        .map(|version| record(Uuid::new_v4(), "PENDING", version))
        .collect();
    cache.put_all(&rows).await;
    for row in &rows {
        assert!(cached(&*cache, row.id).await.is_some(), "written");
    }
    assert_eq!(cache.flush().await.expect("the cache flushes"), 3);
    for row in &rows {
        assert_eq!(cached(&*cache, row.id).await, None, "flushed");
    }
    assert_eq!(cache.flush().await.expect("an empty cache flushes"), 0);
}

/// An entry is gone once its TTL (one second here) has passed since its last write.
pub async fn entries_expire_after_the_ttl(cache: Arc<Cache>) {
    let row = record(Uuid::new_v4(), "PENDING", 1);
    cache.put_all([&row]).await;
    assert!(cached(&*cache, row.id).await.is_some(), "written");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cached(&*cache, row.id).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an entry outlived its TTL of one second by four"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/health` sees a reachable cache as up.
pub async fn the_cache_answers_its_health_check(cache: Arc<Cache>) {
    assert!(cache.ping().await);
}
