//! The fraud rules of SPEC §4 as plain data and pure functions: which rule applies, what it
//! compares, and the verdict with the inputs every rule saw. The one stateful step, counting a
//! customer account's recent payments, happens in [`crate::velocity`]; the evaluator feeds its
//! answer back in here, so every decision is computed from values a unit test can write down.
//!
//! - `amount_threshold`: amount ≥ threshold (major units of the transaction's currency, with
//!   per-currency overrides) → rejected.
//! - `velocity`: the total amount a customer account moved in the sliding window, this payment
//!   included, above the limit → rejected. Counted on the customer side: the source of transfers
//!   and withdrawals, the destination of deposits, never a world account.
//!
//! The threshold is checked first; a payment it rejects is not counted by the velocity rule.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use domain::{
    AMOUNT_MINOR_MAX, AccountId, Currency, FraudOutcome, TransactionId, TransactionKind,
    TransactionRequest, format_minor,
};
use serde::Serialize;
use serde_json::{Value, json};

/// The largest threshold or limit, in major units. The largest `minor_per_major` we know is
/// 1000 (three decimals), so a bound in minor units is at most [`AMOUNT_MINOR_MAX`] and never
/// overflows; a threshold above every possible amount would switch the rule off in disguise.
pub const MAJOR_UNITS_MAX: i64 = AMOUNT_MINOR_MAX / 1000;

/// The longest velocity window: a week. Longer windows would keep unbounded per-account sets.
pub const VELOCITY_WINDOW_SECONDS_MAX: u64 = 7 * 24 * 3600;

/// A rule's stable name, as it appears in decisions, in `FRAUD_RULES_DISABLED` and in
/// `GET /api/v1/fraud/rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleName {
    AmountThreshold,
    Velocity,
}

impl RuleName {
    /// Every rule, in evaluation order.
    pub const ALL: [RuleName; 2] = [RuleName::AmountThreshold, RuleName::Velocity];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleName::AmountThreshold => "amount_threshold",
            RuleName::Velocity => "velocity",
        }
    }

    pub fn parse(text: &str) -> Option<RuleName> {
        RuleName::ALL.into_iter().find(|rule| rule.as_str() == text)
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in major units per currency: a default, and overrides for some currencies
/// (`JPY=1500000`). Every value is within `1..=MAJOR_UNITS_MAX`, checked at configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerCurrency {
    pub default_major: i64,
    pub overrides_major: BTreeMap<Currency, i64>,
}

impl PerCurrency {
    pub fn major(&self, currency: Currency) -> i64 {
        self.overrides_major
            .get(&currency)
            .copied()
            .unwrap_or(self.default_major)
    }

    /// The value in minor units of `currency`.
    pub fn minor(&self, currency: Currency) -> i64 {
        let major = self.major(currency);
        assert!(
            (1..=MAJOR_UNITS_MAX).contains(&major),
            "per-currency amounts are validated at configuration"
        );
        major
            .checked_mul(currency.minor_per_major())
            .expect("MAJOR_UNITS_MAX times the largest minor_per_major fits in an i64")
    }

    /// Every known currency with its effective value, formatted with the currency's decimals.
    fn effective(&self) -> BTreeMap<&'static str, String> {
        Currency::all()
            .map(|currency| {
                (
                    currency.code(),
                    format_minor(self.minor(currency), currency),
                )
            })
            .collect()
    }

    fn overrides(&self) -> BTreeMap<&'static str, String> {
        self.overrides_major
            .iter()
            .map(|(currency, major)| (currency.code(), major.to_string()))
            .collect()
    }
}

/// `amount_threshold`: rejects a single payment at or above the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThresholdRule {
    pub enabled: bool,
    pub thresholds: PerCurrency,
}

/// `velocity`: rejects a payment that takes its customer account's total over the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VelocityRule {
    pub enabled: bool,
    pub limits: PerCurrency,
    /// Length of the sliding window the total is counted over.
    pub window_seconds: u64,
}

/// The active rule set, fixed at start from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub threshold: ThresholdRule,
    pub velocity: VelocityRule,
}

/// What the rules look at in a `TransactionCreated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub transaction_id: TransactionId,
    pub kind: TransactionKind,
    pub amount_minor: i64,
    pub currency: Currency,
    pub source_account_id: Option<AccountId>,
    pub destination_account_id: Option<AccountId>,
    /// When command-api accepted the request: the velocity window is measured on these times,
    /// so a redelivered message is counted at the same instant as the first time.
    pub created_at: DateTime<Utc>,
}

