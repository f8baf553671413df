//! Rebuilds (SPEC §7, §8.5): a fresh generation built from the log equals the live one row by
//! row, switches without losing what the live runner applied meanwhile, and resumes after an
//! interruption.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use domain::FraudOutcome;
use infra::log::LogPosition;
use projector::model::ProjectionName;
use projector::rebuild::{RebuildOptions, RebuildProgress, RebuildReport, RebuildSummary, rebuild};
use tokio::sync::Notify;

use crate::support::{Harness, Traffic};

/// Small batches, so that a rebuild takes many of them.
const BATCH_SIZE: usize = 7;

/// Every live row of every projection, rendered.
async fn dump(harness: &Harness) -> Vec<Vec<String>> {
    let mut connection = harness
        .projector
        .pool
        .acquire()
        .await
        .expect("a connection");
    let mut rows = Vec::new();
    for name in ProjectionName::ALL {
        rows.push(
            projector::verify::live_rows(&mut connection, name)
                .await
                .expect("the live rows can be read"),
        );
    }
    rows
}

async fn rebuild_one(harness: &Harness, name: ProjectionName) -> RebuildReport {
    let mut summary = rebuild_all(harness, &[name]).await;
    assert_eq!(summary.projections.len(), 1);
    summary.projections.remove(0)
}

/// Rebuilds `names` together, one reader of the log feeding them all.
async fn rebuild_all(harness: &Harness, names: &[ProjectionName]) -> RebuildSummary {
    let options = RebuildOptions {
        batch_size: BATCH_SIZE,
        restart: false,
    };
    rebuild(
        &harness.projector.pool,
        &harness.log_reader().await,
        names,
        options,
        |_| {},
    )
    .await
    .unwrap_or_else(|error| panic!("rebuilding {names:?}: {error}"))
}

/// Whether `table` exists in the projector's schema.
async fn exists(harness: &Harness, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass('projector.' || $1) IS NOT NULL")
        .bind(table)
        .fetch_one(&harness.projector.pool)
        .await
        .expect("looking up a table")
}

/// `(live_generation, building_generation)` of `name`.
async fn generations_of(harness: &Harness, name: ProjectionName) -> (i32, Option<i32>) {
    sqlx::query_as(
        "SELECT live_generation, building_generation FROM projector.projections WHERE name = $1",
    )
    .bind(name.as_str())
    .fetch_one(&harness.projector.pool)
    .await
    .expect("reading a projection")
}

/// The GETs a customer of `traffic` makes, touching every view.
fn probe_paths(traffic: &Traffic) -> Vec<String> {
    let (_, _, usd, jpy) = traffic.customers[0];
    let mut paths = vec![
        "/api/v1/accounts".to_owned(),
        format!("/api/v1/accounts/{usd}"),
        format!("/api/v1/accounts/{jpy}/balance"),
        format!("/api/v1/accounts/{usd}/history?page_size=3"),
        format!("/api/v1/transactions?account_id={usd}"),
        "/api/v1/transactions?status=CONFIRMED".to_owned(),
    ];
    // Alice is a party to all but one (Bob's deposit).
    for id in &traffic.transactions[..2] {
        paths.push(format!("/api/v1/transactions/{id}"));
        paths.push(format!("/api/v1/transactions/{id}/events"));
    }
    paths
}

