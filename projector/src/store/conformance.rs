//! The read models' conformance suite: one set of checks every [`ReadModels`] passes
//! (PostgreSQL, SQLite). Each check takes fresh, empty read models (generation 1 of every
//! projection, checkpoints at the start) and panics with what it found.
//!
//! The events come from infra's log builder: domain-valid, out of the domain's own `decide`.
//! Every answer is compared with the log folded in memory by the projections' own fold, so two
//! stores that pass give the same answers.
//!
//! ```ignore
//! projector::read_models_conformance!(fresh_sqlite_models);
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::Utc;
use domain::{
    AccountCommand, AccountId, Amount, Currency, CustomerId, Transaction, TransactionCommand,
    TransactionId, TransactionKind, TransactionRequest,
};
use infra::eventlog::{EventMetadata, RecordedEvent, StreamId};
use infra::log::LogPosition;
use infra::testing::log_builder::{LogBuilder, Row, build_log};
use uuid::Uuid;

use super::{EventSource, PageQuery, ReadModels, StoredModels, TransactionScope};
use crate::error::Result;
use crate::model::accounts::{AccountRecord, AccountsModel};
use crate::model::history::{HistoryModel, HistoryRecord};
use crate::model::transactions::{TransactionMemory, TransactionRecord, TransactionsModel};
use crate::model::{Backend, Decoded, Model, ProjectionName};

/// Instantiates every check of the suite as a `#[tokio::test]`, each on read models from
/// `$fresh`, an `async fn() -> (Arc<dyn ReadModels>, G)` where `G` is dropped after the check.
#[macro_export]
macro_rules! read_models_conformance {
    ($fresh:path) => {
        $crate::read_models_conformance!(@checks $fresh;
            batches_apply_every_projection_and_move_the_checkpoints,
            a_failed_batch_changes_nothing_in_a_projection_that_cannot_fold_it,
            a_batch_applied_twice_changes_nothing,
            remembered_rows_store_what_reading_them_back_would,
            queries_filter_and_page_as_the_log_implies,
            a_rebuilt_generation_switches_in_atomically,
            a_rebuild_resumes_each_projection_from_its_own_checkpoint,
            one_rebuild_at_a_time
        );
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (models, _keep) = $fresh().await;
                $crate::store::conformance::$check(&*models).await;
            }
        )*
    };
}

/// Events in memory, as the log would return them: positions `(n, 0)` from 1.
pub struct Events {
    events: Mutex<Vec<RecordedEvent>>,
    /// Return the whole log whatever position is asked for (a runner re-reading after a crash
    /// from a checkpoint that did not move).
    ignore_position: bool,
}

impl Events {
    pub fn new(rows: &[Row], metadata: &serde_json::Value) -> Self {
        let events = Events {
            events: Mutex::new(Vec::new()),
            ignore_position: false,
        };
        events.push(rows, metadata);
        events
    }

    /// Appends more events.
    pub fn push(&self, rows: &[Row], metadata: &serde_json::Value) {
        let metadata: EventMetadata = serde_json::from_value(metadata.clone()).unwrap_or_default();
        let mut events = self.events.lock().expect("not poisoned");
        for row in rows {
            let commit = i64::try_from(events.len()).expect("a small log") + 1;
            events.push(RecordedEvent {
                position: LogPosition { commit, index: 0 },
                event_id: Uuid::new_v4(),
                recorded_at: Utc::now(),
                stream: StreamId::new(row.aggregate_type, row.aggregate_id.clone()),
                sequence: u64::try_from(row.sequence).expect("positive sequences"),
                event_type: row.event_type.to_owned(),
                event_version: infra::codec::EVENT_VERSION.to_owned(),
                payload: row.payload.to_string(),
                metadata: metadata.clone(),
            });
        }
    }

    pub fn all(&self) -> Vec<RecordedEvent> {
        self.events.lock().expect("not poisoned").clone()
    }

    pub fn last(&self) -> LogPosition {
        self.all()
            .last()
            .map_or(LogPosition::START, |event| event.position)
    }
}

