//! `ledger verify`: the SPEC §8 audit of the whole log, and every read-model row compared with
//! the row the log implies. The read models are read from one REPEATABLE READ snapshot (rows and
//! checkpoints together); the log is folded in memory with the projections' own fold, through
//! the domain's `apply`, each projection up to its own checkpoint, then compared row by row.

use std::collections::BTreeMap;
use std::fmt::Debug;

use domain::audit::{Audit, AuditReport};
use infra::codec::DomainEvent;
use infra::error::DatabaseContext;
use infra::eventlog::RecordedEvent;
use infra::log::LogPosition;
use sqlx::{PgConnection, PgPool};

use crate::error::Result;
use crate::generations;
use crate::model::accounts::AccountsModel;
use crate::model::history::HistoryModel;
use crate::model::transactions::TransactionsModel;
use crate::model::{Decoded, Model, ProjectionName, unprojectable};

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

/// Verifies the log (`events_pool`, `events_table`) and the read models (`read_pool`).
pub async fn verify(
    read_pool: &PgPool,
    events_pool: &PgPool,
    events_table: &str,
    progress: Progress<'_>,
) -> Result<VerifyReport> {
    // 1. The read models and their checkpoints, from one snapshot.
    let mut snapshot = read_pool
        .begin()
        .await
        .context("starting the read-model snapshot")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await
        .context("starting the read-model snapshot")?;
    let checkpoints = generations::live_checkpoints(&mut snapshot).await?;
    let at = |name: ProjectionName| {
        checkpoints
            .iter()
            .find(|(projection, _, _)| *projection == name)
            .map_or(LogPosition::START, |(_, _, position)| *position)
    };
    // The generations' own tables, not the views: catalog lookups do not follow the snapshot,
    // so a view re-pointed by a switch committing meanwhile would show another generation than
    // the checkpoint read above.
    let generation = |name: ProjectionName| {
        checkpoints
            .iter()
            .find(|(projection, _, _)| *projection == name)
            .map_or(1, |(_, generation, _)| *generation)
    };
    let table = |name: ProjectionName| name.tables()[0].table(generation(name));
    let stored_accounts = Stored::<AccountsModel>::load(
        &mut snapshot,
        generation(ProjectionName::Accounts),
        &table(ProjectionName::Accounts),
    )
    .await?;
    let stored_transactions = Stored::<TransactionsModel>::load(
        &mut snapshot,
        generation(ProjectionName::Transactions),
        &table(ProjectionName::Transactions),
    )
    .await?;
    let stored_history = Stored::<HistoryModel>::load(
        &mut snapshot,
        generation(ProjectionName::AccountHistory),
        &table(ProjectionName::AccountHistory),
    )
    .await?;
    snapshot
        .commit()
        .await
        .context("ending the read-model snapshot")?;

    // 2. The log, folded through the audit and through each projection up to its checkpoint.
    let mut audit = Audit::new();
    let mut unreadable = Vec::new();
    let mut accounts = Replay::<AccountsModel>::new(at(ProjectionName::Accounts));
    let mut transactions = Replay::<TransactionsModel>::new(at(ProjectionName::Transactions));
    let mut history = Replay::<HistoryModel>::new(at(ProjectionName::AccountHistory));
    let mut events = 0u64;
    infra::replay::for_each_committed(events_pool, events_table, None, |batch| {
        for event in batch {
            // Decoded once, folded four times.
            let decoded = infra::codec::decode(event);
            infra::replay::audit_decoded(&mut audit, event, &decoded, &mut unreadable);
            accounts.fold(event, &decoded);
            transactions.fold(event, &decoded);
            history.fold(event, &decoded);
        }
        events += batch.len() as u64;
        progress(events);
    })
    .await?;
    let mut report = audit.finish();
    report.violations.extend(unreadable);

    // 3. Row by row.
    let mut differences = Vec::new();
    let mut projections = Vec::new();
    for (name, generation, position) in &checkpoints {
        let compared = match name {
            ProjectionName::Accounts => accounts.compare(*name, &stored_accounts, &mut differences),
            ProjectionName::Transactions => {
                transactions.compare(*name, &stored_transactions, &mut differences)
            }
            ProjectionName::AccountHistory => {
                history.compare(*name, &stored_history, &mut differences)
            }
        };
        projections.push((*name, *generation, *position, compared));
    }
    Ok(VerifyReport {
        audit: report,
        differences,
        projections,
        events,
    })
}

/// A projection's stored rows and hidden state, read from one generation.
struct Stored<M: Model> {
    records: BTreeMap<String, M::Record>,
    hidden: BTreeMap<String, String>,
}

impl<M: Model> Stored<M> {
    async fn load(connection: &mut PgConnection, generation: i32, table: &str) -> Result<Self> {
        Ok(Stored {
            records: M::load_records(connection, table).await?,
            hidden: M::load_hidden(connection, generation).await?,
        })
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
        stored: &Stored<M>,
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
    let view = name.tables()[0].name;
    let rows = match name {
        ProjectionName::Accounts => {
            debug_rows(AccountsModel::load_records(connection, view).await?)
        }
        ProjectionName::Transactions => {
            debug_rows(TransactionsModel::load_records(connection, view).await?)
        }
        ProjectionName::AccountHistory => {
            debug_rows(HistoryModel::load_records(connection, view).await?)
        }
    };
    Ok(rows)
}

fn debug_rows<R: Debug>(records: BTreeMap<String, R>) -> Vec<String> {
    records
        .into_iter()
        .map(|(key, record)| format!("{key} {record:?}"))
        .collect()
}
