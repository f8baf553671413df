//! `ledger verify`: the SPEC §8 audit of the whole log, and every read-model row compared with
//! the row the log implies. The read models are read from one REPEATABLE READ snapshot (rows and
//! checkpoints together); the log is folded in memory with the projections' own fold, through
//! the domain's `apply`, each projection up to its own checkpoint, then compared row by row.

use std::collections::BTreeMap;
use std::fmt::Debug;

use domain::audit::{Audit, AuditReport};
use infra::codec::DomainEvent;
use infra::eventlog::RecordedEvent;
use infra::log::LogPosition;
use sqlx::{PgConnection, PgPool};

use crate::error::Result;
use crate::generations;
use crate::model::accounts::AccountsModel;
use crate::model::history::HistoryModel;
use crate::model::transactions::TransactionsModel;
use crate::model::{Db, Decoded, Model, ProjectionName, unprojectable};
use crate::store::{EventSource, PgReadModels, ReadModels, Stored, StoredModels};

/// One read-model row that differs from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub projection: ProjectionName,
    /// The row's key: an account id, a transaction id, or `account/transaction` for history.
    pub key: String,
    /// What the log implies (`None`: the row should not exist).
    pub expected: Option<String>,
    /// What the table holds (`None`: the row is missing).
    pub found: Option<String>,
}

/// What `verify` found.
#[derive(Debug)]
pub struct VerifyReport {
    pub audit: AuditReport,
    pub differences: Vec<Difference>,
    /// Per projection: its live generation, checkpoint and how many rows were compared.
    pub projections: Vec<(ProjectionName, i32, LogPosition, usize)>,
    pub events: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.audit.is_clean() && self.differences.is_empty()
    }
}

/// Events folded so far, for progress bars.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// Verifies the log (`events_pool`, `events_table`) and the read models (`read_pool`), both in
/// PostgreSQL.
pub async fn verify(
    read_pool: &PgPool,
    events_pool: &PgPool,
    events_table: &str,
    progress: Progress<'_>,
) -> Result<VerifyReport> {
    // 1. The read models and their checkpoints, from one snapshot.
    let stored = PgReadModels::new(read_pool.clone()).stored().await?;
    // 2. The log, folded through the audit and through each projection up to its checkpoint.
    let mut folding = Folding::new(&stored.checkpoints);
    infra::replay::for_each_committed(events_pool, events_table, None, |batch| {
        folding.fold(batch);
        progress(folding.events);
    })
    .await?;
    // 3. Row by row.
    Ok(folding.finish(&stored))
}

/// Events per read of the log when verifying through an [`EventSource`].
const VERIFY_BATCH: usize = 5_000;

/// Verifies the log (any source: `LogSource(&log)` of any [`infra::eventlog::EventLog`], e.g.
/// the embedded mode's SQLite log) and the read models in `models` (either store): what
/// `ledger verify --data DIR` runs.
pub async fn verify_in(
    models: &dyn ReadModels,
    source: &dyn EventSource,
    progress: Progress<'_>,
) -> Result<VerifyReport> {
    let stored = models.stored().await?;
    let mut folding = Folding::new(&stored.checkpoints);
    let mut after = LogPosition::START;
    loop {
        let batch = source.read_after(after, VERIFY_BATCH).await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = last.position;
        folding.fold(&batch);
        progress(folding.events);
    }
    Ok(folding.finish(&stored))
}

/// Every live projection's rows and hidden state with the checkpoints, inside the store's
/// snapshot transaction. The generations' own tables are read, not the views: on PostgreSQL,
/// catalog lookups do not follow the snapshot, so a view re-pointed by a switch committing
/// meanwhile would show another generation than the checkpoint read first.
pub(crate) async fn load_stored(db: &mut Db<'_>) -> Result<StoredModels> {
    let checkpoints = generations::live_checkpoints(db).await?;
    let generation = |name: ProjectionName| {
        checkpoints
            .iter()
            .find(|(projection, _, _)| *projection == name)
            .map_or(1, |(_, generation, _)| *generation)
    };
    let accounts = load::<AccountsModel>(db, ProjectionName::Accounts, &generation).await?;
    let transactions =
        load::<TransactionsModel>(db, ProjectionName::Transactions, &generation).await?;
    let history = load::<HistoryModel>(db, ProjectionName::AccountHistory, &generation).await?;
    Ok(StoredModels {
        checkpoints,
        accounts,
        transactions,
        history,
    })
}

async fn load<M: Model>(
    db: &mut Db<'_>,
    name: ProjectionName,
    generation: &impl Fn(ProjectionName) -> i32,
) -> Result<Stored<M::Record>> {
    let generation = generation(name);
    let table = name.tables()[0].table(generation);
    Ok(Stored {
        records: M::load_records(db, &table).await?,
        hidden: M::load_hidden(db, generation).await?,
    })
}