impl Candidate {
    pub fn new(
        transaction_id: TransactionId,
        request: &TransactionRequest,
        created_at: DateTime<Utc>,
    ) -> Self {
        Candidate {
            transaction_id,
            kind: request.kind,
            amount_minor: request.amount.minor(),
            currency: request.currency,
            source_account_id: request.source_account_id,
            destination_account_id: request.destination_account_id,
            created_at,
        }
    }

    /// The customer's side of the payment: the account whose owner spends (transfers and
    /// withdrawals) or is topped up (deposits). Never a world account: deposits must never be
    /// serialised or limited by the world account they all share.
    pub fn customer_account(&self) -> Option<AccountId> {
        let account = match self.kind {
            TransactionKind::Deposit => self.destination_account_id,
            TransactionKind::Withdrawal | TransactionKind::Transfer => self.source_account_id,
        };
        account.filter(|account| !account.is_world())
    }
}

/// What `amount_threshold` saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdCheck {
    Disabled,
    Checked { threshold_minor: i64, fired: bool },
}

impl ThresholdCheck {
    pub fn fired(self) -> bool {
        matches!(self, ThresholdCheck::Checked { fired: true, .. })
    }
}

impl ThresholdRule {
    pub fn check(&self, candidate: &Candidate) -> ThresholdCheck {
        if !self.enabled {
            return ThresholdCheck::Disabled;
        }
        let threshold_minor = self.thresholds.minor(candidate.currency);
        ThresholdCheck::Checked {
            threshold_minor,
            fired: candidate.amount_minor >= threshold_minor,
        }
    }
}

/// What the velocity rule has to do for a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VelocityPlan {
    Disabled,
    /// An earlier rule already rejected the payment: it is not counted.
    Skipped,
    /// No customer account to count on (only world accounts named).
    NoCustomerAccount,
    /// Count the payment on `account_id` and compare the window's total with `limit_minor`.
    Count {
        account_id: AccountId,
        limit_minor: i64,
    },
}

impl VelocityRule {
    pub fn plan(&self, candidate: &Candidate, threshold: ThresholdCheck) -> VelocityPlan {
        if !self.enabled {
            return VelocityPlan::Disabled;
        }
        if threshold.fired() {
            return VelocityPlan::Skipped;
        }
        match candidate.customer_account() {
            None => VelocityPlan::NoCustomerAccount,
            Some(account_id) => VelocityPlan::Count {
                account_id,
                limit_minor: self.limits.minor(candidate.currency),
            },
        }
    }

    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window_seconds.saturating_mul(1000))
            .expect("the window is bounded by VELOCITY_WINDOW_SECONDS_MAX at configuration")
    }
}

/// Whether a window total (this payment included) breaks the limit. Reaching the limit exactly
/// is allowed: the limit is the most an account may move per window. The counter's Redis script
/// makes the same comparison to take a rejected payment out of the window.
pub fn velocity_fired(window_total_minor: i64, limit_minor: i64) -> bool {
    window_total_minor > limit_minor
}

/// What the velocity rule saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VelocityCheck {
    Disabled,
    Skipped,
    NoCustomerAccount,
    Counted {
        account_id: AccountId,
        window_total_minor: i64,
        limit_minor: i64,
    },
}

impl VelocityCheck {
    pub fn fired(self) -> bool {
        match self {
            VelocityCheck::Counted {
                window_total_minor,
                limit_minor,
                ..
            } => velocity_fired(window_total_minor, limit_minor),
            _ => false,
        }
    }
}

/// A decision before it becomes a message: the outcome, the rule that fired and the inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub outcome: FraudOutcome,
    pub rule: Option<RuleName>,
    /// What each rule saw and concluded, for the audit trail.
    pub inputs: Value,
}

impl Rules {
    /// The verdict from what each rule saw. The first rule that fired names the rejection.
    pub fn verdict(
        &self,
        candidate: &Candidate,
        threshold: ThresholdCheck,
        velocity: VelocityCheck,
    ) -> Verdict {
        let rule = if threshold.fired() {
            Some(RuleName::AmountThreshold)
        } else if velocity.fired() {
            Some(RuleName::Velocity)
        } else {
            None
        };
        let outcome = if rule.is_some() {
            FraudOutcome::Rejected
        } else {
            FraudOutcome::Approved
        };
        let currency = candidate.currency;
        let inputs = json!({
            "transaction": {
                "kind": candidate.kind.as_str(),
                "amount_minor": candidate.amount_minor,
                "amount": format_minor(candidate.amount_minor, currency),
                "currency": currency.code(),
                "created_at": candidate.created_at,
            },
            (RuleName::AmountThreshold.as_str()): threshold_inputs(threshold, currency),
            (RuleName::Velocity.as_str()): self.velocity_inputs(velocity, currency),
        });
        Verdict {
            outcome,
            rule,
            inputs,
        }
    }

