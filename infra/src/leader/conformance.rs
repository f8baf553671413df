//! The leadership conformance suite: one set of checks every [`Leadership`] passes (PostgreSQL
//! advisory locks; the embedded mode's in-process locks). Each check takes two handles that
//! contend as two instances would (two processes on one database; two tasks of `ledger serve`)
//! and panics with what it found.
//!
//! An implementation's tests instantiate the suite with [`leadership_conformance!`], giving it an
//! async function that returns the two handles:
//!
//! ```ignore
//! infra::leadership_conformance!(two_instances);
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Leadership, Lease};

/// How long a check waits for something that must happen (a standby taking over): far above
/// any implementation's retry interval, so only a real failure reaches it.
const MUST_HAPPEN: Duration = Duration::from_secs(15);

/// How long a check watches for something that must not happen (a second holder). A lock that
/// lets a second holder in does so at its first retry; this covers two of the slowest retries.
const MUST_NOT_HAPPEN: Duration = Duration::from_millis(2_500);

/// How soon a cancelled standby must return: a standby that ignored its cancellation would
/// keep trying forever, one that waits out its current retry (a second) still passes.
const PROMPTLY: Duration = Duration::from_secs(3);

/// Instantiates every check of the suite as a `#[tokio::test]`, each on handles from `$fresh`,
/// an `async fn() -> (Arc<dyn Leadership>, Arc<dyn Leadership>)`.
#[macro_export]
macro_rules! leadership_conformance {
    ($fresh:path) => {
        $crate::leadership_conformance!(@checks $fresh;
            one_holder_at_a_time_and_a_standby_takes_over,
            names_are_independent,
            a_cancelled_standby_gives_up_at_once,
            a_lease_given_up_can_be_taken_again_by_its_instance
        );
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (first, second) = $fresh().await;
                $crate::leader::conformance::$check(first, second).await;
            }
        )*
    };
}

/// A name no other test uses: advisory locks are shared by every test on the server.
fn fresh_name() -> String {
    format!("conformance-{}", Uuid::new_v4().simple())
}

async fn acquire(leadership: &dyn Leadership, name: &str) -> Box<dyn Lease> {
    tokio::time::timeout(
        MUST_HAPPEN,
        leadership.acquire(name, &CancellationToken::new()),
    )
    .await
    .unwrap_or_else(|_| panic!("{name} was not acquired within {MUST_HAPPEN:?}"))
    .expect("acquiring works")
    .expect("not cancelled")
}

/// While one instance leads a name, the other waits; when the leader gives it up (drops its
/// lease, as a stopped or killed instance does), the waiting one leads.
pub async fn one_holder_at_a_time_and_a_standby_takes_over(
    first: Arc<dyn Leadership>,
    second: Arc<dyn Leadership>,
) {
    let name = fresh_name();
    let mut leader = acquire(first.as_ref(), &name).await;
    assert!(leader.still_held().await, "a fresh lease is held");
    let standby = tokio::spawn({
        let name = name.clone();
        async move { acquire(second.as_ref(), &name).await }
    });
    tokio::time::sleep(MUST_NOT_HAPPEN).await;
    assert!(
        !standby.is_finished(),
        "a second instance took {name} while the first held it"
    );
    assert!(leader.still_held().await, "the first still holds it");
    drop(leader);
    let mut successor = standby.await.expect("the standby did not panic");
    assert!(successor.still_held().await, "the standby now holds it");
}

/// Holding one name does not hold another.
pub async fn names_are_independent(first: Arc<dyn Leadership>, second: Arc<dyn Leadership>) {
    let (saga, relay) = (fresh_name(), fresh_name());
    let _saga = acquire(first.as_ref(), &saga).await;
    let mut relay = acquire(second.as_ref(), &relay).await;
    assert!(relay.still_held().await);
}

/// A standby whose instance stops returns `None` promptly, leadership untouched.
pub async fn a_cancelled_standby_gives_up_at_once(
    first: Arc<dyn Leadership>,
    second: Arc<dyn Leadership>,
) {
    let name = fresh_name();
    let mut leader = acquire(first.as_ref(), &name).await;
    let cancel = CancellationToken::new();
    let standby = tokio::spawn({
        let (name, cancel) = (name.clone(), cancel.clone());
        async move { second.acquire(&name, &cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    // Promptly: well within one of the slowest retry intervals after the cancellation.
    let outcome = tokio::time::timeout(PROMPTLY, standby)
        .await
        .expect("a cancelled standby returns promptly")
        .expect("it did not panic")
        .expect("no error");
    assert!(outcome.is_none(), "a cancelled standby got a lease");
    assert!(leader.still_held().await, "the leader kept it");
}

/// An instance that gave a name up can lead it again (a follower whose session ended starts a
/// new one), and the other instance is kept out meanwhile.
pub async fn a_lease_given_up_can_be_taken_again_by_its_instance(
    first: Arc<dyn Leadership>,
    second: Arc<dyn Leadership>,
) {
    let name = fresh_name();
    drop(acquire(first.as_ref(), &name).await);
    let mut again = acquire(first.as_ref(), &name).await;
    assert!(again.still_held().await);
    let cancel = CancellationToken::new();
    let other = tokio::spawn({
        let (name, cancel) = (name.clone(), cancel.clone());
        async move { second.acquire(&name, &cancel).await }
    });
    tokio::time::sleep(MUST_NOT_HAPPEN).await;
    assert!(
        !other.is_finished(),
        "the other instance took {name} while it was held again"
    );
    cancel.cancel();
    let outcome = other.await.expect("no panic").expect("no error");
    assert!(outcome.is_none());
}