#[async_trait]
impl EventSource for Events {
    async fn read_after(&self, after: LogPosition, max: usize) -> Result<Vec<RecordedEvent>> {
        let events = self.events.lock().expect("not poisoned");
        Ok(events
            .iter()
            .filter(|event| self.ignore_position || event.position > after)
            .take(max)
            .cloned()
            .collect())
    }
}

/// The log folded in memory by the projections' own fold: what every store must hold.
struct Expected {
    accounts: BTreeMap<String, AccountRecord>,
    transactions: BTreeMap<String, TransactionRecord>,
    history: BTreeMap<String, HistoryRecord>,
}

fn fold<M: Model>(events: &[RecordedEvent]) -> M {
    let mut model = M::default();
    for (event, ordinal) in events.iter().zip(1..) {
        let decoded = infra::codec::decode(event).expect("the builder's events decode");
        model
            .fold(&Decoded {
                log: event,
                event: &decoded,
                ordinal,
            })
            .expect("the builder's events fold");
    }
    model
}

fn expected(events: &[RecordedEvent]) -> Expected {
    Expected {
        accounts: fold::<AccountsModel>(events).records(),
        transactions: fold::<TransactionsModel>(events).records(),
        history: fold::<HistoryModel>(events).records(),
    }
}

/// One live batch as the projector runs it: the checkpoints looked up, then the batch after the
/// lowest.
async fn apply_live(
    models: &dyn ReadModels,
    source: &dyn EventSource,
    batch_size: usize,
) -> crate::error::Result<Option<crate::model::DecodedBatch>> {
    let read_from = models.read_position().await?;
    models
        .apply_live(source, read_from, batch_size, None, None)
        .await
}

/// [`apply_live`] by a projector that remembers its transactions in `memory`.
async fn apply_live_remembering(
    models: &dyn ReadModels,
    source: &dyn EventSource,
    batch_size: usize,
    memory: &TransactionMemory,
) -> crate::error::Result<Option<crate::model::DecodedBatch>> {
    let read_from = models.read_position().await?;
    models
        .apply_live(source, read_from, batch_size, None, Some(memory))
        .await
}

/// Applies every event of `source` through the live path, `batch_size` at a time.
async fn apply_all(models: &dyn ReadModels, source: &dyn EventSource, batch_size: usize) {
    for _ in 0..10_000 {
        let batch = apply_live(models, source, batch_size)
            .await
            .expect("a batch applies");
        if batch.is_none() {
            return;
        }
    }
    panic!("the live path never caught up");
}

/// Asserts the store holds exactly what `events` imply, with every checkpoint at the last one.
async fn assert_holds(models: &dyn ReadModels, events: &[RecordedEvent]) {
    let stored = models.stored().await.expect("the stored models read");
    let want = expected(events);
    assert_eq!(stored.accounts.records, want.accounts, "accounts");
    assert_eq!(
        stored.transactions.records, want.transactions,
        "transactions"
    );
    assert_eq!(stored.history.records, want.history, "history");
    let last = events
        .last()
        .map_or(LogPosition::START, |event| event.position);
    assert_eq!(stored.checkpoints.len(), ProjectionName::ALL.len());
    for (name, _, position) in &stored.checkpoints {
        assert_eq!(*position, last, "the checkpoint of {name}");
    }
    // And the same through `verify`'s own comparison (rows and hidden state).
    let source = Events {
        events: Mutex::new(events.to_vec()),
        ignore_position: false,
    };
    let report = crate::verify::verify_in(models, &source, &mut |_| {})
        .await
        .expect("verify runs");
    assert!(
        report.differences.is_empty(),
        "verify found differences: {:#?}",
        report.differences
    );
}

fn usd() -> Currency {
    Currency::from_code("USD").expect("USD is a currency")
}

/// Two owners with accounts, deposits and transfers between them, and one transfer left
/// pending (created, never carried on).
struct Scenario {
    builder: LogBuilder,
    alice: Uuid,
    bob: Uuid,
    accounts: Vec<AccountId>,
    pending: Uuid,
}

