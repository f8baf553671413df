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

/// The embedded mode's wiring end to end: the SQLite event log and the SQLite read models in one
/// file, the live projector following the log, `verify` and `rebuild` on them, and the audit
/// trail from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_runs_on_sqlite_beside_the_sqlite_log() {
    use infra::eventlog::sqlite::SqliteEventLog;
    use infra::eventlog::{Append, EventLog, EventMetadata, NewEvent, StreamId};
    use projector::http::trail::{EventTrail, LogEventTrail};
    use projector::model::ProjectionName;
    use projector::rebuild::{RebuildOptions, rebuild_in};
    use projector::runner::{Projector, ProjectorSettings};
    use projector::store::LogSource;

    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("ledger.sqlite");
    let log = Arc::new(
        SqliteEventLog::open_file(&path, 2)
            .await
            .expect("the log opens"),
    );
    let builder = infra::testing::log_builder::build_log(150, 3);
    let metadata: EventMetadata =
        serde_json::from_value(builder.metadata.clone()).expect("metadata");
    for row in &builder.rows {
        let appended = log
            .append(vec![Append {
                stream: StreamId::new(row.aggregate_type, row.aggregate_id.clone()),
                expected_version: u64::try_from(row.sequence - 1).expect("positive"),
                events: vec![NewEvent {
                    event_id: uuid::Uuid::new_v4(),
                    event_type: row.event_type.to_owned(),
                    event_version: infra::codec::EVENT_VERSION.to_owned(),
                    payload: row.payload.to_string(),
                    metadata: metadata.clone(),
                }],
            }])
            .await
            .expect("appends");
        assert!(appended[0].written().is_some(), "{appended:?}");
    }

    let writer = infra::sqlite::pool(infra::sqlite::options(&path, false), 1)
        .await
        .expect("opens the writer");
    let readers = infra::sqlite::pool(infra::sqlite::options(&path, false), 2)
        .await
        .expect("opens the readers");
    let models: Arc<dyn ReadModels> = Arc::new(
        SqliteReadModels::open(writer, readers)
            .await
            .expect("the read models open"),
    );
    let projector = Projector::new(
        models.clone(),
        log.clone(),
        None,
        ProjectorSettings { batch_size: 40 },
    );
    let mut read = 0;
    loop {
        let events = projector.step().await.expect("a batch applies");
        if events == 0 {
            break;
        }
        read += events;
    }
    assert_eq!(read, builder.rows.len());
    assert_eq!(
        models.read_position().await.expect("the position"),
        log.head().await.expect("the head")
    );

    let source = LogSource(&*log);
    let report = projector::verify::verify_in(&*models, &source, &mut |_| {})
        .await
        .expect("verify runs");
    assert!(report.is_clean(), "{:#?}", report.differences);
    assert_eq!(report.events, builder.rows.len() as u64);

    let before = models
        .live_rows(ProjectionName::Accounts)
        .await
        .expect("rows");
    let summary = rebuild_in(
        &*models,
        &*log,
        &ProjectionName::ALL,
        RebuildOptions {
            batch_size: 50,
            restart: false,
        },
        |_| {},
    )
    .await
    .expect("the rebuild runs");
    assert!(
        summary
            .projections
            .iter()
            .all(|report| report.generation == 2)
    );
    assert_eq!(
        models
            .live_rows(ProjectionName::Accounts)
            .await
            .expect("rows"),
        before,
        "the rebuilt generation holds the same rows"
    );
    let report = projector::verify::verify_in(&*models, &source, &mut |_| {})
        .await
        .expect("verify runs");
    assert!(report.is_clean(), "{:#?}", report.differences);

    // `ledger verify --data DIR` beside a live serve: read-only connections, nothing written.
    let read_only = infra::sqlite::pool(infra::sqlite::options(&path, false).read_only(true), 2)
        .await
        .expect("opens read-only");
    let auditor = SqliteReadModels::open_read_only(read_only)
        .await
        .expect("the set-up read models open");
    let report = projector::verify::verify_in(&auditor, &source, &mut |_| {})
        .await
        .expect("verify runs read-only");
    assert!(report.is_clean(), "{:#?}", report.differences);
    assert!(
        auditor
            .prepare_generation(ProjectionName::Accounts, false)
            .await
            .is_err(),
        "a read-only store cannot write"
    );
    let empty = tempfile::tempdir().expect("a temporary directory");
    let nothing = infra::sqlite::pool(
        infra::sqlite::options(&empty.path().join("empty.sqlite"), true),
        1,
    )
    .await
    .expect("opens");
    let error = SqliteReadModels::open_read_only(nothing)
        .await
        .err()
        .expect("read models never set up are refused");
    assert!(error.to_string().contains("not set up"), "{error}");

    // The audit trail of a transaction, from the log.
    let transaction = builder
        .rows
        .iter()
        .find(|row| row.aggregate_type == "transaction")
        .expect("a transaction");
    let id = uuid::Uuid::parse_str(&transaction.aggregate_id).expect("a uuid");
    let trail = LogEventTrail::new(log.clone());
    assert!(trail.ping().await);
    let events = trail.transaction_events(id).await.expect("the trail reads");
    let expected: Vec<&str> = builder
        .rows
        .iter()
        .filter(|row| row.aggregate_id == transaction.aggregate_id)
        .map(|row| row.event_type)
        .collect();
    assert_eq!(
        events
            .iter()
            .map(|event| event.event_type.as_str())
            .collect::<Vec<_>>(),
        expected
    );
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[0].payload, transaction.payload);
}

/// A rebuild that switches a projection's views to a generation of another shape changes the
/// type of what the query side's statements return, and PostgreSQL refuses the statements a
/// pooled connection prepared before ("cached plan must not change result type"): the query
/// side prepares them again instead of failing every request on that connection (decision 74).
/// The new shape is made here by changing one column's collation under the view, as a new
/// generation could; one connection in the pool, so the read after it runs on the connection
/// that prepared it before.
#[tokio::test]
async fn a_query_prepared_before_its_view_changed_shape_is_prepared_again() {
    use sqlx::Connection;
    let database = ScratchDatabase::create(&infra::testing::admin_url())
        .await
        .expect("a scratch database");
    let url = database.url();
    let _scratch = Scratch(Some(database));
    let pool = projector::startup::connect_read_models(&url, 1)
        .await
        .expect("connects, migrates and sets up generation 1");
    let models = PgReadModels::new(pool.clone());
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(
        models.transaction(unknown).await.expect("reads before"),
        None
    );

    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connects");
    sqlx::raw_sql(
        "DROP VIEW projector.transactions; \
         ALTER TABLE projector.transactions_g1 ALTER COLUMN status TYPE text COLLATE \"C\"; \
         CREATE VIEW projector.transactions AS SELECT * FROM projector.transactions_g1",
    )
    .execute(&mut admin)
    .await
    .expect("changes the view's shape");
    admin.close().await.expect("disconnects");

    for _ in 0..2 {
        assert_eq!(
            models
                .transaction(unknown)
                .await
                .expect("reads after the view changed shape"),
            None
        );
    }
    pool.close().await;
}
