//! The log as the domain sees it: decoding stored events into domain events, and folding a
//! consistent snapshot of the whole log through the domain's audit (SPEC §8). The write side's
//! tests, the projector's verification and the `ledger` CLI all read the log through here, so
//! there is one decoder of the stored format.
//!
//! The stored payload of an event is exactly the domain event's JSON (command-api's cqrs-es
//! wrappers are `serde(transparent)`), written at `event_version` "1". A future change of an
//! event's meaning gets a new version and an upcaster here; stored events are never rewritten.

use domain::audit::{Audit, AuditReport, Violation};
use domain::{AccountEvent, AccountId, TransactionEvent, TransactionId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{DatabaseContext, Result};
use crate::log::{LogEvent, LogPosition, LogReader};

/// The aggregate type of account streams in the event store.
pub const ACCOUNT_STREAM: &str = "account";
/// The aggregate type of transaction streams in the event store.
pub const TRANSACTION_STREAM: &str = "transaction";
/// The only payload format written so far.
pub const EVENT_VERSION: &str = "1";

/// Events read per round trip while folding the whole log.
const SNAPSHOT_BATCH: i64 = 5_000;

/// A stored event decoded into the domain.
#[derive(Debug, Clone, PartialEq)]
pub enum DomainEvent {
    Account(AccountId, AccountEvent),
    Transaction(TransactionId, TransactionEvent),
}

/// Decodes one stored event, or says why it cannot be read (unknown stream, id, version or
/// payload): data to report, never a panic.
pub fn decode(event: &LogEvent) -> Result<DomainEvent, String> {
    if event.event_version != EVENT_VERSION {
        return Err(format!(
            "unknown event version {:?} of {}",
            event.event_version, event.event_type
        ));
    }
    let id = Uuid::parse_str(&event.aggregate_id)
        .map_err(|error| format!("stream id {:?}: {error}", event.aggregate_id))?;
    match event.aggregate_type.as_str() {
        ACCOUNT_STREAM => serde_json::from_value::<AccountEvent>(event.payload.clone())
            .map(|payload| DomainEvent::Account(AccountId(id), payload))
            .map_err(|error| format!("{}: {error}", event.event_type)),
        TRANSACTION_STREAM => serde_json::from_value::<TransactionEvent>(event.payload.clone())
            .map(|payload| DomainEvent::Transaction(TransactionId(id), payload))
            .map_err(|error| format!("{}: {error}", event.event_type)),
        kind => Err(format!("unknown stream type {kind:?}")),
    }
}

/// Reads every event committed when the read starts, in commit order, from one REPEATABLE READ
/// snapshot (a follower's visibility bound would hide the newest events while any transaction
/// in the cluster is open), handing them over batch by batch. Stops after `until` when given.
pub async fn for_each_committed(
    pool: &PgPool,
    events_table: &str,
    until: Option<LogPosition>,
    mut each_batch: impl FnMut(&[LogEvent]),
) -> Result<LogPosition> {
    let reader = LogReader::new(pool.clone(), events_table);
    let mut snapshot = pool.begin().await.context("starting a log snapshot")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await
        .context("starting a log snapshot")?;
    let mut after = LogPosition::START;
    loop {
        let mut events = reader
            .read_snapshot_after(&mut snapshot, after, SNAPSHOT_BATCH)
            .await?;
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
pub fn audit_event(audit: &mut Audit, event: &LogEvent, unreadable: &mut Vec<Violation>) {
    audit_decoded(audit, event, &decode(event), unreadable);
}

/// [`audit_event`] for an event already decoded (by a caller that folds it elsewhere too).
pub fn audit_decoded(
    audit: &mut Audit,
    event: &LogEvent,
    decoded: &Result<DomainEvent, String>,
    unreadable: &mut Vec<Violation>,
) {
    let sequence = u64::try_from(event.sequence).unwrap_or(0);
    match decoded {
        Ok(DomainEvent::Account(id, payload)) => audit.account_event(*id, sequence, payload),
        Ok(DomainEvent::Transaction(id, payload)) => {
            audit.transaction_event(*id, sequence, payload)
        }
        Err(problem) => unreadable.push(Violation {
            stream: format!("{}/{}", event.aggregate_type, event.aggregate_id),
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