fn scenario() -> Scenario {
    let mut builder = LogBuilder::new();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let owners = [alice, alice, alice, bob, bob];
    let accounts: Vec<AccountId> = owners.iter().map(|_| AccountId(Uuid::new_v4())).collect();
    for (account, owner) in accounts.iter().zip(owners) {
        builder.account(
            *account,
            AccountCommand::Open {
                account_id: *account,
                owner_id: CustomerId(owner),
                currency: usd(),
                name: Some(format!("account of {owner}")),
                at: Utc::now(),
            },
        );
    }
    let amount = |minor| Amount::from_minor(minor).expect("a valid amount");
    for account in &accounts {
        let request = TransactionRequest::new(
            TransactionKind::Deposit,
            amount(100_000),
            usd(),
            None,
            Some(*account),
            Some("salary".to_owned()),
        )
        .expect("a valid deposit");
        builder.transaction(request);
    }
    for n in 0..12 {
        let source = accounts[n % accounts.len()];
        let destination = accounts[(n + 2) % accounts.len()];
        let request = TransactionRequest::new(
            TransactionKind::Transfer,
            amount(i64::try_from(n).expect("small") * 10 + 1),
            usd(),
            Some(source),
            Some(destination),
            None,
        )
        .expect("a valid transfer");
        builder.transaction(request);
    }
    // A transfer left pending: only its creation is in the log.
    let pending = TransactionId(Uuid::new_v4());
    let request = TransactionRequest::new(
        TransactionKind::Transfer,
        amount(5),
        usd(),
        Some(accounts[4]),
        Some(accounts[0]),
        Some("pending".to_owned()),
    )
    .expect("a valid transfer");
    let create = TransactionCommand::Create {
        transaction_id: pending,
        request,
        initiated_by: CustomerId(bob),
        at: Utc::now(),
    };
    let events = Transaction::decide(None, &create).expect("the creation is valid");
    for (event, sequence) in events.iter().zip(1..) {
        builder.rows.push(Row {
            aggregate_type: "transaction",
            aggregate_id: pending.to_string(),
            sequence,
            event_type: event.event_type(),
            payload: serde_json::to_value(event).expect("events serialise"),
        });
    }
    Scenario {
        builder,
        alice,
        bob,
        accounts,
        pending: pending.0,
    }
}

pub async fn batches_apply_every_projection_and_move_the_checkpoints(models: &dyn ReadModels) {
    let builder = build_log(400, 6);
    let source = Events::new(&builder.rows, &builder.metadata);
    let before = models.live_checkpoints().await.expect("checkpoints read");
    assert_eq!(before.len(), ProjectionName::ALL.len());
    assert!(
        before
            .iter()
            .all(|(_, generation, position)| *generation == 1 && *position == LogPosition::START),
        "fresh read models start at generation 1 and the start: {before:?}"
    );
    // Batches that do not line up with transactions: each must apply wholly.
    apply_all(models, &source, 37).await;
    assert_holds(models, &source.all()).await;
    assert_eq!(
        models.read_position().await.expect("the read position"),
        source.last()
    );
    // More events later continue where the checkpoints stand.
    let more = build_log(60, 2);
    source.push(&more.rows, &more.metadata);
    apply_all(models, &source, 1_000).await;
    assert_holds(models, &source.all()).await;
}

