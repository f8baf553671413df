//! The identities' conformance suite: the rules every [`Identities`] keeps (PostgreSQL,
//! SQLite). Each check takes fresh, empty identities and panics with what it found.
//!
//! An implementation's tests instantiate the whole suite with
//! [`identity_conformance!`](crate::identity_conformance), giving it an async function that
//! opens fresh identities and the value to keep alive (and clean up) while they are used:
//!
//! ```ignore
//! gateway::identity_conformance!(fresh_sqlite_identities);
//! ```

use std::sync::Arc;
use std::time::Duration;

use infra::auth::Role;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::{AdminEnsured, Identities, SESSIONS_PER_USER_MAX};
use crate::error::Error;

/// Instantiates every check as a `#[tokio::test]` on identities from `$fresh`, an
/// `async fn() -> (Arc<dyn gateway::identity::Identities>, G)` where `G` is dropped after the
/// check.
#[macro_export]
macro_rules! identity_conformance {
    ($fresh:path) => {
        $crate::identity_conformance!(@checks $fresh;
            registered_users_have_their_credentials_and_usernames_are_unique,
            racing_registrations_of_one_name_make_one_user,
            roles_are_replaced_and_none_disables,
            the_bootstrap_admin_is_created_once_and_keeps_its_roles,
            a_name_someone_registered_is_never_made_admin,
            racing_starts_agree_on_one_bootstrap_admin,
            a_session_refreshes_with_the_roles_of_now_until_it_ends,
            an_expired_or_unknown_session_does_not_refresh,
            a_user_keeps_a_bounded_number_of_sessions,
            the_store_answers_its_health_check
        );
    };
    (@checks $fresh:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (identities, _keep) = $fresh().await;
                $crate::identity::conformance::$check(identities).await;
            }
        )*
    };
}

/// A stored password hash (the checks store hashes, they never hash).
fn hash(tag: &str) -> String {
    format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ${tag}")
}

/// A username no other check uses.
fn username(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..12])
}

const HOUR: Duration = Duration::from_secs(3_600);

/// A registered customer has its hash and the customer role; its name cannot be registered
/// again, and `username_taken` says so before any hashing.
pub async fn registered_users_have_their_credentials_and_usernames_are_unique(
    identities: Arc<dyn Identities>,
) {
    let name = username("ada");
    assert!(!identities.username_taken(&name).await.expect("looks up"));
    let user = identities
        .register(&name, &hash("one"), Some("Ada Lovelace"))
        .await
        .expect("registers");
    assert_eq!(
        (user.username.as_str(), user.roles.as_slice()),
        (name.as_str(), [Role::Customer].as_slice())
    );
    assert!(identities.username_taken(&name).await.expect("looks up"));
    let credentials = identities
        .credentials(&name)
        .await
        .expect("reads")
        .expect("the user exists");
    assert_eq!(credentials.customer_id, user.customer_id);
    assert_eq!(credentials.password_hash, hash("one"));
    assert_eq!(credentials.roles, vec![Role::Customer]);
    let again = identities.register(&name, &hash("two"), None).await;
    assert!(
        matches!(again, Err(Error::UsernameTaken)),
        "a second registration of one name: {again:?}"
    );
    let unchanged = identities
        .credentials(&name)
        .await
        .expect("reads")
        .expect("the user exists");
    assert_eq!(
        unchanged.password_hash,
        hash("one"),
        "the first user was changed"
    );
    assert!(
        identities
            .credentials(&username("nobody"))
            .await
            .expect("reads")
            .is_none()
    );
}