/// The log folded through the audit and through each projection up to its checkpoint.
struct Folding {
    audit: Audit,
    unreadable: Vec<domain::audit::Violation>,
    accounts: Replay<AccountsModel>,
    transactions: Replay<TransactionsModel>,
    history: Replay<HistoryModel>,
    events: u64,
}

impl Folding {
    fn new(checkpoints: &[(ProjectionName, i32, LogPosition)]) -> Self {
        let at = |name: ProjectionName| {
            checkpoints
                .iter()
                .find(|(projection, _, _)| *projection == name)
                .map_or(LogPosition::START, |(_, _, position)| *position)
        };
        Folding {
            audit: Audit::new(),
            unreadable: Vec::new(),
            accounts: Replay::new(at(ProjectionName::Accounts)),
            transactions: Replay::new(at(ProjectionName::Transactions)),
            history: Replay::new(at(ProjectionName::AccountHistory)),
            events: 0,
        }
    }

    fn fold(&mut self, batch: &[RecordedEvent]) {
        for event in batch {
            // Decoded once, folded four times.
            let decoded = infra::codec::decode(event);
            infra::replay::audit_decoded(&mut self.audit, event, &decoded, &mut self.unreadable);
            self.accounts.fold(event, &decoded);
            self.transactions.fold(event, &decoded);
            self.history.fold(event, &decoded);
        }
        self.events += batch.len() as u64;
    }

    fn finish(self, stored: &StoredModels) -> VerifyReport {
        let mut report = self.audit.finish();
        report.violations.extend(self.unreadable);
        let mut differences = Vec::new();
        let mut projections = Vec::new();
        for (name, generation, position) in &stored.checkpoints {
            let compared = match name {
                ProjectionName::Accounts => {
                    self.accounts
                        .compare(*name, &stored.accounts, &mut differences)
                }
                ProjectionName::Transactions => {
                    self.transactions
                        .compare(*name, &stored.transactions, &mut differences)
                }
                ProjectionName::AccountHistory => {
                    self.history
                        .compare(*name, &stored.history, &mut differences)
                }
            };
            projections.push((*name, *generation, *position, compared));
        }
        VerifyReport {
            audit: report,
            differences,
            projections,
            events: self.events,
        }
    }
}

/// One projection folded in memory up to a checkpoint; an event it cannot fold is a difference.
struct Replay<M: Model> {
    model: M,
    until: LogPosition,
    applied: i64,
    failures: Vec<String>,
}

impl<M: Model> Replay<M> {
    fn new(until: LogPosition) -> Self {
        Replay {
            model: M::default(),
            until,
            applied: 0,
            failures: Vec::new(),
        }
    }

    fn fold(&mut self, event: &RecordedEvent, decoded: &Result<DomainEvent, String>) {
        if event.position > self.until {
            return;
        }
        self.applied += 1;
        let folded = match decoded {
            Ok(domain_event) => self.model.fold(&Decoded {
                log: event,
                event: domain_event,
                ordinal: self.applied,
            }),
            Err(problem) => Err(unprojectable(event, problem.clone())),
        };
        if let Err(error) = folded {
            self.failures.push(error.to_string());
        }
    }

    fn compare(
        &self,
        name: ProjectionName,
        stored: &Stored<M::Record>,
        differences: &mut Vec<Difference>,
    ) -> usize {
        for failure in &self.failures {
            differences.push(Difference {
                projection: name,
                key: "log".to_owned(),
                expected: None,
                found: Some(failure.clone()),
            });
        }
        compare_records(name, &self.model.records(), &stored.records, differences);
        compare_records(name, &self.model.hidden(), &stored.hidden, differences);
        stored.records.len()
    }
}

fn compare_records<R: PartialEq + Debug>(
    name: ProjectionName,
    expected: &BTreeMap<String, R>,
    stored: &BTreeMap<String, R>,
    differences: &mut Vec<Difference>,
) {
    for (key, want) in expected {
        match stored.get(key) {
            Some(found) if found == want => {}
            found => differences.push(Difference {
                projection: name,
                key: key.clone(),
                expected: Some(format!("{want:?}")),
                found: found.map(|found| format!("{found:?}")),
            }),
        }
    }
    for (key, found) in stored {
        if !expected.contains_key(key) {
            differences.push(Difference {
                projection: name,
                key: key.clone(),
                expected: None,
                found: Some(format!("{found:?}")),
            });
        }
    }
}

/// Every row of a projection's live main table, rendered for comparison: what a rebuild must
/// reproduce exactly.
pub async fn live_rows(connection: &mut PgConnection, name: ProjectionName) -> Result<Vec<String>> {
    crate::store::queries::live_rows(&mut Db::Pg(connection), name).await
}
