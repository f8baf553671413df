//! The in-process transaction cache of `ledger serve` (SPEC §10): `moka`, bounded by entries and
//! by the TTL, with the same version guard as Redis's script. It cannot fail, so it needs none
//! of Redis's back-off or stale-key memory: every write-through lands before the batch commits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use moka::ops::compute::Op;
use uuid::Uuid;

use super::{Lookup, TransactionCache};
use crate::error::Result;
use crate::model::transactions::TransactionRecord;

/// Entries kept when the caller names no bound: a small single-node ledger's hot transactions,
/// a few megabytes at most.
pub const MEMORY_CACHE_ENTRIES: u64 = 10_000;

/// The cache in this process's memory.
pub struct MemoryCache {
    entries: moka::sync::Cache<Uuid, Arc<TransactionRecord>>,
}

impl MemoryCache {
    /// A cache of at most `max_entries` rows, each kept at most `ttl` after its last write.
    pub fn new(max_entries: u64, ttl: Duration) -> MemoryCache {
        MemoryCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// How many entries the cache holds, once its pending evictions have run.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The version guard: `record` replaces the entry unless the entry is newer. moka runs the
    /// closure under the key's lock, so racing writers of one key cannot interleave.
    fn write(&self, record: &TransactionRecord) {
        self.entries
            .entry(record.id)
            .and_compute_with(|current| match current {
                Some(entry) if entry.value().version > record.version => Op::Nop,
                _ => Op::Put(Arc::new(record.clone())),
            });
    }
}

#[async_trait]
impl TransactionCache for MemoryCache {
    async fn get(&self, id: Uuid) -> Lookup {
        match self.entries.get(&id) {
            Some(record) => Lookup::Hit(Box::new(TransactionRecord::clone(&record))),
            None => Lookup::Miss,
        }
    }

    async fn write_through(&self, records: &[&TransactionRecord]) {
        for record in records {
            self.write(record);
        }
    }

    async fn refill(&self, record: &TransactionRecord) {
        self.write(record);
    }

    async fn flush(&self) -> Result<u64> {
        // Counted before invalidating: moka's count is eventually consistent, so this is what
        // the cache knew of, which is all a flush promises to report.
        self.entries.run_pending_tasks();
        let count = self.entries.entry_count();
        self.entries.invalidate_all();
        self.entries.run_pending_tasks();
        Ok(count)
    }

    async fn ping(&self) -> bool {
        true
    }
}
