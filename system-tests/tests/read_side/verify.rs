//! `verify` (SPEC §7): a read-model row that differs from the log is reported, by key.

use projector::model::ProjectionName;
use uuid::Uuid;

use crate::support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_every_corrupted_row() {
    // Proves verify compares row by row: clean after real traffic; a balance off by one minor
    // unit, a deleted history row and a history row with a wrong status are each reported under
    // their own key, and nothing else is.
    let harness = Harness::start().await;
    let traffic = harness.mixed_traffic().await;
    let report = harness.assert_verified().await;
    assert!(report.events > 0);
    assert!(report.projections.iter().all(|(_, _, _, rows)| *rows > 0));

    let (_, _, usd, jpy) = traffic.customers[0];
    sqlx::query("UPDATE projector.accounts_g1 SET balance_minor = balance_minor + 1 WHERE id = $1")
        .bind(usd)
        .execute(&harness.projector.pool)
        .await
        .expect("corrupting a balance");
    let deleted: (Uuid, Uuid) = sqlx::query_as(
        "DELETE FROM projector.account_history_g1 WHERE account_id = $1
         AND transaction_id = $2 RETURNING account_id, transaction_id",
    )
    .bind(jpy)
    .bind(traffic.transactions[1])
    .fetch_one(&harness.projector.pool)
    .await
    .expect("deleting a history row");
    let changed: (Uuid, Uuid) = sqlx::query_as(
        "UPDATE projector.account_history_g1 SET status = 'PENDING' WHERE account_id = $1
         AND transaction_id = $2 RETURNING account_id, transaction_id",
    )
    .bind(usd)
    .bind(traffic.transactions[0])
    .fetch_one(&harness.projector.pool)
    .await
    .expect("corrupting a history row");

    let report = harness.verify().await;
    assert!(!report.is_clean());
    assert!(report.audit.violations.is_empty(), "the log itself is fine");
    let mut found: Vec<(ProjectionName, String, bool)> = report
        .differences
        .iter()
        .map(|difference| {
            (
                difference.projection,
                difference.key.clone(),
                difference.found.is_some(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (ProjectionName::Accounts, usd.to_string(), true),
        (
            ProjectionName::AccountHistory,
            format!("{}/{}", deleted.0, deleted.1),
            false,
        ),
        (
            ProjectionName::AccountHistory,
            format!("{}/{}", changed.0, changed.1),
            true,
        ),
    ];
    expected.sort();
    assert_eq!(found, expected, "{:#?}", report.differences);
    harness.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_also_checks_what_later_events_will_be_folded_from() {
    // Proves verify compares the hidden state too: a corrupted folded state (which the next
    // event on the account would turn into a wrong balance) and a wrong or missing owner (which
    // would put the next transaction in the wrong customer's view) are both reported, although
    // every visible column is right.
    let harness = Harness::start().await;
    let traffic = harness.mixed_traffic().await;
    harness.assert_verified().await;
    let (_, _, usd, _) = traffic.customers[0];
    sqlx::query(
        "UPDATE projector.accounts_g1
         SET state = jsonb_set(state::jsonb, '{balance_minor}', '1') WHERE id = $1",
    )
    .bind(usd)
    .execute(&harness.projector.pool)
    .await
    .expect("corrupting a folded state");
    sqlx::query("UPDATE projector.account_owners_g1 SET owner_id = $2 WHERE account_id = $1")
        .bind(usd)
        .bind(Uuid::new_v4())
        .execute(&harness.projector.pool)
        .await
        .expect("corrupting an owner");
    let report = harness.verify().await;
    let keys: Vec<(ProjectionName, String)> = report
        .differences
        .iter()
        .map(|difference| (difference.projection, difference.key.clone()))
        .collect();
    assert_eq!(
        keys,
        vec![
            (ProjectionName::Accounts, format!("state {usd}")),
            (ProjectionName::Transactions, format!("owner {usd}")),
        ],
        "{:#?}",
        report.differences
    );
    harness.finish().await;
}
