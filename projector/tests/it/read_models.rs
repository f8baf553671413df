//! The read models: one conformance suite, run against PostgreSQL and SQLite.

use std::sync::Arc;

use infra::db::ScratchDatabase;
use projector::store::{PgReadModels, ReadModels, SqliteReadModels};

/// A scratch database, dropped when the check is over.
pub struct Scratch(Option<ScratchDatabase>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(database) = self.0.take() {
            infra::tasks::block_on_own_runtime(async move {
                let _ = database.drop_database().await;
            });
        }
    }
}

async fn fresh_postgres_models() -> (Arc<dyn ReadModels>, Scratch) {
    let database = ScratchDatabase::create(&infra::testing::admin_url())
        .await
        .expect("a scratch database");
    let pool = projector::startup::connect_read_models(&database.url(), 4)
        .await
        .expect("connects, migrates and sets up generation 1");
    (Arc::new(PgReadModels::new(pool)), Scratch(Some(database)))
}

async fn fresh_sqlite_models() -> (Arc<dyn ReadModels>, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("read-models.sqlite");
    let writer = infra::sqlite::pool(infra::sqlite::options(&path, true), 1)
        .await
        .expect("opens the writer");
    let readers = infra::sqlite::pool(infra::sqlite::options(&path, false), 4)
        .await
        .expect("opens the readers");
    let models = SqliteReadModels::open(writer, readers)
        .await
        .expect("migrates and sets up generation 1");
    (Arc::new(models), directory)
}

mod postgres {
    use super::fresh_postgres_models;
    projector::read_models_conformance!(fresh_postgres_models);
}

mod sqlite {
    use super::fresh_sqlite_models;
    projector::read_models_conformance!(fresh_sqlite_models);
}
