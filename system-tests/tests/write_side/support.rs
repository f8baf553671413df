//! The write side's helpers: command-api's harness (`command_api::testing::harness`) and what
//! only a cross-service test can add to it, the SPEC §8 audit of the log a scenario leaves
//! behind with the projector's rebuild and verify of it.

use command_api::replay;
use domain::audit::AuditReport;
use uuid::Uuid;

pub use command_api::testing::harness::*;

/// The checks over a scenario's whole log, on the harness.
pub trait Audited {
    async fn audit(&self) -> AuditReport;
    /// Asserts SPEC §8 over the whole log: no violation, nothing in flight.
    async fn assert_invariants(&self) -> AuditReport;
    /// Builds the projector's read models from this scenario's log (a rebuild of each
    /// projection, in small batches) and runs `ledger verify`'s check on them: every log an
    /// integration scenario leaves behind projects and verifies cleanly.
    async fn assert_read_models_verify(&self);
}

impl Audited for Harness {
    async fn audit(&self) -> AuditReport {
        replay::audit(&self.app.pool, "command_api.events")
            .await
            .expect("the log can be audited")
    }

    async fn assert_invariants(&self) -> AuditReport {
        let report = self.audit().await;
        assert!(
            report.violations.is_empty(),
            "invariants broken: {:#?}",
            report.violations
        );
        assert!(
            report.in_flight.is_empty(),
            "transactions still in flight: {:?}",
            report.in_flight
        );
        self.assert_read_models_verify().await;
        report
    }

    async fn assert_read_models_verify(&self) {
        let read_pool = projector::startup::connect_read_models(&self.app.database_url, 2)
            .await
            .expect("the read models' schema is created");
        let log = infra::eventlog::postgres::PgEventLog::open(
            self.app.pool.clone(),
            infra::eventlog::postgres::PgEventLogOptions {
                listen: false,
                ..infra::eventlog::postgres::PgEventLogOptions::reader("command_api.events")
            },
        )
        .await
        .expect("the log opens");
        projector::rebuild::rebuild(
            &read_pool,
            &log,
            &projector::model::ProjectionName::ALL,
            projector::rebuild::RebuildOptions {
                batch_size: 97,
                restart: false,
            },
            |_| {},
        )
        .await
        .expect("the projections rebuild from the log");
        let report = projector::verify::verify(
            &read_pool,
            &self.app.pool,
            "command_api.events",
            &mut |_| {},
        )
        .await
        .expect("verify runs");
        assert!(
            report.differences.is_empty(),
            "read models differ from the log: {:#?}",
            &report.differences[..report.differences.len().min(5)]
        );
        read_pool.close().await;
    }
}

/// The available balance of an account, from the audit of its stream.
pub fn balance_of(report: &AuditReport, account: Uuid) -> (i64, i64) {
    let state = &report.accounts[&domain::AccountId(account)];
    (state.balance_minor, state.available_minor())
}
