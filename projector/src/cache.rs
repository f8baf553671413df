//! The cache of `GET /api/v1/transactions/{id}` (SPEC §5): TTL 60 s, written through by the
//! projector on every change with a version guard, refilled from the read model on a miss.
//!
//! [`TransactionCache`] is the seam (SPEC §10): [`RedisCache`] here for the services,
//! [`MemoryCache`] (`moka`, in-process, bounded) for `ledger serve`. Both keep the same rules,
//! checked by [`cache_conformance!`](crate::cache_conformance) against both: an entry is
//! written only if its stored version is not newer, so a refill that read an older row never
//! overwrites the projector's newer write and a cached PENDING never hides a CONFIRMED; entries
//! expire after the TTL; a flush empties the cache.
//!
//! ## Redis
//!
//! Each transaction is a hash `{prefix}:tx:{id}` with its stream version `v` and the row `b`
//! (JSON, owners included so that authorization is checked on a hit). One Lua script writes
//! entries, each only if its stored version is not newer: a batch's rows in one call (up to
//! [`WRITE_CHUNK`] of them, decision 72), a refill as a batch of one. The projector writes through
//! *before* its batch commits, so the cache is never behind the read model (it may be ahead by
//! one batch, which is the log's truth anyway).
//!
//! Redis is optional: every call has a short deadline, and after a failure the cache is skipped
//! for a second instead of being tried by every request (answers come from PostgreSQL,
//! `/health` says `degraded`). A write-through that fails leaves an entry that may be stale: its
//! key is remembered, lookups of it read PostgreSQL, and it is deleted before the next
//! write-through succeeds. Past [`STALE_KEYS_MAX`] remembered keys, every lookup reads
//! PostgreSQL until the whole cache has been flushed. The cache is written inside the batch's
//! transaction, so a hanging Redis holds that transaction (and the log's visibility horizon)
//! open for at most [`REDIS_TIMEOUT`] per batch.

#[cfg(feature = "testing")]
pub mod conformance;
mod memory;

pub use memory::{MEMORY_CACHE_ENTRIES, MemoryCache};

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::transactions::TransactionRecord;

/// How long one cache call may take. Redis answers in well under a millisecond.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// How long the cache is skipped after a failure.
const BACKOFF_MILLIS: i64 = 1_000;

/// Most keys remembered for deletion after failed writes; beyond it the cache is bypassed until
/// a full flush succeeds.
const STALE_KEYS_MAX: usize = 100_000;

/// How long the flush after an overflow may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows written by one call of [`WRITE_SCRIPT`] at most: Redis runs a script alone, so a call
/// is kept well under a millisecond (a row is three commands inside the script).
const WRITE_CHUNK: usize = 128;

/// KEYS: the entries. ARGV: ttl seconds, then version and body of each entry in `KEYS`' order.
/// Writes each entry whose stored version is not newer; returns how many it wrote.
const WRITE_SCRIPT: &str = r"
local ttl = ARGV[1]
local written = 0
for i, key in ipairs(KEYS) do
  local version = ARGV[2 * i]
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) <= tonumber(version) then
    redis.call('HSET', key, 'v', version, 'b', ARGV[2 * i + 1])
    redis.call('EXPIRE', key, ttl)
    written = written + 1
  end
end
return written
";

/// The transaction cache as the projector and the query API hold it: `Arc<Cache>` is an
/// `Arc<dyn TransactionCache>`.
pub type Cache = dyn TransactionCache;

/// The cache of single transactions (SPEC §5, §10): one implementation per mode, the same rules.
#[async_trait]
pub trait TransactionCache: Send + Sync {
    /// The cached row of `id`.
    async fn get(&self, id: Uuid) -> Lookup;

    /// Writes the rows a batch changed, each only if the stored version is not newer. Failures
    /// are the implementation's to remember, not the caller's: an entry that missed a write
    /// must never be served afterwards.
    async fn write_through(&self, records: &[&TransactionRecord]);

    /// Fills the entry of a row read from the read model after a miss (version guard too).
    async fn refill(&self, record: &TransactionRecord);

    /// Deletes every entry; returns how many there were (as far as the cache can tell).
    async fn flush(&self) -> Result<u64>;

    /// Whether the cache answers now (for `/health`).
    async fn ping(&self) -> bool;
}

impl dyn TransactionCache {
    /// [`TransactionCache::write_through`] of any iterator of rows (the projector's batches).
    pub async fn put_all<'a>(&self, records: impl IntoIterator<Item = &'a TransactionRecord>) {
        let records: Vec<&TransactionRecord> = records.into_iter().collect();
        if !records.is_empty() {
            self.write_through(&records).await;
        }
    }
}

