//! Decisions of the amount threshold, as command-api receives them.

use domain::{AccountId, FraudOutcome};
use fraud_worker::messages::decision_id;
use fraud_worker::rules::RuleName;
use fraud_worker::testing::{TestOptions, TestPayment, spawn_app};
use uuid::Uuid;

fn account() -> AccountId {
    AccountId(Uuid::new_v4())
}

#[tokio::test]
async fn an_ordinary_payment_is_approved_and_a_large_one_rejected_by_the_threshold() {
    // Proves SPEC §4's default rule end to end: 500.00 USD passes, 10000.00 USD (the threshold
    // itself) is rejected naming `amount_threshold`, and each decision carries its inputs, an id
    // derived from the transaction, the correlation id and the event as its cause.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let (source, destination) = (account(), account());

    let small = TestPayment::transfer("500.00", "USD", source, destination);
    let event = small.event("corr-small-1");
    let received = app.decide(&event).await;
    let decision = &received.message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    assert_eq!(decision.rule, None);
    assert_eq!(decision.decision_id, decision_id(small.transaction_id));
    assert_eq!(received.message_id, Some(decision.decision_id.to_string()));
    assert_eq!(
        received.correlation_id_header.as_deref(),
        Some("corr-small-1")
    );
    assert_eq!(
        received.causation_id_header,
        Some(event.event_id.to_string())
    );
    assert_eq!(
        received.properties.delivery_mode(),
        &Some(2),
        "decisions are persistent"
    );
    let inputs = &decision.inputs;
    assert_eq!(inputs["transaction"]["amount_minor"], 50_000);
    assert_eq!(inputs["transaction"]["currency"], "USD");
    assert_eq!(inputs["amount_threshold"]["status"], "passed");
    assert_eq!(inputs["amount_threshold"]["threshold"], "10000.00");
    assert_eq!(inputs["velocity"]["status"], "passed");
    assert_eq!(inputs["velocity"]["account_id"], source.to_string());
    assert_eq!(inputs["velocity"]["window_total"], "500.00");
    assert_eq!(inputs["velocity"]["limit"], "50000.00");

    let large = TestPayment::transfer("10000.00", "USD", source, destination);
    let received = app.decide(&large.event("corr-large-1")).await;
    let decision = &received.message;
    assert_eq!(decision.outcome, FraudOutcome::Rejected);
    assert_eq!(decision.rule.as_deref(), Some("amount_threshold"));
    assert_eq!(decision.inputs["amount_threshold"]["status"], "fired");
    assert_eq!(decision.inputs["transaction"]["amount"], "10000.00");
    assert_eq!(decision.inputs["velocity"]["status"], "skipped");
    app.cleanup().await;
}

#[tokio::test]
async fn per_currency_thresholds_override_the_default() {
    // Proves FRAUD_AMOUNT_THRESHOLDS: the threshold is in major units of the payment's currency,
    // an overridden currency uses its own, the others keep the default. (The yen's velocity
    // limit is raised alike, or 50,000 yen per window would reject these payments by itself.)
    let options = TestOptions {
        amount_thresholds: vec![("JPY", 1_500_000), ("KWD", 3_000)],
        velocity_limits: vec![("JPY", 7_500_000)],
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options).await.expect("the worker starts");
    let cases = [
        ("1000000", "JPY", FraudOutcome::Approved),
        ("1500000", "JPY", FraudOutcome::Rejected),
        ("2999.999", "KWD", FraudOutcome::Approved),
        ("3000.000", "KWD", FraudOutcome::Rejected),
        ("9999.99", "EUR", FraudOutcome::Approved),
        ("10000.00", "EUR", FraudOutcome::Rejected),
    ];
    for (amount, currency, expected) in cases {
        let payment = TestPayment::deposit(amount, currency, account());
        let decision = app.decide(&payment.event("corr-currency")).await.message;
        assert_eq!(
            decision.outcome, expected,
            "{amount} {currency}: {decision:?}"
        );
        if expected == FraudOutcome::Rejected {
            assert_eq!(decision.rule.as_deref(), Some("amount_threshold"));
        }
    }
    app.cleanup().await;
}

#[tokio::test]
async fn disabled_rules_never_reject() {
    // Proves FRAUD_RULES_DISABLED: with both rules off, any amount is approved and the inputs say
    // the rules were disabled.
    let options = TestOptions {
        rules_disabled: vec![RuleName::AmountThreshold, RuleName::Velocity],
        ..TestOptions::default()
    };
    let mut app = spawn_app(&options).await.expect("the worker starts");
    let payment = TestPayment::withdrawal("900000.00", "USD", account());
    let decision = app.decide(&payment.event("corr-disabled")).await.message;
    assert_eq!(decision.outcome, FraudOutcome::Approved);
    assert_eq!(decision.inputs["amount_threshold"]["status"], "disabled");
    assert_eq!(decision.inputs["velocity"]["status"], "disabled");
    app.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_small_payments_passes_the_default_rules() {
    // Proves the defaults never reject ordinary traffic: forty payments of 25.00 from one
    // account, published at once and handled concurrently, are all approved.
    let mut app = spawn_app(&TestOptions::default())
        .await
        .expect("the worker starts");
    let source = account();
    let payments: Vec<_> = (0..40)
        .map(|_| TestPayment::transfer("25.00", "USD", source, account()))
        .collect();
    for payment in &payments {
        app.publish_event(&payment.event("corr-burst")).await;
    }
    for payment in &payments {
        let decision = app
            .decision_for(payment.transaction_id, crate::WAIT)
            .await
            .expect("every payment is decided")
            .message;
        assert_eq!(decision.outcome, FraudOutcome::Approved, "{decision:?}");
    }
    app.cleanup().await;
}
