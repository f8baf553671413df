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
        let directory = tempfile::tempdir().expect("a temporary directory");
        let path = directory.path().join("ledger.sqlite");
        let pool = infra::sqlite::pool(infra::sqlite::options(&path, true), 4)
            .await
            .expect("opens");
        let counters = SqliteCounters::open(pool).await.expect("migrates");
        (Arc::new(counters), directory)
    }

    fraud_worker::velocity_conformance!(fresh);
}