pub async fn a_failed_batch_changes_nothing_in_a_projection_that_cannot_fold_it(
    models: &dyn ReadModels,
) {
    let builder = build_log(100, 3);
    let source = Events::new(&builder.rows[..50], &builder.metadata);
    apply_all(models, &source, 1_000).await;
    let before = models.stored().await.expect("stored");
    // An event that cannot even be decoded fails its batch before any projection sees it.
    let unreadable = Events::new(&builder.rows[..50], &builder.metadata);
    unreadable.push(
        &[Row {
            aggregate_type: "account",
            aggregate_id: Uuid::new_v4().to_string(),
            sequence: 1,
            event_type: "AccountOpened",
            payload: serde_json::json!({"NotAnEvent": {}}),
        }],
        &builder.metadata,
    );
    assert!(apply_live(models, &unreadable, 1_000).await.is_err());
    let after = models.stored().await.expect("stored");
    assert_eq!(after.checkpoints, before.checkpoints, "no checkpoint moved");
    assert_eq!(after.accounts.records, before.accounts.records);
    assert_eq!(after.transactions.records, before.transactions.records);
    assert_eq!(after.history.records, before.history.records);
    assert_eq!(after.transactions.hidden, before.transactions.hidden);

    // A batch whose good events come first and whose last one decodes but breaks the domain's
    // rules for accounts (an account opened twice): the accounts projection has folded the good
    // ones into its rows when it meets it, and must keep none of them. Each projection is
    // atomic with its own checkpoint; whether the others commit their share (PostgreSQL applies
    // projections apart) or not (SQLite applies them in one transaction), each must still hold
    // exactly what the log implies up to its own checkpoint.
    source.push(&builder.rows[50..], &builder.metadata);
    let first = &builder.rows[0];
    assert_eq!(first.event_type, "AccountOpened");
    let reopened = Row {
        aggregate_type: first.aggregate_type,
        aggregate_id: first.aggregate_id.clone(),
        sequence: 1_000,
        event_type: first.event_type,
        payload: first.payload.clone(),
    };
    source.push(&[reopened], &builder.metadata);
    let error = apply_live(models, &source, 1_000)
        .await
        .err()
        .expect("an unprojectable event fails its batch");
    assert!(error.to_string().contains("already open"), "{error}");
    let after = models.stored().await.expect("stored");
    let checkpoint = |stored: &StoredModels, projection: ProjectionName| {
        stored
            .checkpoints
            .iter()
            .find(|(name, _, _)| *name == projection)
            .map(|(_, _, position)| *position)
            .expect("every projection has a checkpoint")
    };
    assert_eq!(
        checkpoint(&after, ProjectionName::Accounts),
        checkpoint(&before, ProjectionName::Accounts),
        "accounts did not move"
    );
    assert_eq!(after.accounts.records, before.accounts.records);
    assert_eq!(after.accounts.hidden, before.accounts.hidden);
    let log = source.all();
    let up_to = |projection| {
        let position = checkpoint(&after, projection);
        log.iter()
            .filter(|event| event.position <= position)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        after.transactions.records,
        fold::<TransactionsModel>(&up_to(ProjectionName::Transactions)).records(),
        "transactions hold what their checkpoint implies"
    );
    assert_eq!(
        after.history.records,
        fold::<HistoryModel>(&up_to(ProjectionName::AccountHistory)).records(),
        "history holds what its checkpoint implies"
    );
    if models.backend() == Backend::Postgres {
        // There the projections are applied apart: the others are not rolled back with it.
        for projection in [ProjectionName::Transactions, ProjectionName::AccountHistory] {
            assert_eq!(
                checkpoint(&after, projection),
                source.last(),
                "{projection}"
            );
        }
    }
}

pub async fn remembered_rows_store_what_reading_them_back_would(models: &dyn ReadModels) {
    let builder = build_log(400, 6);
    let source = Events::new(&builder.rows, &builder.metadata);
    // Batches that cut transactions apart, so their later events find them remembered; now and
    // then another instance (its own memory, or none) applies a batch in between, which the
    // first one's memory must not survive.
    let (ours, theirs) = (TransactionMemory::default(), TransactionMemory::default());
    let mut remembered = 0;
    for round in 0..10_000 {
        let batch = match round % 7 {
            2 | 5 => apply_live_remembering(models, &source, 3, &theirs).await,
            6 => apply_live(models, &source, 2).await,
            _ => apply_live_remembering(models, &source, 3, &ours).await,
        }
        .expect("a batch applies");
        remembered = remembered.max(ours.remembered());
        if batch.is_none() {
            break;
        }
    }
    assert!(
        remembered > 0 && ours.hits() > 0,
        "the projector remembered transactions between its batches and used them: \
         {remembered} kept, {} used",
        ours.hits()
    );
    assert_holds(models, &source.all()).await;
}