    fn velocity_inputs(&self, velocity: VelocityCheck, currency: Currency) -> Value {
        match velocity {
            VelocityCheck::Disabled => json!({ "status": "disabled" }),
            VelocityCheck::Skipped => json!({
                "status": "skipped",
                "reason": "an earlier rule rejected the payment, so it is not counted",
            }),
            VelocityCheck::NoCustomerAccount => json!({
                "status": "skipped",
                "reason": "no customer account to count on",
            }),
            VelocityCheck::Counted {
                account_id,
                window_total_minor,
                limit_minor,
            } => json!({
                "status": status(velocity.fired()),
                "account_id": account_id,
                "window_seconds": self.velocity.window_seconds,
                "window_total_minor": window_total_minor,
                "window_total": format_minor(window_total_minor, currency),
                "limit_minor": limit_minor,
                "limit": format_minor(limit_minor, currency),
            }),
        }
    }

    /// Configurations that are valid but almost certainly not meant: a currency whose velocity
    /// limit is below its amount threshold rejects, by velocity alone, single payments the
    /// threshold was set to allow (an override of `FRAUD_AMOUNT_THRESHOLDS` without the matching
    /// `FRAUD_VELOCITY_LIMITS`).
    pub fn warnings(&self) -> Vec<String> {
        if !self.threshold.enabled || !self.velocity.enabled {
            return Vec::new();
        }
        Currency::all()
            .filter(|currency| {
                self.velocity.limits.minor(*currency) < self.threshold.thresholds.minor(*currency)
            })
            .map(|currency| {
                format!(
                    "the velocity limit of {currency} ({}) is below its amount threshold ({}): \
                     single payments the threshold allows are rejected by the velocity rule",
                    self.velocity.limits.major(currency),
                    self.threshold.thresholds.major(currency),
                )
            })
            .collect()
    }

    /// Every rule with its effective parameters, for `GET /api/v1/fraud/rules`.
    pub fn describe(&self) -> Vec<RuleDescription> {
        vec![
            RuleDescription {
                name: RuleName::AmountThreshold.as_str(),
                enabled: self.threshold.enabled,
                description: "Rejects a payment whose amount is at or above the threshold, in \
                              major units of the payment's currency.",
                parameters: json!({
                    "default_threshold": self.threshold.thresholds.default_major.to_string(),
                    "currency_overrides": self.threshold.thresholds.overrides(),
                    "thresholds": self.threshold.thresholds.effective(),
                }),
            },
            RuleDescription {
                name: RuleName::Velocity.as_str(),
                enabled: self.velocity.enabled,
                description: "Rejects a payment that takes the total amount moved by its \
                              customer account within the window above the limit. Counted on \
                              the source account of transfers and withdrawals and the \
                              destination account of deposits, never on a world account; \
                              rejected payments are not counted.",
                parameters: json!({
                    "window_seconds": self.velocity.window_seconds,
                    "default_limit": self.velocity.limits.default_major.to_string(),
                    "currency_overrides": self.velocity.limits.overrides(),
                    "limits": self.velocity.limits.effective(),
                }),
            },
        ]
    }
}

fn threshold_inputs(threshold: ThresholdCheck, currency: Currency) -> Value {
    match threshold {
        ThresholdCheck::Disabled => json!({ "status": "disabled" }),
        ThresholdCheck::Checked {
            threshold_minor,
            fired,
        } => json!({
            "status": status(fired),
            "threshold_minor": threshold_minor,
            "threshold": format_minor(threshold_minor, currency),
        }),
    }
}

fn status(fired: bool) -> &'static str {
    if fired { "fired" } else { "passed" }
}

/// One entry of `GET /api/v1/fraud/rules`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleDescription {
    pub name: &'static str,
    pub enabled: bool,
    pub description: &'static str,
    pub parameters: Value,
}

#[cfg(test)]
mod tests {
    use domain::Amount;
    use uuid::Uuid;

    use super::*;

    fn currency(code: &str) -> Currency {
        Currency::from_code(code).expect("a known currency")
    }

    fn rules() -> Rules {
        Rules {
            threshold: ThresholdRule {
                enabled: true,
                thresholds: PerCurrency {
                    default_major: 10_000,
                    overrides_major: BTreeMap::from([(currency("JPY"), 1_500_000)]),
                },
            },
            velocity: VelocityRule {
                enabled: true,
                limits: PerCurrency {
                    default_major: 50_000,
                    overrides_major: BTreeMap::new(),
                },
                window_seconds: 600,
            },
        }
    }