/// The cache in Redis, shared by every projector and query instance.
pub struct RedisCache {
    redis: ConnectionManager,
    prefix: String,
    ttl_seconds: u64,
    write: Script,
    /// Unix milliseconds before which the cache is not tried.
    skip_until: AtomicI64,
    /// Keys whose write-through failed: deleted before the next write succeeds.
    stale: Mutex<HashSet<Uuid>>,
    /// More keys failed than `stale` holds: no entry can be trusted until a flush.
    overflowed: AtomicBool,
}

/// What a lookup found.
pub enum Lookup {
    Hit(Box<TransactionRecord>),
    Miss,
    /// Redis did not answer; the caller reads PostgreSQL.
    Unavailable,
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RedisCache {
    /// A cache on `url`; connects lazily, so a Redis that is down at start only degrades.
    pub fn new(url: &str, prefix: &str, ttl_seconds: u64) -> Result<RedisCache> {
        let client = redis::Client::open(url).map_err(|error| {
            Error::Infra(infra::Error::Config(format!(
                "REDIS_URL is not a valid Redis URL: {error}"
            )))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(0);
        let redis = ConnectionManager::new_lazy_with_config(client, config).map_err(|error| {
            Error::Infra(infra::Error::Config(format!(
                "cannot create the Redis connection manager: {error}"
            )))
        })?;
        Ok(RedisCache {
            redis,
            prefix: prefix.to_owned(),
            ttl_seconds,
            write: Script::new(WRITE_SCRIPT),
            skip_until: AtomicI64::new(0),
            stale: Mutex::new(HashSet::new()),
            overflowed: AtomicBool::new(false),
        })
    }

    pub fn key(&self, id: Uuid) -> String {
        format!("{}:tx:{id}", self.prefix)
    }

    fn skipping(&self) -> bool {
        now_millis() < self.skip_until.load(Ordering::Relaxed)
    }

    fn failed(&self, doing: &str, error: &dyn std::fmt::Display) {
        let first = !self.skipping();
        self.skip_until
            .store(now_millis() + BACKOFF_MILLIS, Ordering::Relaxed);
        metrics::counter!("cache_errors_total").increment(1);
        if first {
            tracing::warn!(error.message = %error, "Redis failed while {doing}; serving from PostgreSQL");
        }
    }

    async fn lookup(&self, id: Uuid) -> Lookup {
        if self.skipping() {
            return Lookup::Unavailable;
        }
        // An entry whose write-through failed is older than the read model until the next
        // batch deletes it (`forget_stale`): never serve it, however long that takes. The miss
        // refills it from PostgreSQL, which the version guard allows over the older entry.
        if self.is_stale(id) {
            return Lookup::Miss;
        }
        let mut redis = self.redis.clone();
        let answer = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("HGET")
                .arg(self.key(id))
                .arg("b")
                .query_async::<Option<String>>(&mut redis),
        )
        .await;
        match answer {
            Ok(Ok(Some(body))) => match serde_json::from_str::<TransactionRecord>(&body) {
                Ok(record) => Lookup::Hit(Box::new(record)),
                Err(error) => {
                    tracing::warn!(transaction_id = %id, error.message = %error, "unreadable cache entry; reading PostgreSQL");
                    Lookup::Miss
                }
            },
            Ok(Ok(None)) => Lookup::Miss,
            Ok(Err(error)) => {
                self.failed("reading", &error);
                Lookup::Unavailable
            }
            Err(_) => {
                self.failed("reading", &"timed out");
                Lookup::Unavailable
            }
        }
    }

    /// Writes rows with the version guard. Failures are remembered, not returned: the cache is
    /// optional, but an entry that missed a write must not survive, so its key is deleted as
    /// soon as Redis answers again.
    async fn write_rows(&self, records: &[&TransactionRecord]) {
        if records.is_empty() {
            return;
        }
        if self.skipping() || !self.forget_stale().await {
            self.remember_stale(records.iter().map(|record| record.id));
            return;
        }
        let chunks = records.chunks(WRITE_CHUNK);
        let results = futures::future::join_all(chunks.clone().map(|chunk| self.put(chunk))).await;
        let failed: Vec<Uuid> = chunks
            .zip(results)
            .filter(|(_, ok)| !ok)
            .flat_map(|(chunk, _)| chunk.iter().map(|record| record.id))
            .collect();
        if !failed.is_empty() {
            self.remember_stale(failed);
        }
    }

    /// Writes `records` (at most [`WRITE_CHUNK`]) in one call of the script; false if any may be
    /// missing.
    async fn put(&self, records: &[&TransactionRecord]) -> bool {
        let mut invocation = self.write.prepare_invoke();
        invocation.arg(self.ttl_seconds);
        for record in records {
            let body = match serde_json::to_string(record) {
                Ok(body) => body,
                Err(error) => {
                    tracing::error!(transaction_id = %record.id, error.message = %error, "cannot serialise a cache entry");
                    return false;
                }
            };
            invocation
                .key(self.key(record.id))
                .arg(record.version)
                .arg(body);
        }
        let mut redis = self.redis.clone();
        let written =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<i64>(&mut redis)).await;
        match written {
            Ok(Ok(_)) => true,
            Ok(Err(error)) => {
                self.failed("writing", &error);
                false
            }
            Err(_) => {
                self.failed("writing", &"timed out");
                false
            }
        }
    }

    fn is_stale(&self, id: Uuid) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            return true;
        }
        // A poisoned set may hold anything: assume the worst and read PostgreSQL.
        self.stale.lock().map_or(true, |stale| stale.contains(&id))
    }

    fn remember_stale(&self, ids: impl IntoIterator<Item = Uuid>) {
        let Ok(mut stale) = self.stale.lock() else {
            return;
        };
        for id in ids {
            if stale.len() >= STALE_KEYS_MAX {
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "too many cache entries missed updates; the cache is bypassed until it is flushed"
                    );
                }
                break;
            }
            stale.insert(id);
        }
    }

    /// Deletes the keys whose writes failed (the whole cache after an overflow); true when none
    /// is left.
    async fn forget_stale(&self) -> bool {
        if self.overflowed.load(Ordering::Relaxed) {
            match tokio::time::timeout(FLUSH_TIMEOUT, self.delete_all()).await {
                Ok(Ok(deleted)) => {
                    if let Ok(mut stale) = self.stale.lock() {
                        stale.clear();
                    }
                    self.overflowed.store(false, Ordering::Relaxed);
                    tracing::info!(
                        deleted,
                        "the cache was flushed after an overflow; using it again"
                    );
                    return true;
                }
                Ok(Err(error)) => {
                    self.failed("flushing the cache", &error);
                    return false;
                }
                Err(_) => {
                    self.failed("flushing the cache", &"timed out");
                    return false;
                }
            }
        }
        let ids: Vec<Uuid> = match self.stale.lock() {
            Ok(stale) if stale.is_empty() => return true,
            Ok(stale) => stale.iter().copied().collect(),
            Err(_) => return false,
        };
        let keys: Vec<String> = ids.iter().map(|id| self.key(*id)).collect();
        let mut redis = self.redis.clone();
        let deleted = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("DEL").arg(&keys).query_async::<i64>(&mut redis),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => {
                if let Ok(mut stale) = self.stale.lock() {
                    for id in &ids {
                        stale.remove(id);
                    }
                }
                tracing::info!(
                    keys = ids.len(),
                    "Redis is back; entries that missed updates were deleted"
                );
                true
            }
            Ok(Err(error)) => {
                self.failed("deleting stale entries", &error);
                false
            }
            Err(_) => {
                self.failed("deleting stale entries", &"timed out");
                false
            }
        }
    }

    /// Whether Redis answers `PING` now (for `/health`).
    async fn answers(&self) -> bool {
        let mut redis = self.redis.clone();
        let answer = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut redis),
        )
        .await;
        let up = matches!(answer, Ok(Ok(ref pong)) if pong == "PONG");
        if up {
            self.skip_until.store(0, Ordering::Relaxed);
        }
        up
    }

    /// Deletes every key of this cache's prefix.
    async fn delete_all(&self) -> Result<u64> {
        let mut redis = self.redis.clone();
        let pattern = format!("{}:tx:*", self.prefix);
        let mut deleted = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await
                .map_err(|error| Error::Job(format!("scanning the cache: {error}")))?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut redis)
                    .await
                    .map_err(|error| Error::Job(format!("flushing the cache: {error}")))?;
                deleted += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(deleted)
    }
}

#[async_trait]
impl TransactionCache for RedisCache {
    async fn get(&self, id: Uuid) -> Lookup {
        self.lookup(id).await
    }

    async fn write_through(&self, records: &[&TransactionRecord]) {
        self.write_rows(records).await;
    }

    async fn refill(&self, record: &TransactionRecord) {
        if !self.skipping() {
            self.put(&[record]).await;
        }
    }

    async fn flush(&self) -> Result<u64> {
        self.delete_all().await
    }

    async fn ping(&self) -> bool {
        self.answers().await
    }
}