pub async fn a_batch_applied_twice_changes_nothing(models: &dyn ReadModels) {
    let builder = build_log(200, 4);
    let source = Events::new(&builder.rows, &builder.metadata);
    apply_all(models, &source, 64).await;
    let before = models.stored().await.expect("stored");
    // A runner that crashed after its commit reads the same events again: every one of them is
    // at or before the checkpoints, so nothing changes.
    let again = Events {
        events: Mutex::new(source.all()),
        ignore_position: true,
    };
    let batch = apply_live(models, &again, 1_000)
        .await
        .expect("a re-read batch applies");
    assert!(batch.is_some(), "the batch was read");
    let after = models.stored().await.expect("stored");
    assert_eq!(after.checkpoints, before.checkpoints);
    assert_eq!(after.accounts.records, before.accounts.records);
    assert_eq!(after.transactions.records, before.transactions.records);
    assert_eq!(after.history.records, before.history.records);
    assert_eq!(after.accounts.hidden, before.accounts.hidden);
    assert_eq!(after.transactions.hidden, before.transactions.hidden);
    assert_holds(models, &source.all()).await;
}

/// Every page of a list, `size` at a time, following the cursor as the API does.
async fn pages<R, F, Fut>(size: i64, position: impl Fn(&R) -> i64, mut page: F) -> Vec<R>
where
    F: FnMut(PageQuery) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<R>>>,
{
    let mut all = Vec::new();
    let mut before = i64::MAX;
    for _ in 0..1_000 {
        let mut rows = page(PageQuery {
            before,
            limit: size + 1,
        })
        .await
        .expect("a page reads");
        let more = rows.len() > usize::try_from(size).expect("positive");
        rows.truncate(usize::try_from(size).expect("positive"));
        if let Some(last) = rows.last() {
            before = position(last);
        }
        all.extend(rows);
        if !more {
            return all;
        }
    }
    panic!("paging never ended");
}

fn newest_first<R: Clone>(rows: impl Iterator<Item = R>, position: impl Fn(&R) -> i64) -> Vec<R> {
    let mut rows: Vec<R> = rows.collect();
    rows.sort_by_key(|row| std::cmp::Reverse(position(row)));
    rows
}

