//! The velocity rule against the real Redis: the window total per customer account, counted
//! once per transaction, without rejected payments.

use chrono::{TimeDelta, Utc};
use domain::{AccountId, FraudOutcome};
use fraud_worker::testing::{TestApp, TestOptions, TestPayment, spawn_app};
use uuid::Uuid;

fn account() -> AccountId {
    AccountId(Uuid::new_v4())
}

/// A worker whose velocity limit is 1000 major units per ten minutes.
async fn app_with_small_limit() -> TestApp {
    let options = TestOptions {
        velocity_limit: 1_000,
        ..TestOptions::default()
    };
    spawn_app(&options).await.expect("the worker starts")
}

/// Decides `payment` and returns the outcome and the window total the velocity rule saw.
async fn decide(
    app: &mut TestApp,
    payment: &TestPayment,
) -> (FraudOutcome, Option<String>, String) {
    let decision = app.decide(&payment.event("corr-velocity")).await.message;
    let total = decision.inputs["velocity"]["window_total"]
        .as_str()
        .unwrap_or("-")
        .to_owned();
    (decision.outcome, decision.rule, total)
}

#[tokio::test]
async fn velocity_rejects_past_the_limit_and_a_redelivered_payment_counts_once() {
    // Proves the velocity rule: the window total includes the payment being decided, a
    // duplicated TransactionCreated is counted once (and decided alike, under the same decision
    // id), a payment over the limit is rejected naming `velocity` and is not counted, and
    // reaching the limit exactly is allowed.
    let mut app = app_with_small_limit().await;
    let customer = account();

    let first = TestPayment::withdrawal("600.00", "USD", customer);
    let event = first.event("corr-first");
    let original = app.decide(&event).await.message;
    assert_eq!(original.outcome, FraudOutcome::Approved);
    assert_eq!(original.inputs["velocity"]["window_total"], "600.00");
    // The same event delivered again, as after a crash before the acknowledgement.
    let again = app.decide(&event).await.message;
    assert_eq!(again.outcome, FraudOutcome::Approved);
    assert_eq!(
        again.inputs["velocity"]["window_total"], "600.00",
        "counted once"
    );
    assert_eq!(again.decision_id, original.decision_id);
    // The same payment re-published as a new message (a relay replay) is still the same payment.
    let replayed = app.decide(&first.event("corr-first")).await.message;
    assert_eq!(replayed.inputs["velocity"]["window_total"], "600.00");

    let second = TestPayment::transfer("300.00", "USD", customer, account());
    assert_eq!(
        decide(&mut app, &second).await,
        (FraudOutcome::Approved, None, "900.00".to_owned())
    );
    let too_much = TestPayment::withdrawal("200.00", "USD", customer);
    assert_eq!(
        decide(&mut app, &too_much).await,
        (
            FraudOutcome::Rejected,
            Some("velocity".to_owned()),
            "1100.00".to_owned()
        )
    );
    // The rejected 200.00 does not count: 100.00 more reaches the limit exactly, which is allowed.
    let exact = TestPayment::withdrawal("100.00", "USD", customer);
    assert_eq!(
        decide(&mut app, &exact).await,
        (FraudOutcome::Approved, None, "1000.00".to_owned())
    );
    // A redelivered rejection is rejected again and still not counted.
    let decision = app.decide(&too_much.event("corr-again")).await.message;
    assert_eq!(decision.outcome, FraudOutcome::Rejected);
    assert_eq!(decision.inputs["velocity"]["window_total"], "1200.00");
    let one_cent = TestPayment::withdrawal("0.01", "USD", customer);
    assert_eq!(decide(&mut app, &one_cent).await.0, FraudOutcome::Rejected);
    app.cleanup().await;
}

#[tokio::test]
async fn velocity_counts_on_the_customer_side_of_each_payment() {
    // Proves which account a payment counts on: the destination of a deposit, the source of a
    // transfer or a withdrawal — so a transfer into an account does not use up its allowance.
    let mut app = app_with_small_limit().await;
    let (alice, bob) = (account(), account());

    let top_up = TestPayment::deposit("900.00", "USD", alice);
    assert_eq!(decide(&mut app, &top_up).await.2, "900.00");
    let incoming = TestPayment::transfer("500.00", "USD", bob, alice);
    let decision = app.decide(&incoming.event("corr-in")).await.message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    assert_eq!(decision.inputs["velocity"]["account_id"], bob.to_string());
    assert_eq!(decision.inputs["velocity"]["window_total"], "500.00");
    let withdrawal = TestPayment::withdrawal("200.00", "USD", alice);
    assert_eq!(
        decide(&mut app, &withdrawal).await,
        (
            FraudOutcome::Rejected,
            Some("velocity".to_owned()),
            "1100.00".to_owned()
        )
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_payment_the_threshold_rejects_is_not_counted() {
    // Proves the order of the rules: the threshold is checked first, and a payment it rejects
    // never reaches the velocity count.
    let options = TestOptions {
        amount_threshold: 1_000,
        velocity_limit: 1_500,
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options).await.expect("the worker starts");
    let customer = account();
    let large = TestPayment::withdrawal("1200.00", "USD", customer);
    let decision = app.decide(&large.event("corr-large")).await.message;
    assert_eq!(decision.rule.as_deref(), Some("amount_threshold"));
    assert_eq!(decision.inputs["velocity"]["status"], "skipped");
    let small = TestPayment::withdrawal("900.00", "USD", customer);
    assert_eq!(
        decide(&mut app, &small).await,
        (FraudOutcome::Approved, None, "900.00".to_owned())
    );
    app.cleanup().await;
}

#[tokio::test]
async fn payments_older_than_the_window_no_longer_count() {
    // Proves the window slides on the payments' creation times: an 800.00 payment made twenty
    // minutes ago does not count against a ten-minute window, one made five minutes ago does.
    let mut app = app_with_small_limit().await;
    let customer = account();
    let mut old = TestPayment::withdrawal("800.00", "USD", customer);
    old.created_at = Utc::now() - TimeDelta::minutes(20);
    assert_eq!(decide(&mut app, &old).await.0, FraudOutcome::Approved);
    let mut recent = TestPayment::withdrawal("800.00", "USD", customer);
    recent.created_at = Utc::now() - TimeDelta::minutes(5);
    assert_eq!(
        decide(&mut app, &recent).await,
        (FraudOutcome::Approved, None, "800.00".to_owned())
    );
    let now = TestPayment::withdrawal("300.00", "USD", customer);
    assert_eq!(
        decide(&mut app, &now).await,
        (
            FraudOutcome::Rejected,
            Some("velocity".to_owned()),
            "1100.00".to_owned()
        )
    );
    app.cleanup().await;
}