    const SOURCE: AccountId = AccountId(Uuid::from_u128(1));
    const DESTINATION: AccountId = AccountId(Uuid::from_u128(2));

    fn candidate(kind: TransactionKind, amount: &str, code: &str) -> Candidate {
        let currency = currency(code);
        let (source, destination) = match kind {
            TransactionKind::Deposit => (None, Some(DESTINATION)),
            TransactionKind::Withdrawal => (Some(SOURCE), None),
            TransactionKind::Transfer => (Some(SOURCE), Some(DESTINATION)),
        };
        let request = TransactionRequest::new(
            kind,
            Amount::parse(amount, currency).expect("a valid amount"),
            currency,
            source,
            destination,
            None,
        )
        .expect("a valid request");
        Candidate::new(TransactionId(Uuid::from_u128(7)), &request, Utc::now())
    }

    #[test]
    fn the_threshold_rejects_at_and_above_it_and_approves_below() {
        let rules = rules();
        let below = candidate(TransactionKind::Transfer, "9999.99", "USD");
        assert_eq!(
            rules.threshold.check(&below),
            ThresholdCheck::Checked {
                threshold_minor: 1_000_000,
                fired: false
            }
        );
        let at = candidate(TransactionKind::Transfer, "10000.00", "USD");
        assert!(rules.threshold.check(&at).fired());
        let above = candidate(TransactionKind::Deposit, "250000.00", "USD");
        assert!(rules.threshold.check(&above).fired());
    }

    #[test]
    fn the_threshold_is_in_major_units_of_the_currency_with_overrides() {
        let rules = rules();
        // KWD has three decimals: 10000 KWD is 10_000_000 minor units.
        let kwd = candidate(TransactionKind::Deposit, "9999.999", "KWD");
        assert_eq!(
            rules.threshold.check(&kwd),
            ThresholdCheck::Checked {
                threshold_minor: 10_000_000,
                fired: false
            }
        );
        // JPY is overridden to 1,500,000 yen, which has no decimals.
        let yen = candidate(TransactionKind::Deposit, "1000000", "JPY");
        assert!(!rules.threshold.check(&yen).fired());
        let yen = candidate(TransactionKind::Deposit, "1500000", "JPY");
        assert_eq!(
            rules.threshold.check(&yen),
            ThresholdCheck::Checked {
                threshold_minor: 1_500_000,
                fired: true
            }
        );
    }

    #[test]
    fn a_disabled_rule_sees_nothing_and_never_fires() {
        let mut rules = rules();
        rules.threshold.enabled = false;
        rules.velocity.enabled = false;
        let huge = candidate(TransactionKind::Transfer, "900000.00", "USD");
        let threshold = rules.threshold.check(&huge);
        assert_eq!(threshold, ThresholdCheck::Disabled);
        assert_eq!(
            rules.velocity.plan(&huge, threshold),
            VelocityPlan::Disabled
        );
        let verdict = rules.verdict(&huge, threshold, VelocityCheck::Disabled);
        assert_eq!(verdict.outcome, FraudOutcome::Approved);
        assert_eq!(verdict.rule, None);
        assert_eq!(verdict.inputs["amount_threshold"]["status"], "disabled");
        assert_eq!(verdict.inputs["velocity"]["status"], "disabled");
    }

    #[test]
    fn velocity_counts_on_the_customer_side() {
        let deposit = candidate(TransactionKind::Deposit, "10.00", "USD");
        assert_eq!(deposit.customer_account(), Some(DESTINATION));
        let withdrawal = candidate(TransactionKind::Withdrawal, "10.00", "USD");
        assert_eq!(withdrawal.customer_account(), Some(SOURCE));
        let transfer = candidate(TransactionKind::Transfer, "10.00", "USD");
        assert_eq!(transfer.customer_account(), Some(SOURCE));
    }

    #[test]
    fn velocity_never_counts_on_a_world_account() {
        let usd = currency("USD");
        let mut deposit = candidate(TransactionKind::Deposit, "10.00", "USD");
        deposit.destination_account_id = Some(AccountId::world(usd));
        assert_eq!(deposit.customer_account(), None);
        let rules = rules();
        let threshold = rules.threshold.check(&deposit);
        assert_eq!(
            rules.velocity.plan(&deposit, threshold),
            VelocityPlan::NoCustomerAccount
        );
    }