pub async fn queries_filter_and_page_as_the_log_implies(models: &dyn ReadModels) {
    let scenario = scenario();
    let source = Events::new(&scenario.builder.rows, &scenario.builder.metadata);
    apply_all(models, &source, 50).await;
    let want = expected(&source.all());

    // One account, and a missing one.
    for record in want.accounts.values() {
        let found = models.account(record.id).await.expect("an account reads");
        assert_eq!(found.as_ref(), Some(record));
    }
    assert_eq!(
        models.account(Uuid::new_v4()).await.expect("reads"),
        None,
        "a missing account is none"
    );

    // Accounts: all (customers and the world account), and one owner's.
    let by_position = |record: &AccountRecord| record.created_position;
    let all = pages(2, by_position, |page| models.accounts(None, page)).await;
    assert_eq!(
        all,
        newest_first(want.accounts.values().cloned(), by_position)
    );
    for owner in [scenario.alice, scenario.bob, Uuid::new_v4()] {
        let mine = pages(2, by_position, |page| models.accounts(Some(owner), page)).await;
        let expected = newest_first(
            want.accounts
                .values()
                .filter(|record| record.owner_id == Some(owner))
                .cloned(),
            by_position,
        );
        assert_eq!(mine, expected, "the accounts of {owner}");
    }

    // Histories.
    let by_position = |record: &HistoryRecord| record.created_position;
    for account in &scenario.accounts {
        let history = pages(3, by_position, |page| models.history(account.0, page)).await;
        let expected = newest_first(
            want.history
                .values()
                .filter(|record| record.account_id == account.0)
                .cloned(),
            by_position,
        );
        assert!(!expected.is_empty());
        assert_eq!(history, expected, "the history of {account}");
    }

    // One transaction.
    for record in want.transactions.values() {
        let found = models.transaction(record.id).await.expect("reads");
        assert_eq!(found.as_ref(), Some(record));
    }
    assert_eq!(
        models.transaction(Uuid::new_v4()).await.expect("reads"),
        None
    );

    // Transaction lists: every scope with every status filter.
    let by_position = |record: &TransactionRecord| record.created_position;
    let mut scopes = vec![
        TransactionScope::All,
        TransactionScope::Owner(scenario.alice),
        TransactionScope::Owner(scenario.bob),
        TransactionScope::Owner(Uuid::new_v4()),
    ];
    scopes.extend(
        scenario
            .accounts
            .iter()
            .map(|account| TransactionScope::Account(account.0)),
    );
    for scope in scopes {
        for status in [None, Some("PENDING"), Some("CONFIRMED"), Some("REJECTED")] {
            let found = pages(4, by_position, |page| {
                models.transactions(scope, status, page)
            })
            .await;
            let expected = newest_first(
                want.transactions
                    .values()
                    .filter(|record| status.is_none_or(|status| record.status == status))
                    .filter(|record| match scope {
                        TransactionScope::All => true,
                        TransactionScope::Account(account) => {
                            record.source_account_id == Some(account)
                                || record.destination_account_id == Some(account)
                        }
                        TransactionScope::Owner(owner) => {
                            record.source_owner_id == Some(owner)
                                || record.destination_owner_id == Some(owner)
                        }
                    })
                    .cloned(),
                by_position,
            );
            assert_eq!(
                found, expected,
                "transactions of {scope:?} with status {status:?}"
            );
        }
    }
    let pending = models
        .transactions(
            TransactionScope::All,
            Some("PENDING"),
            PageQuery {
                before: i64::MAX,
                limit: 10,
            },
        )
        .await
        .expect("reads");
    assert_eq!(
        pending.iter().map(|record| record.id).collect::<Vec<_>>(),
        vec![scenario.pending],
        "the one pending transaction"
    );
}

pub async fn a_rebuilt_generation_switches_in_atomically(models: &dyn ReadModels) {
    let builder = build_log(300, 5);
    let source = Events::new(&builder.rows[..200], &builder.metadata);
    apply_all(models, &source, 100).await;
    let rows_before = models
        .live_rows(ProjectionName::Transactions)
        .await
        .expect("live rows");

    let names = ProjectionName::ALL;
    let (lock, building) = start_rebuild(models, &names).await;
    for (name, generation) in &building {
        assert_eq!(*generation, 2, "the next generation of {name}");
        assert_eq!(
            models
                .checkpoint(*name, *generation)
                .await
                .expect("checkpoint")
                .position,
            LogPosition::START
        );
    }
    // Resuming finds the half-built generation.
    assert_eq!(
        models
            .prepare_generation(ProjectionName::Accounts, false)
            .await
            .expect("resumes"),
        2
    );
    // Build part of the way; the live generation keeps serving and following meanwhile.
    let first = crate::model::DecodedBatch::new(source.all()[..120].to_vec()).expect("decodes");
    let applied = models
        .apply_building(&building, &first)
        .await
        .expect("a rebuild batch applies");
    assert_eq!(applied, 120 * names.len());
    assert_eq!(
        models
            .live_rows(ProjectionName::Transactions)
            .await
            .expect("rows"),
        rows_before,
        "queries read the live generation while another is built"
    );
    source.push(&builder.rows[200..], &builder.metadata);
    apply_all(models, &source, 100).await;
    let live = models.live_checkpoints().await.expect("checkpoints");
    assert!(live.iter().all(|(_, generation, _)| *generation == 1));

    // The switch catches up with the log and flips every projection at once.
    let replaced = models
        .switch(&building, &source, 70)
        .await
        .expect("the switch");
    assert_eq!(
        replaced,
        names.iter().map(|name| (*name, 1)).collect::<Vec<_>>()
    );
    let live = models.live_checkpoints().await.expect("checkpoints");
    assert!(
        live.iter()
            .all(|(_, generation, position)| *generation == 2 && *position == source.last()),
        "{live:?}"
    );
    models
        .drop_generations(&replaced)
        .await
        .expect("the old generations drop");
    lock.release().await;
    assert_holds(models, &source.all()).await;

    // The next live batch applies to the new generation.
    let more = build_log(30, 2);
    source.push(&more.rows, &more.metadata);
    apply_all(models, &source, 1_000).await;
    assert_holds(models, &source.all()).await;

    // A rebuild with `restart` discards a half-built generation and starts a new one.
    let generation = models
        .prepare_generation(ProjectionName::AccountHistory, false)
        .await
        .expect("a generation");
    assert_eq!(generation, 3);
    let restarted = models
        .prepare_generation(ProjectionName::AccountHistory, true)
        .await
        .expect("a restarted generation");
    assert_eq!(restarted, 4);
    let error = models
        .switch(&[(ProjectionName::AccountHistory, 3)], &source, 100)
        .await
        .expect_err("a generation no longer being built is not switched");
    assert!(
        error.to_string().contains("no longer being built"),
        "{error}"
    );
}