/// The bodies of `paths`, all fetched at once so that several pooled connections serve them.
async fn probe(harness: &Harness, token: &str, paths: &[String]) -> Vec<serde_json::Value> {
    futures::future::join_all(paths.iter().map(|path| harness.get_ok(path, token))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_reproduces_the_live_read_models_row_by_row() {
    // Proves SPEC §8.5: each projection rebuilt from the log in small batches equals the live
    // one row for row, the switch leaves only the new generation behind, and the query API
    // (whose connections prepared statements on the views before the switch) answers the same.
    let harness = Harness::start().await;
    let traffic = harness.mixed_traffic().await;
    let token = traffic.customers[0].1.clone();
    let paths = probe_paths(&traffic);
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers = probe(&harness, &token, &paths).await;
    }
    let before = dump(&harness).await;
    assert!(before.iter().all(|rows| !rows.is_empty()));

    for name in ProjectionName::ALL {
        let report = rebuild_one(&harness, name).await;
        assert_eq!(
            (report.generation, report.replaced_generation),
            (2, 1),
            "{name}"
        );
        assert_eq!(generations_of(&harness, name).await, (2, None));
        for table in name.tables() {
            assert!(
                !exists(&harness, &table.table(1)).await,
                "{} stays",
                table.table(1)
            );
            assert!(
                exists(&harness, &table.table(2)).await,
                "{} is missing",
                table.table(2)
            );
        }
    }

    assert_eq!(dump(&harness).await, before, "the rebuilt rows differ");
    harness.assert_verified().await;

    // All three again, together: one reader feeding every projection, one switch.
    let summary = rebuild_all(&harness, &ProjectionName::ALL).await;
    assert!(summary.events > BATCH_SIZE as u64, "{summary:?}");
    for report in &summary.projections {
        assert_eq!(
            (report.generation, report.replaced_generation),
            (3, 2),
            "{report:?}"
        );
        assert_eq!(generations_of(&harness, report.projection).await, (3, None));
    }
    assert_eq!(
        dump(&harness).await,
        before,
        "the rows rebuilt together differ"
    );
    harness.assert_verified().await;
    // From PostgreSQL, not the cache: the transaction reads must go through the new tables.
    harness
        .projector
        .flush_cache()
        .await
        .expect("the cache flushes");
    for _ in 0..3 {
        assert_eq!(probe(&harness, &token, &paths).await, answers);
    }
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_during_traffic_loses_nothing_at_the_switch() {
    // Proves the switch is atomic with the live runner: transfers keep being posted, decided
    // and projected while every projection is rebuilt and switched; afterwards every row equals
    // the log and every transaction is there.
    let harness = Harness::start().await;
    let (_, token) = harness.customer();
    let source = harness.open_account(&token, "USD").await;
    let destination = harness.open_account(&token, "USD").await;
    harness.fund(source, "1000.00", "USD").await;
    let rebuilt = AtomicBool::new(false);

    let traffic = async {
        let mut ids = Vec::new();
        // Bounded: keeps going until the rebuilds are done (at least 20, at most 600). The
        // pause keeps the traffic a stream rather than a flood the rebuild's 7-event batches
        // could never catch up with on a loaded machine.
        while ids.len() < 20 || (!rebuilt.load(Ordering::Relaxed) && ids.len() < 600) {
            let id = harness
                .transfer(&token, source, destination, "1.00", "USD")
                .await;
            harness.decide(id, FraudOutcome::Approved).await;
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ids
    };
    let rebuilds = async {
        let mut reports = Vec::new();
        for name in [ProjectionName::Accounts, ProjectionName::Transactions] {
            reports.push(rebuild_one(&harness, name).await);
        }
        // And two together, with one reader.
        reports.extend(
            rebuild_all(
                &harness,
                &[ProjectionName::AccountHistory, ProjectionName::Transactions],
            )
            .await
            .projections,
        );
        rebuilt.store(true, Ordering::Relaxed);
        reports
    };
    let (ids, reports) = tokio::join!(traffic, rebuilds);
    assert!(ids.len() < 600, "the rebuilds never finished");
    let generations: Vec<(ProjectionName, i32)> = reports
        .iter()
        .map(|report| (report.projection, report.generation))
        .collect();
    assert_eq!(
        generations,
        [
            (ProjectionName::Accounts, 2),
            (ProjectionName::Transactions, 2),
            (ProjectionName::Transactions, 3),
            (ProjectionName::AccountHistory, 2),
        ]
    );

    harness.wait_settled(&ids).await;
    harness.caught_up().await;
    harness.assert_verified().await;
    let projected: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projector.transactions WHERE status = 'CONFIRMED'",
    )
    .fetch_one(&harness.projector.pool)
    .await
    .expect("counting transactions");
    assert_eq!(projected, ids.len() as i64 + 1);
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_resumes_its_generation() {
    // Proves a rebuild is resumable: dropped after a few committed batches (as a killed CLI
    // would be), it leaves its generation registered as building with a checkpoint; the next
    // run continues that generation from there instead of starting over, and the result is
    // exact.
    let harness = Harness::start().await;
    harness.mixed_traffic().await;
    let before = dump(&harness).await;
    let name = ProjectionName::Transactions;
    let options = RebuildOptions {
        batch_size: 3,
        restart: false,
    };

    let stop = Notify::new();
    let mut batches = 0;
    let reader = harness.log_reader().await;
    let names = [name];
    let interrupted = rebuild(
        &harness.projector.pool,
        &reader,
        &names,
        options,
        |progress| {
            if let RebuildProgress::Applied { .. } = progress {
                batches += 1;
                if batches == 3 {
                    stop.notify_one();
                }
            }
        },
    );
    tokio::select! {
        report = interrupted => panic!("the rebuild finished before it was interrupted: {report:?}"),
        () = stop.notified() => {}
    }
    assert_eq!(generations_of(&harness, name).await, (1, Some(2)));

    // The interrupted run's lock dies with its connection; until the server notices, a new
    // run is refused as concurrent, which is what it should say.
    let started = Arc::new(std::sync::Mutex::new(None));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let report = loop {
        let seen = started.clone();
        let attempt = rebuild(
            &harness.projector.pool,
            &harness.log_reader().await,
            &[name],
            options,
            move |progress| {
                if let RebuildProgress::Started { resumed_at, .. } = progress {
                    *seen.lock().expect("not poisoned") = Some(resumed_at);
                }
            },
        )
        .await;
        match attempt {
            Ok(report) => break report,
            Err(error) if std::time::Instant::now() < deadline => {
                assert!(error.to_string().contains("another rebuild"), "{error}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the rebuild never resumed: {error}"),
        }
    };
    let resumed_at = started
        .lock()
        .expect("not poisoned")
        .expect("the rebuild reported its start");
    assert!(resumed_at > LogPosition::START, "started over");
    let rebuilt = &report.projections[0];
    assert_eq!((rebuilt.generation, rebuilt.replaced_generation), (2, 1));
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM command_api.events")
        .fetch_one(&harness.app.pool)
        .await
        .expect("counting events");
    assert!(
        (report.events as i64) < total,
        "resumed run applied {} of {total} events",
        report.events
    );
    assert_eq!(generations_of(&harness, name).await, (2, None));
    assert!(!exists(&harness, "transactions_g3").await);
    assert_eq!(dump(&harness).await, before);
    harness.assert_verified().await;
    harness.finish().await;
}

#[tokio::test]
async fn a_rebuild_drops_generations_a_crashed_rebuild_left_behind() {
    // Proves the clean-up after a rebuild killed between its switch and its drop: tables of a
    // generation that is neither live nor being built are dropped by the next rebuild, and only
    // those.
    let harness = Harness::start().await;
    let mut connection = harness
        .projector
        .pool
        .acquire()
        .await
        .expect("a connection");
    projector::generations::create_tables(
        &mut projector::model::Db::Pg(&mut connection),
        ProjectionName::Transactions,
        9,
    )
    .await
    .expect("a leftover generation's tables");
    let report = rebuild_one(&harness, ProjectionName::Transactions).await;
    assert_eq!(report.generation, 2);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'projector' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&mut *connection)
    .await
    .expect("the tables");
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "account_history_g1",
            "account_owners_g2",
            "accounts_g1",
            "checkpoints",
            "projections",
            "transactions_g2",
        ]
    );
    drop(connection);
    harness.finish().await;
}