    #[test]
    fn a_payment_the_threshold_rejects_is_not_counted() {
        let rules = rules();
        let big = candidate(TransactionKind::Transfer, "20000.00", "USD");
        let threshold = rules.threshold.check(&big);
        assert_eq!(rules.velocity.plan(&big, threshold), VelocityPlan::Skipped);
        let verdict = rules.verdict(&big, threshold, VelocityCheck::Skipped);
        assert_eq!(verdict.outcome, FraudOutcome::Rejected);
        assert_eq!(verdict.rule, Some(RuleName::AmountThreshold));
        assert_eq!(verdict.inputs["amount_threshold"]["status"], "fired");
        assert_eq!(verdict.inputs["amount_threshold"]["threshold"], "10000.00");
        assert_eq!(verdict.inputs["velocity"]["status"], "skipped");
    }

    #[test]
    fn velocity_fires_only_above_the_limit() {
        let rules = rules();
        let payment = candidate(TransactionKind::Transfer, "100.00", "USD");
        let threshold = rules.threshold.check(&payment);
        assert_eq!(
            rules.velocity.plan(&payment, threshold),
            VelocityPlan::Count {
                account_id: SOURCE,
                limit_minor: 5_000_000
            }
        );
        let at_limit = VelocityCheck::Counted {
            account_id: SOURCE,
            window_total_minor: 5_000_000,
            limit_minor: 5_000_000,
        };
        let verdict = rules.verdict(&payment, threshold, at_limit);
        assert_eq!(verdict.outcome, FraudOutcome::Approved);
        assert_eq!(verdict.inputs["velocity"]["status"], "passed");
        let over = VelocityCheck::Counted {
            account_id: SOURCE,
            window_total_minor: 5_000_001,
            limit_minor: 5_000_000,
        };
        let verdict = rules.verdict(&payment, threshold, over);
        assert_eq!(verdict.outcome, FraudOutcome::Rejected);
        assert_eq!(verdict.rule, Some(RuleName::Velocity));
        let seen = &verdict.inputs["velocity"];
        assert_eq!(seen["status"], "fired");
        assert_eq!(seen["window_total_minor"], 5_000_001);
        assert_eq!(seen["window_total"], "50000.01");
        assert_eq!(seen["limit"], "50000.00");
        assert_eq!(seen["window_seconds"], 600);
        assert_eq!(seen["account_id"], SOURCE.to_string());
        assert_eq!(verdict.inputs["transaction"]["amount"], "100.00");
        assert_eq!(verdict.inputs["transaction"]["amount_minor"], 10_000);
        assert_eq!(verdict.inputs["transaction"]["currency"], "USD");
    }

    #[test]
    fn the_largest_configurable_bound_fits_in_minor_units() {
        let bound = PerCurrency {
            default_major: MAJOR_UNITS_MAX,
            overrides_major: BTreeMap::new(),
        };
        assert_eq!(bound.minor(currency("KWD")), AMOUNT_MINOR_MAX);
        assert_eq!(bound.minor(currency("JPY")), MAJOR_UNITS_MAX);
    }

    #[test]
    fn the_description_lists_every_rule_with_effective_parameters() {
        let mut rules = rules();
        rules.velocity.enabled = false;
        let described = rules.describe();
        let names: Vec<_> = described.iter().map(|rule| rule.name).collect();
        assert_eq!(names, ["amount_threshold", "velocity"]);
        assert!(described[0].enabled);
        assert!(!described[1].enabled);
        let thresholds = &described[0].parameters["thresholds"];
        assert_eq!(thresholds["USD"], "10000.00");
        assert_eq!(thresholds["JPY"], "1500000");
        assert_eq!(thresholds["KWD"], "10000.000");
        assert_eq!(
            described[0].parameters["currency_overrides"]["JPY"],
            "1500000"
        );
        assert_eq!(described[1].parameters["window_seconds"], 600);
        assert_eq!(described[1].parameters["limits"]["USD"], "50000.00");
    }

    #[test]
    fn a_velocity_limit_below_the_threshold_is_warned_about() {
        let mut rules = rules();
        // JPY's threshold is overridden to 1,500,000 but its velocity limit stays 50,000.
        let warnings = rules.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("JPY"), "{warnings:?}");
        rules
            .velocity
            .limits
            .overrides_major
            .insert(currency("JPY"), 7_500_000);
        assert!(rules.warnings().is_empty());
    }

    #[test]
    fn rule_names_round_trip() {
        for rule in RuleName::ALL {
            assert_eq!(RuleName::parse(rule.as_str()), Some(rule));
        }
        assert_eq!(RuleName::parse("Velocity"), None);
    }
}
