//! Runs the rules over one candidate: the threshold first (pure), then the velocity count in
//! its counters when the threshold passed, then the verdict (pure). The only IO is the counter's.

use std::sync::Arc;

use crate::error::Result;
use crate::rules::{Candidate, Rules, VelocityCheck, VelocityPlan, Verdict};
use crate::velocity::{Payment, VelocityCounters};

#[derive(Clone)]
pub struct Evaluator {
    rules: Arc<Rules>,
    counter: Arc<dyn VelocityCounters>,
}

impl Evaluator {
    pub fn new(rules: Arc<Rules>, counter: Arc<dyn VelocityCounters>) -> Self {
        Evaluator { rules, counter }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The verdict on `candidate`. Fails only when the counters do; evaluating again later is safe,
    /// because counting a payment is idempotent per transaction.
    pub async fn evaluate(&self, candidate: &Candidate) -> Result<Verdict> {
        let threshold = self.rules.threshold.check(candidate);
        let velocity = match self.rules.velocity.plan(candidate, threshold) {
            VelocityPlan::Disabled => VelocityCheck::Disabled,
            VelocityPlan::Skipped => VelocityCheck::Skipped,
            VelocityPlan::NoCustomerAccount => VelocityCheck::NoCustomerAccount,
            VelocityPlan::Count {
                account_id,
                limit_minor,
            } => {
                let payment = Payment {
                    account_id,
                    transaction_id: candidate.transaction_id,
                    amount_minor: candidate.amount_minor,
                    created_at: candidate.created_at,
                };
                // Over the limit, the counter has already taken the payment out again: a
                // rejected payment moves no money, so it must not use up the allowance.
                let window_total_minor = self
                    .counter
                    .record(&payment, self.rules.velocity.window_ms(), limit_minor)
                    .await?;
                VelocityCheck::Counted {
                    account_id,
                    window_total_minor,
                    limit_minor,
                }
            }
        };
        Ok(self.rules.verdict(candidate, threshold, velocity))
    }
}