/// A rebuild killed between its projections' commits (PostgreSQL commits each projection's
/// batch in a transaction of its own) leaves them at different checkpoints; the next run reads
/// from the lowest and applies to each only what it has not applied.
pub async fn a_rebuild_resumes_each_projection_from_its_own_checkpoint(models: &dyn ReadModels) {
    let builder = build_log(300, 5);
    let source = Events::new(&builder.rows, &builder.metadata);
    let names = ProjectionName::ALL;
    let (lock, building) = start_rebuild(models, &names).await;
    let all = source.all();
    // The interrupted run: accounts got two batches, transactions one, account_history none.
    for (projection, from, to) in [(0, 0, 45), (0, 45, 90), (1, 0, 45)] {
        let batch = crate::model::DecodedBatch::new(all[from..to].to_vec()).expect("decodes");
        models
            .apply_building(&building[projection..=projection], &batch)
            .await
            .expect("a rebuild batch applies");
    }
    let mut checkpoints = Vec::new();
    for (name, generation) in &building {
        let checkpoint = models.checkpoint(*name, *generation).await;
        checkpoints.push(checkpoint.expect("checkpoint").position);
    }
    assert_eq!(
        checkpoints,
        vec![all[89].position, all[44].position, LogPosition::START],
        "{names:?} stopped at different events"
    );
    // The resumed run reads from the lowest checkpoint, the start, and applies the whole log.
    let rest = crate::model::DecodedBatch::new(all.clone()).expect("decodes");
    let applied = models
        .apply_building(&building, &rest)
        .await
        .expect("the resumed batch applies");
    assert_eq!(
        applied,
        (all.len() - 90) + (all.len() - 45) + all.len(),
        "each projection applies only the events after its own checkpoint"
    );
    models
        .switch(&building, &source, 100)
        .await
        .expect("the switch");
    lock.release().await;
    assert_holds(models, &all).await;
}

/// Takes the rebuild lock of `names` and prepares the generation each builds.
async fn start_rebuild(
    models: &dyn ReadModels,
    names: &[ProjectionName],
) -> (Box<dyn super::RebuildLock>, Vec<(ProjectionName, i32)>) {
    let lock = models.lock_rebuilds(names).await.expect("the rebuild lock");
    let mut building = Vec::new();
    for name in names {
        let generation = models
            .prepare_generation(*name, false)
            .await
            .expect("a generation to build");
        building.push((*name, generation));
    }
    (lock, building)
}

pub async fn one_rebuild_at_a_time(models: &dyn ReadModels) {
    let lock = models
        .lock_rebuilds(&[ProjectionName::Accounts])
        .await
        .expect("the first rebuild locks");
    let error = models
        .lock_rebuilds(&[ProjectionName::Accounts])
        .await
        .err()
        .expect("a second rebuild is refused");
    assert!(error.to_string().contains("another rebuild"), "{error}");
    lock.release().await;
    let again = models
        .lock_rebuilds(&[ProjectionName::Accounts])
        .await
        .expect("free again once released");
    again.release().await;
}
