//! The follower state: one conformance suite, run against PostgreSQL and SQLite.

use std::sync::Arc;

use command_api::state::{FollowerState, PgFollowerState, SqliteFollowerState};
use infra::db::ScratchDatabase;

use crate::eventlog::Scratch;

async fn fresh_postgres_state() -> (Arc<dyn FollowerState>, Scratch) {
    let database = ScratchDatabase::create(&command_api::testing::admin_url())
        .await
        .expect("a scratch database");
    let pool = infra::db::connect(&database.url(), "command_api", 4, "test")
        .await
        .expect("connects");
    command_api::startup::migrate(&pool)
        .await
        .expect("migrates");
    (Arc::new(PgFollowerState::new(pool)), Scratch::new(database))
}

async fn fresh_sqlite_state() -> (Arc<dyn FollowerState>, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let pool = infra::sqlite::pool(
        infra::sqlite::options(&directory.path().join("ledger.sqlite"), true),
        2,
    )
    .await
    .expect("opens");
    let state = SqliteFollowerState::open(pool).await.expect("migrates");
    (Arc::new(state), directory)
}

mod postgres {
    use super::fresh_postgres_state;
    command_api::follower_state_conformance!(fresh_postgres_state);
}

mod sqlite {
    use super::fresh_sqlite_state;
    command_api::follower_state_conformance!(fresh_sqlite_state);
}