/// Registrations of one name racing each other make one user; the others are told it is taken.
pub async fn racing_registrations_of_one_name_make_one_user(identities: Arc<dyn Identities>) {
    let name = username("race");
    let attempts = (0..6).map(|index| {
        let identities = identities.clone();
        let name = name.clone();
        tokio::spawn(async move {
            identities
                .register(&name, &hash(&format!("h{index}")), None)
                .await
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut registered = 0;
    for result in results {
        match result.expect("an attempt finished") {
            Ok(_) => registered += 1,
            Err(Error::UsernameTaken) => {}
            Err(other) => panic!("a racing registration failed otherwise: {other}"),
        }
    }
    assert_eq!(registered, 1);
}

/// Roles are replaced as given (duplicates are the caller's to remove); none disables the user,
/// who keeps existing; an unknown customer id is `None`.
pub async fn roles_are_replaced_and_none_disables(identities: Arc<dyn Identities>) {
    let name = username("eve");
    let user = identities
        .register(&name, &hash("eve"), None)
        .await
        .expect("registers");
    let changed = identities
        .set_roles(user.customer_id, &[Role::Auditor, Role::Operator])
        .await
        .expect("sets")
        .expect("the user exists");
    assert_eq!(changed.roles, vec![Role::Auditor, Role::Operator]);
    assert_eq!(changed.username, name);
    let credentials = identities.credentials(&name).await.expect("reads");
    assert_eq!(
        credentials.map(|found| found.roles),
        Some(vec![Role::Auditor, Role::Operator])
    );
    let disabled = identities
        .set_roles(user.customer_id, &[])
        .await
        .expect("sets")
        .expect("the user exists");
    assert!(disabled.roles.is_empty());
    let credentials = identities.credentials(&name).await.expect("reads");
    assert_eq!(credentials.map(|found| found.roles), Some(vec![]));
    assert!(
        identities
            .set_roles(Uuid::new_v4(), &[Role::Admin])
            .await
            .expect("answers")
            .is_none()
    );
}

/// The first start creates the bootstrap admin; later starts set its password again and give
/// the admin role back if it lost it, keeping the other roles it was given.
pub async fn the_bootstrap_admin_is_created_once_and_keeps_its_roles(
    identities: Arc<dyn Identities>,
) {
    let name = username("root");
    let AdminEnsured::Ensured { admin, created } = identities
        .ensure_admin(&name, &hash("first"))
        .await
        .expect("ensures")
    else {
        panic!("a fresh name conflicted");
    };
    assert!(created);
    assert_eq!(admin.roles, vec![Role::Admin]);
    let AdminEnsured::Ensured {
        admin: again,
        created,
    } = identities
        .ensure_admin(&name, &hash("second"))
        .await
        .expect("ensures")
    else {
        panic!("the bootstrap admin conflicted with itself");
    };
    assert!(!created);
    assert_eq!(again.customer_id, admin.customer_id);
    let credentials = identities
        .credentials(&name)
        .await
        .expect("reads")
        .expect("the admin exists");
    assert_eq!(
        credentials.password_hash,
        hash("second"),
        "the password is set again"
    );
    identities
        .set_roles(admin.customer_id, &[Role::Auditor])
        .await
        .expect("sets");
    let AdminEnsured::Ensured {
        admin: restored, ..
    } = identities
        .ensure_admin(&name, &hash("third"))
        .await
        .expect("ensures")
    else {
        panic!("the bootstrap admin conflicted with itself");
    };
    assert_eq!(restored.roles, vec![Role::Auditor, Role::Admin]);
    let credentials = identities.credentials(&name).await.expect("reads");
    assert_eq!(
        credentials.map(|found| found.roles),
        Some(vec![Role::Auditor, Role::Admin])
    );
}

/// `ADMIN_USERNAME` naming a customer who registered it is a conflict naming that customer, who
/// is left exactly as it was (no admin role, its own password).
pub async fn a_name_someone_registered_is_never_made_admin(identities: Arc<dyn Identities>) {
    let name = username("boss");
    let squatter = identities
        .register(&name, &hash("squatter"), None)
        .await
        .expect("registers");
    let ensured = identities
        .ensure_admin(&name, &hash("admin"))
        .await
        .expect("answers");
    let AdminEnsured::Conflict { customer_id } = ensured else {
        panic!("a registered customer was made the bootstrap admin: {ensured:?}");
    };
    assert_eq!(customer_id, squatter.customer_id);
    let credentials = identities
        .credentials(&name)
        .await
        .expect("reads")
        .expect("the customer exists");
    assert_eq!(credentials.password_hash, hash("squatter"));
    assert_eq!(credentials.roles, vec![Role::Customer]);
    assert!(
        identities
            .how_to_mark_bootstrap_admin(customer_id)
            .contains(&customer_id.to_string())
    );
}

/// Several instances starting together ensure one admin: one creates it, all name the same user.
pub async fn racing_starts_agree_on_one_bootstrap_admin(identities: Arc<dyn Identities>) {
    let name = username("boot");
    let starts = (0..4).map(|index| {
        let identities = identities.clone();
        let name = name.clone();
        tokio::spawn(async move {
            identities
                .ensure_admin(&name, &hash(&format!("start{index}")))
                .await
        })
    });
    let mut created = 0;
    let mut admins = Vec::new();
    for start in futures::future::join_all(starts).await {
        match start.expect("a start finished").expect("ensures") {
            AdminEnsured::Ensured {
                admin,
                created: new,
            } => {
                created += usize::from(new);
                admins.push(admin.customer_id);
            }
            AdminEnsured::Conflict { customer_id } => {
                panic!("racing starts conflicted over their own admin {customer_id}")
            }
        }
    }
    assert_eq!(created, 1, "one start creates the admin");
    admins.dedup();
    assert_eq!(admins.len(), 1, "every start names the same admin");
}

/// A session's refresh token (64 hex characters, shown once) names its user with the roles the
/// user has now and the session's remaining life, until the session is ended.
pub async fn a_session_refreshes_with_the_roles_of_now_until_it_ends(
    identities: Arc<dyn Identities>,
) {
    let user = identities
        .register(&username("sam"), &hash("sam"), None)
        .await
        .expect("registers");
    let session = identities
        .open_session(user.customer_id, HOUR)
        .await
        .expect("opens");
    let token = session.refresh_token;
    assert_eq!(session.expires_in, HOUR);
    assert_eq!(token.expose_secret().len(), 64);
    assert!(token.expose_secret().bytes().all(|b| b.is_ascii_hexdigit()));
    let refreshed = identities
        .refresh(&token)
        .await
        .expect("reads")
        .expect("a live session");
    assert_eq!(refreshed.customer_id, user.customer_id);
    assert_eq!(refreshed.roles, vec![Role::Customer]);
    assert!(
        (3_590..=3_600).contains(&refreshed.expires_in_seconds),
        "an hour's session has {} s left",
        refreshed.expires_in_seconds
    );
    identities
        .set_roles(user.customer_id, &[Role::Customer, Role::Auditor])
        .await
        .expect("sets");
    let refreshed = identities
        .refresh(&token)
        .await
        .expect("reads")
        .expect("a live session");
    assert_eq!(refreshed.roles, vec![Role::Customer, Role::Auditor]);
    identities.end_session(&token).await.expect("ends");
    assert!(identities.refresh(&token).await.expect("reads").is_none());
    identities
        .end_session(&token)
        .await
        .expect("ending an ended session is no error");
}

/// A session past its end, and a token nobody was given, refresh nothing.
pub async fn an_expired_or_unknown_session_does_not_refresh(identities: Arc<dyn Identities>) {
    let user = identities
        .register(&username("old"), &hash("old"), None)
        .await
        .expect("registers");
    let expired = identities
        .open_session(user.customer_id, Duration::ZERO)
        .await
        .expect("opens");
    assert!(
        identities
            .refresh(&expired.refresh_token)
            .await
            .expect("reads")
            .is_none()
    );
    let unknown = SecretString::from("0".repeat(64));
    assert!(identities.refresh(&unknown).await.expect("reads").is_none());
    // A login sweeps expired sessions of anyone's; the live one it opens works.
    let live = identities
        .open_session(user.customer_id, HOUR)
        .await
        .expect("opens");
    assert!(
        identities
            .refresh(&live.refresh_token)
            .await
            .expect("reads")
            .is_some()
    );
}

/// A user logged in more than [`SESSIONS_PER_USER_MAX`] times loses its oldest sessions; the
/// newest ones keep working, and other users' sessions are untouched.
pub async fn a_user_keeps_a_bounded_number_of_sessions(identities: Arc<dyn Identities>) {
    let busy = identities
        .register(&username("busy"), &hash("busy"), None)
        .await
        .expect("registers");
    let other = identities
        .register(&username("calm"), &hash("calm"), None)
        .await
        .expect("registers");
    let others = identities
        .open_session(other.customer_id, HOUR)
        .await
        .expect("opens");
    let logins = usize::try_from(SESSIONS_PER_USER_MAX).expect("a small bound") + 2;
    let mut tokens = Vec::new();
    for _ in 0..logins {
        let session = identities
            .open_session(busy.customer_id, HOUR)
            .await
            .expect("opens");
        tokens.push(session.refresh_token);
        // Sessions are ordered by when they were opened: keep the openings distinct in time.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut live = Vec::new();
    for token in &tokens {
        live.push(identities.refresh(token).await.expect("reads").is_some());
    }
    let expected: Vec<bool> = (0..logins).map(|index| index >= 2).collect();
    assert_eq!(live, expected, "the two oldest of {logins} logins end");
    assert!(
        identities
            .refresh(&others.refresh_token)
            .await
            .expect("reads")
            .is_some(),
        "another user's session was ended"
    );
}

/// `/health` sees a reachable store as up.
pub async fn the_store_answers_its_health_check(identities: Arc<dyn Identities>) {
    assert!(identities.ping(Duration::from_secs(2)).await);
}
