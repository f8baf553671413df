//! Reads the event store in commit order and folds it through the domain's audit: the SPEC §8
//! check the integration tests run after every scenario, and the core `ledger verify` builds on.

use domain::audit::{Audit, AuditReport, Violation};
use domain::{AccountEvent, AccountId, TransactionEvent, TransactionId};
use infra::log::{LogPosition, LogReader};
use sqlx::PgPool;
use uuid::Uuid;

use crate::aggregates::{AccountAggregate, TransactionAggregate};
use crate::error::{DatabaseContext, Result};

/// Events read per round trip while auditing.
const AUDIT_BATCH: i64 = 5_000;

/// Audits every event committed when the audit starts, read in commit order from one
/// REPEATABLE READ snapshot (a follower's visibility bound would hide the newest events while any
/// transaction in the cluster is open). Events that cannot be read at all are reported as
/// violations, not errors.
pub async fn audit(pool: &PgPool, events_table: &str) -> Result<AuditReport> {
    use cqrs_es::Aggregate;
    let reader = LogReader::new(pool.clone(), events_table);
    let mut audit = Audit::new();
    let mut unreadable = Vec::new();
    let mut snapshot = pool.begin().await.context("starting the audit snapshot")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await
        .context("starting the audit snapshot")?;
    let mut after = LogPosition::START;
    loop {
        let events = reader
            .read_snapshot_after(&mut snapshot, after, AUDIT_BATCH)
            .await?;
        let Some(last) = events.last() else {
            break;
        };
        after = last.position;
        for event in &events {
            let sequence = u64::try_from(event.sequence).unwrap_or(0);
            let id = Uuid::parse_str(&event.aggregate_id);
            let folded = match (event.aggregate_type.as_str(), id) {
                (AccountAggregate::TYPE, Ok(id)) => {
                    serde_json::from_value::<AccountEvent>(event.payload.clone())
                        .map(|payload| audit.account_event(AccountId(id), sequence, &payload))
                        .map_err(|error| error.to_string())
                }
                (TransactionAggregate::TYPE, Ok(id)) => {
                    serde_json::from_value::<TransactionEvent>(event.payload.clone())
                        .map(|payload| {
                            audit.transaction_event(TransactionId(id), sequence, &payload)
                        })
                        .map_err(|error| error.to_string())
                }
                (kind, _) => Err(format!("unknown stream {kind}/{}", event.aggregate_id)),
            };
            if let Err(problem) = folded {
                unreadable.push(Violation {
                    stream: format!("{}/{}", event.aggregate_type, event.aggregate_id),
                    sequence: Some(sequence),
                    problem: format!("unreadable event: {problem}"),
                });
            }
        }
    }
    snapshot
        .commit()
        .await
        .context("ending the audit snapshot")?;
    let mut report = audit.finish();
    report.violations.extend(unreadable);
    Ok(report)
}
