//! The cache of `GET /api/v1/transactions/{id}` (SPEC §5): the conformance suite of the cache
//! seam against Redis and memory, and the memory cache's bound. Through the real services
//! (written through by the projector before each batch commits, refilled on a miss, authorized
//! on a hit, and optional): `system-tests/tests/read_side/cache.rs`.

use std::sync::Arc;
use std::time::Duration;

use projector::cache::{Cache, MemoryCache, RedisCache, TransactionCache};
use uuid::Uuid;

/// A Redis cache under a key prefix of its own, flushed when dropped.
pub struct RedisKeys(Arc<RedisCache>);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let cache = self.0.clone();
        infra::tasks::block_on_own_runtime(async move {
            let _ = cache.flush().await;
        });
    }
}

async fn fresh_redis_cache(ttl_seconds: u64) -> (Arc<Cache>, RedisKeys) {
    let prefix = format!("test-cache-{}", Uuid::new_v4().simple());
    let cache = Arc::new(
        RedisCache::new(&projector::testing::redis_url(), &prefix, ttl_seconds)
            .expect("a Redis cache"),
    );
    (cache.clone(), RedisKeys(cache))
}

async fn fresh_memory_cache(ttl_seconds: u64) -> (Arc<Cache>, ()) {
    let cache = MemoryCache::new(1_000, Duration::from_secs(ttl_seconds));
    (Arc::new(cache), ())
}

mod redis {
    use super::fresh_redis_cache;
    projector::cache_conformance!(fresh_redis_cache);
}

mod memory {
    use super::fresh_memory_cache;
    projector::cache_conformance!(fresh_memory_cache);
}

#[tokio::test]
async fn the_memory_cache_stays_within_its_bound() {
    // Proves the in-process cache is bounded by entries: writing far more rows than it holds
    // leaves it at its bound, not at everything written.
    let cache = MemoryCache::new(100, Duration::from_secs(60));
    let rows: Vec<_> = (0..1_000)
        .map(|_| projector::cache::conformance::record(Uuid::new_v4(), "PENDING", 1))
        .collect();
    let records: Vec<_> = rows.iter().collect();
    cache.write_through(&records).await;
    let kept = cache.len();
    assert!(kept <= 100, "{kept} of 1000 rows kept by a cache of 100");
}
