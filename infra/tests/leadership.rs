//! The leadership conformance suite (`infra::leadership_conformance!`) against both
//! implementations: PostgreSQL advisory locks (two `PgLeadership`s, as two instances on one
//! database; every check uses lock names of its own) and the embedded mode's in-process locks.

use std::sync::Arc;

use infra::leader::{Leadership, LocalLeadership, PgLeadership};

mod postgres {
    use super::*;

    fn instance() -> Arc<dyn Leadership> {
        let options = infra::db::connect_options(&infra::testing::admin_url(), "public")
            .expect("the test server's options");
        Arc::new(PgLeadership::new(options))
    }

    async fn two_instances() -> (Arc<dyn Leadership>, Arc<dyn Leadership>) {
        (instance(), instance())
    }

    infra::leadership_conformance!(two_instances);

    #[tokio::test]
    async fn a_lease_whose_session_ended_says_so() {
        // Proves a leader notices it lost its lock: the session holding it is terminated (as a
        // database restart or a network cut would end it), and `still_held` answers false.
        let leadership = instance();
        let name = format!("lost-{}", uuid::Uuid::new_v4().simple());
        let mut lease = leadership
            .acquire(&name, &tokio_util::sync::CancellationToken::new())
            .await
            .expect("acquires")
            .expect("not cancelled");
        assert!(lease.still_held().await);
        let admin = sqlx::PgPool::connect(&infra::testing::admin_url())
            .await
            .expect("connects");
        // pg_locks shows a bigint advisory key as two oids: its high and its low 32 bits.
        let key =
            u64::from_ne_bytes(infra::db::advisory_key(&format!("leader/{name}")).to_ne_bytes());
        let (high, low) = (i64::from((key >> 32) as u32), i64::from(key as u32));
        let terminated: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = $1::oid AND objid = $2::oid \
             AND objsubid = 1) t",
        )
        .bind(high)
        .bind(low)
        .fetch_one(&admin)
        .await
        .expect("terminates the holder");
        assert_eq!(terminated, 1, "one session held the lock");
        let mut lost = false;
        for _ in 0..50 {
            if !lease.still_held().await {
                lost = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(lost, "the lease still says it is held");
        admin.close().await;
    }
}

mod local {
    use super::*;

    async fn two_instances() -> (Arc<dyn Leadership>, Arc<dyn Leadership>) {
        let leadership = LocalLeadership::default();
        (Arc::new(leadership.clone()), Arc::new(leadership))
    }

    infra::leadership_conformance!(two_instances);
}
