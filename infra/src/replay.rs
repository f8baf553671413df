//! The whole log as the domain sees it: folding a consistent snapshot of every committed event
//! through the domain's audit (SPEC §8), for the write side's tests, the projector's
//! verification and the `ledger` CLI. Decoding is [`crate::codec`]'s.

use domain::audit::{Audit, AuditReport, Violation};
use sqlx::PgPool;

pub use crate::codec::{ACCOUNT_STREAM, DomainEvent, EVENT_VERSION, TRANSACTION_STREAM, decode};
use crate::error::{DatabaseContext, Result};
use crate::eventlog::RecordedEvent;
use crate::eventlog::postgres::read_in_snapshot;
use crate::log::LogPosition;

/// Events read per round trip while folding the whole log.
const SNAPSHOT_BATCH: i64 = 5_000;

/// Reads every event committed when the read starts, in commit order, through the event-log
/// seam (any store), batch by batch; stops after `until` when given. The log is append-only in
/// commit order, so reading up to the head taken at the start is a consistent cut.
pub async fn for_each_committed_in(
    log: &dyn crate::eventlog::EventLog,
    until: Option<LogPosition>,
    mut each_batch: impl FnMut(&[RecordedEvent]),
) -> Result<LogPosition> {
    let head = log.head().await?;
    let until = until.map_or(head, |until| until.min(head));
    let mut after = LogPosition::START;
    while after < until {
        let mut events = log
            .read_all(
                after,
                SNAPSHOT_BATCH as usize,
                crate::eventlog::LogFilter::ALL,
            )
            .await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        events.retain(|event| event.position <= until);
        each_batch(&events);
    }
    Ok(after)
}

/// Reads every event committed when the read starts, in commit order, from one REPEATABLE READ
/// snapshot (a follower's visibility bound would hide the newest events while any transaction
/// in the cluster is open), handing them over batch by batch. Stops after `until` when given.
pub async fn for_each_committed(
    pool: &PgPool,
    events_table: &str,
    until: Option<LogPosition>,
    mut each_batch: impl FnMut(&[RecordedEvent]),
) -> Result<LogPosition> {
    let mut snapshot = pool.begin().await.context("starting a log snapshot")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await
        .context("starting a log snapshot")?;
    let mut after = LogPosition::START;
    loop {
        let mut events =
            read_in_snapshot(&mut snapshot, events_table, after, SNAPSHOT_BATCH).await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        if let Some(until) = until {
            events.retain(|event| event.position <= until);
        }
        each_batch(&events);
        if until.is_some_and(|until| after >= until) {
            break;
        }
    }
    snapshot.commit().await.context("ending a log snapshot")?;
    Ok(after)
}

/// Folds one stored event into an audit; an unreadable one becomes a violation.
pub fn audit_event(audit: &mut Audit, event: &RecordedEvent, unreadable: &mut Vec<Violation>) {
    audit_decoded(audit, event, &decode(event), unreadable);
}

/// [`audit_event`] for an event already decoded (by a caller that folds it elsewhere too).
pub fn audit_decoded(
    audit: &mut Audit,
    event: &RecordedEvent,
    decoded: &Result<DomainEvent, String>,
    unreadable: &mut Vec<Violation>,
) {
    let sequence = event.sequence;
    match decoded {
        Ok(DomainEvent::Account(id, payload)) => audit.account_event(*id, sequence, payload),
        Ok(DomainEvent::Transaction(id, payload)) => {
            audit.transaction_event(*id, sequence, payload)
        }
        Err(problem) => unreadable.push(Violation {
            stream: event.stream.to_string(),
            sequence: Some(sequence),
            problem: format!("unreadable event: {problem}"),
        }),
    }
}

/// Audits every event committed when the audit starts (SPEC §8). Events that cannot be read at
/// all are reported as violations, not errors.
pub async fn audit(pool: &PgPool, events_table: &str) -> Result<AuditReport> {
    let mut audit = Audit::new();
    let mut unreadable = Vec::new();
    for_each_committed(pool, events_table, None, |events| {
        for event in events {
            audit_event(&mut audit, event, &mut unreadable);
        }
    })
    .await?;
    let mut report = audit.finish();
    report.violations.extend(unreadable);
    Ok(report)
}
