//! The invariants of SPEC §8 checked over a whole log: feed every stored event in commit order,
//! then read the report. Pure, like the rest of the domain: the write side's tests, and later
//! `ledger verify` and `ledger replay`, load events and call this.
//!
//! A stored event that breaks an invariant is data to report with its stream and sequence,
//! never a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::account::{Account, AccountEvent};
use crate::ids::{AccountId, TransactionId};
use crate::money::Currency;
use crate::transaction::{Outcome, Transaction, TransactionEvent};

/// One broken invariant, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// `account/<id>` or `transaction/<id>`, or `ledger` for global checks.
    pub stream: String,
    /// The offending event's sequence in its stream, when one event is to blame.
    pub sequence: Option<u64>,
    pub problem: String,
}

/// What an audit found.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub violations: Vec<Violation>,
    /// Transactions not yet fully applied (pending, or final but not settled/released): in
    /// flight, which is not an error.
    pub in_flight: Vec<TransactionId>,
    /// Every customer account's state after the last event.
    pub accounts: BTreeMap<AccountId, Account>,
    /// Every transaction's state after the last event, with its stream version.
    pub transactions: BTreeMap<TransactionId, (Transaction, u64)>,
    /// Every customer account's stream version after the last event.
    pub account_versions: BTreeMap<AccountId, u64>,
    /// Per currency, the world account's balance implied by the applied legs.
    pub world_balances_minor: BTreeMap<Currency, i64>,
    pub transactions_confirmed: usize,
    pub transactions_rejected: usize,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Folds a log and checks conservation, no overdraft and exactly-once as it goes.
#[derive(Debug, Default)]
pub struct Audit {
    accounts: HashMap<AccountId, Account>,
    transactions: HashMap<TransactionId, Transaction>,
    /// Legs applied to customer accounts, by (account, transaction): settling or posting the
    /// same transaction twice on one account is the double application SPEC §8.3 forbids.
    /// Kept with the sequence of the event that applied it, to locate a leg that should not be.
    applied_legs: HashMap<(AccountId, TransactionId), (i64, u64)>,
    violations: Vec<Violation>,
    /// The last sequence seen on each stream: its version, as read models show it.
    account_versions: HashMap<AccountId, u64>,
    transaction_versions: HashMap<TransactionId, u64>,
}

impl Audit {
    pub fn new() -> Self {
        Audit::default()
    }

    /// Folds one account event.
    pub fn account_event(&mut self, account_id: AccountId, sequence: u64, event: &AccountEvent) {
        let stream = format!("account/{account_id}");
        let version = self.account_versions.entry(account_id).or_default();
        *version = (*version).max(sequence);
        let state = self.accounts.remove(&account_id);
        let previous = state.clone();
        match Account::apply(state, event) {
            Ok(account) => {
                if account.available_minor() < 0 {
                    self.violation(&stream, Some(sequence), "available balance below zero");
                }
                self.accounts.insert(account_id, account);
            }
            Err(violation) => {
                self.violation(&stream, Some(sequence), &violation.to_string());
                if let Some(previous) = previous {
                    self.accounts.insert(account_id, previous);
                }
                return;
            }
        }
        let applied = match *event {
            AccountEvent::HoldSettled {
                transaction_id,
                amount_minor,
                ..
            } => Some((transaction_id, -amount_minor)),
            AccountEvent::CreditPosted {
                transaction_id,
                amount_minor,
                ..
            } => Some((transaction_id, amount_minor)),
            _ => None,
        };
        if let Some((transaction_id, amount_minor)) = applied
            && self
                .applied_legs
                .insert((account_id, transaction_id), (amount_minor, sequence))
                .is_some()
        {
            self.violation(
                &stream,
                Some(sequence),
                &format!("transaction {transaction_id} applied twice to this account"),
            );
        }
    }

    /// Folds one transaction event.
    pub fn transaction_event(
        &mut self,
        transaction_id: TransactionId,
        sequence: u64,
        event: &TransactionEvent,
    ) {
        let stream = format!("transaction/{transaction_id}");
        let version = self.transaction_versions.entry(transaction_id).or_default();
        *version = (*version).max(sequence);
        let state = self.transactions.remove(&transaction_id);
        let previous = state.clone();
        match Transaction::apply(state, event) {
            Ok(transaction) => {
                self.transactions.insert(transaction_id, transaction);
            }
            Err(violation) => {
                self.violation(&stream, Some(sequence), &violation.to_string());
                if let Some(previous) = previous {
                    self.transactions.insert(transaction_id, previous);
                }
            }
        }
    }

    /// Runs the whole-ledger checks and returns the report.
    pub fn finish(mut self) -> AuditReport {
        let mut report = AuditReport::default();
        let mut legs_by_account: HashMap<AccountId, i64> = HashMap::new();
        let mut leg_sums: BTreeMap<Currency, i64> = BTreeMap::new();
        // Confirmed legs on customer accounts whose settlement step has not run yet.
        let mut in_flight_minor: BTreeMap<Currency, i64> = BTreeMap::new();
        let mut transaction_ids: Vec<_> = self.transactions.keys().copied().collect();
        transaction_ids.sort();
        for transaction_id in transaction_ids {
            let transaction = self.transactions[&transaction_id].clone();
            if !transaction.completed {
                report.in_flight.push(transaction_id);
            }
            match &transaction.outcome {
                Some(Outcome::Confirmed { legs }) => {
                    report.transactions_confirmed += 1;
                    for leg in legs {
                        let sum = leg_sums.entry(leg.currency).or_default();
                        *sum = sum.saturating_add(leg.amount_minor);
                    }
                    self.check_confirmed_legs(
                        &transaction,
                        legs,
                        &mut legs_by_account,
                        &mut in_flight_minor,
                        &mut report,
                    );
                }
                Some(Outcome::Rejected { .. }) => {
                    report.transactions_rejected += 1;
                    self.check_nothing_applied(&transaction);
                }
                None => self.check_nothing_applied(&transaction),
            }
        }
        for (currency, sum) in leg_sums {
            if sum != 0 {
                self.violation(
                    "ledger",
                    None,
                    &format!("confirmed legs in {currency} sum to {sum}, not 0"),
                );
            }
        }
        self.check_balances(&legs_by_account, &in_flight_minor, &mut report);
        report.violations = self.violations;
        report.accounts = self.accounts.into_iter().collect();
        report.transactions = self
            .transactions
            .into_iter()
            .map(|(id, transaction)| {
                let version = self.transaction_versions.get(&id).copied().unwrap_or(0);
                (id, (transaction, version))
            })
            .collect();
        report.account_versions = self.account_versions.into_iter().collect();
        report
    }

    /// A confirmed transaction's legs on customer accounts are applied once each, for the
    /// confirmed amount; once it is settled, all of them are. World legs accrue to the world.
    fn check_confirmed_legs(
        &mut self,
        transaction: &Transaction,
        legs: &[crate::transaction::Leg],
        legs_by_account: &mut HashMap<AccountId, i64>,
        in_flight_minor: &mut BTreeMap<Currency, i64>,
        report: &mut AuditReport,
    ) {
        let stream = format!("transaction/{}", transaction.id);
        for leg in legs {
            if leg.is_world() {
                let world = report.world_balances_minor.entry(leg.currency).or_default();
                *world = world.saturating_add(leg.amount_minor);
                continue;
            }
            match self.applied_legs.remove(&(leg.account_id, transaction.id)) {
                Some((applied, _)) if applied == leg.amount_minor => {
                    let sum = legs_by_account.entry(leg.account_id).or_default();
                    *sum = sum.saturating_add(applied);
                }
                Some((applied, sequence)) => self.violation(
                    &format!("account/{}", leg.account_id),
                    Some(sequence),
                    &format!(
                        "applied {applied} for transaction {}, the confirmed leg is {}",
                        transaction.id, leg.amount_minor
                    ),
                ),
                None if transaction.completed => self.violation(
                    &stream,
                    None,
                    &format!(
                        "settled, but its leg on account {} was never applied",
                        leg.account_id
                    ),
                ),
                None => {
                    let flying = in_flight_minor.entry(leg.currency).or_default();
                    *flying = flying.saturating_add(leg.amount_minor);
                }
            }
        }
    }

    /// Nothing of a pending or rejected transaction may have reached a posted balance.
    fn check_nothing_applied(&mut self, transaction: &Transaction) {
        let mut touched: Vec<(AccountId, u64)> = self
            .applied_legs
            .iter()
            .filter(|((_, id), _)| *id == transaction.id)
            .map(|((account, _), (_, sequence))| (*account, *sequence))
            .collect();
        touched.sort();
        for (account, sequence) in touched {
            self.applied_legs.remove(&(account, transaction.id));
            self.violation(
                &format!("account/{account}"),
                Some(sequence),
                &format!(
                    "applied a leg of transaction {}, which is not confirmed",
                    transaction.id
                ),
            );
        }
    }

    /// Each account's posted balance equals the sum of its applied confirmed legs; no leg was
    /// applied for a transaction the log does not confirm; no hold or pending credit outlives
    /// its finished transaction; customers plus world plus in-flight legs sum to zero per
    /// currency.
    fn check_balances(
        &mut self,
        legs_by_account: &HashMap<AccountId, i64>,
        in_flight_minor: &BTreeMap<Currency, i64>,
        report: &mut AuditReport,
    ) {
        let mut stray: Vec<(AccountId, TransactionId, u64)> = self
            .applied_legs
            .iter()
            .map(|(&(account, transaction), &(_, sequence))| (account, transaction, sequence))
            .collect();
        stray.sort();
        for (account, transaction, sequence) in stray {
            self.violation(
                &format!("account/{account}"),
                Some(sequence),
                &format!("applied a leg of transaction {transaction}, which the log does not confirm on this account"),
            );
        }
        // What is in flight has left (or not yet reached) one side only.
        let mut totals: BTreeMap<Currency, i64> = report.world_balances_minor.clone();
        for (&currency, &flying) in in_flight_minor {
            let total = totals.entry(currency).or_default();
            *total = total.saturating_add(flying);
        }
        let mut account_ids: Vec<_> = self.accounts.keys().copied().collect();
        account_ids.sort();
        for account_id in account_ids {
            let account = self.accounts[&account_id].clone();
            let expected = legs_by_account.get(&account_id).copied().unwrap_or(0);
            let stream = format!("account/{account_id}");
            if account.balance_minor != expected {
                self.violation(
                    &stream,
                    None,
                    &format!(
                        "balance {} differs from its confirmed legs {expected}",
                        account.balance_minor
                    ),
                );
            }
            let open: BTreeSet<TransactionId> = account
                .holds
                .keys()
                .chain(account.pending_credits.keys())
                .copied()
                .collect();
            for transaction_id in open {
                if self
                    .transactions
                    .get(&transaction_id)
                    .is_some_and(|t| t.completed)
                {
                    self.violation(
                        &stream,
                        None,
                        &format!(
                            "still holds or expects funds of finished transaction {transaction_id}"
                        ),
                    );
                }
            }
            let total = totals.entry(account.currency).or_default();
            *total = total.saturating_add(account.balance_minor);
        }
        for (currency, total) in totals {
            if total != 0 {
                self.violation(
                    "ledger",
                    None,
                    &format!("{currency}: customers and world sum to {total}, not 0"),
                );
            }
        }
    }

    fn violation(&mut self, stream: &str, sequence: Option<u64>, problem: &str) {
        self.violations.push(Violation {
            stream: stream.to_owned(),
            sequence,
            problem: problem.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    //! Logs written with the domain's own `decide` and the saga's commands (so a clean log is one
    //! the write side could commit), then corrupted by storing what it would never decide; and
    //! the simulator's logs under random operations.

    use std::collections::{BTreeMap, BTreeSet, HashMap};

    use chrono::{DateTime, Utc};
    use proptest::prelude::*;
    use proptest::sample::Index;
    use uuid::Uuid;

    use super::*;
    use crate::account::AccountCommand;
    use crate::ids::CustomerId;
    use crate::money::Amount;
    use crate::saga;
    use crate::simulation::{self, Committed};
    use crate::transaction::{
        FraudDecision, FraudOutcome, Leg, RejectionReason, TransactionCommand, TransactionKind,
        TransactionRequest,
    };

    const OWNER: CustomerId = CustomerId(Uuid::from_u128(0xC0FFEE));
    /// Cases of the property test; each runs the whole simulation again.
    const SIMULATED_CASES: u32 = 512;

    fn usd() -> Currency {
        Currency::from_code("USD").expect("USD is in the currency table")
    }

    fn eur() -> Currency {
        Currency::from_code("EUR").expect("EUR is in the currency table")
    }

    fn amount(minor: i64) -> Amount {
        Amount::from_minor(minor).expect("test amounts are positive and small")
    }

    /// Folds a log in commit order, as `ledger verify` does.
    fn audit(log: &[Committed]) -> AuditReport {
        let mut audit = Audit::new();
        for committed in log {
            match committed {
                Committed::Account {
                    account_id,
                    sequence,
                    event,
                } => audit.account_event(*account_id, *sequence, event),
                Committed::Transaction {
                    transaction_id,
                    sequence,
                    event,
                } => audit.transaction_event(*transaction_id, *sequence, event),
            }
        }
        audit.finish()
    }

    fn account_stream(id: AccountId) -> String {
        format!("account/{id}")
    }

    fn transaction_stream(id: TransactionId) -> String {
        format!("transaction/{id}")
    }

    /// Where the report's violations are, as (stream, sequence).
    fn located(report: &AuditReport) -> BTreeSet<(String, Option<u64>)> {
        report
            .violations
            .iter()
            .map(|violation| (violation.stream.clone(), violation.sequence))
            .collect()
    }

    /// The one violation reported at `stream` and `sequence`, whose problem mentions `problem`.
    fn assert_reported(report: &AuditReport, stream: &str, sequence: Option<u64>, problem: &str) {
        let found: Vec<&Violation> = report
            .violations
            .iter()
            .filter(|violation| violation.stream == stream && violation.sequence == sequence)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{stream} {sequence:?} in {:#?}",
            report.violations
        );
        assert!(
            found[0].problem.contains(problem),
            "{:?} should mention {problem:?}",
            found[0].problem
        );
    }

    /// A log being written: events decided by the domain, or stored as they are to corrupt it.
    #[derive(Default)]
    struct Log {
        entries: Vec<Committed>,
        accounts: HashMap<AccountId, Account>,
        transactions: HashMap<TransactionId, Transaction>,
        account_sequences: HashMap<AccountId, u64>,
        transaction_sequences: HashMap<TransactionId, u64>,
        ids_used: u128,
        seconds: i64,
    }

    impl Log {
        fn now(&mut self) -> DateTime<Utc> {
            self.seconds += 1;
            DateTime::from_timestamp(1_700_000_000 + self.seconds, 0)
                .expect("a 2023 timestamp is in range")
        }

        fn fresh_id(&mut self) -> Uuid {
            self.ids_used += 1;
            Uuid::from_u128(self.ids_used)
        }

        /// Stores an account event whether or not it follows; returns its sequence.
        fn store_account(&mut self, account_id: AccountId, event: AccountEvent) -> u64 {
            let sequence = self.account_sequences.entry(account_id).or_default();
            *sequence += 1;
            let sequence = *sequence;
            if let Ok(after) = Account::apply(self.accounts.get(&account_id).cloned(), &event) {
                self.accounts.insert(account_id, after);
            }
            self.entries.push(Committed::Account {
                account_id,
                sequence,
                event,
            });
            sequence
        }

        /// Stores a transaction event whether or not it follows; returns its sequence.
        fn store_transaction(&mut self, id: TransactionId, event: TransactionEvent) -> u64 {
            let sequence = self.transaction_sequences.entry(id).or_default();
            *sequence += 1;
            let sequence = *sequence;
            if let Ok(after) = Transaction::apply(self.transactions.get(&id).cloned(), &event) {
                self.transactions.insert(id, after);
            }
            self.entries.push(Committed::Transaction {
                transaction_id: id,
                sequence,
                event,
            });
            sequence
        }

        /// Decides an account command and stores what it decided.
        fn account(
            &mut self,
            account_id: AccountId,
            command: &AccountCommand,
        ) -> Result<(), crate::account::AccountError> {
            for event in Account::decide(self.accounts.get(&account_id), command)? {
                self.store_account(account_id, event);
            }
            Ok(())
        }

        /// Decides a transaction command, which the test only sends when it is allowed.
        fn record(&mut self, id: TransactionId, command: TransactionCommand) {
            let events = Transaction::decide(self.transactions.get(&id), &command)
                .unwrap_or_else(|error| panic!("{command:?} refused: {error}"));
            for event in events {
                self.store_transaction(id, event);
            }
        }

        fn open(&mut self, currency: Currency) -> AccountId {
            let account_id = AccountId(self.fresh_id());
            let at = self.now();
            let command = AccountCommand::Open {
                account_id,
                owner_id: OWNER,
                currency,
                name: None,
                at,
            };
            self.account(account_id, &command)
                .expect("a new account opens");
            account_id
        }

        fn create(
            &mut self,
            kind: TransactionKind,
            minor: i64,
            source: Option<AccountId>,
            destination: Option<AccountId>,
        ) -> TransactionId {
            let customer = source.or(destination).expect("a customer account");
            let currency = self.accounts[&customer].currency;
            let request =
                TransactionRequest::new(kind, amount(minor), currency, source, destination, None)
                    .expect("a well-formed request");
            let id = TransactionId(self.fresh_id());
            let at = self.now();
            self.record(
                id,
                TransactionCommand::Create {
                    transaction_id: id,
                    request,
                    initiated_by: OWNER,
                    at,
                },
            );
            id
        }

        fn transfer(&mut self, from: AccountId, to: AccountId, minor: i64) -> TransactionId {
            self.create(TransactionKind::Transfer, minor, Some(from), Some(to))
        }

        /// Runs account commands of a saga step in order; the first refusal stops them.
        fn run(
            &mut self,
            commands: Vec<(AccountId, AccountCommand)>,
        ) -> Result<(), crate::account::AccountError> {
            for (account_id, command) in commands {
                self.account(account_id, &command)?;
            }
            Ok(())
        }

        /// The saga's reservation: hold and reserve, then `FundsReserved`, or the rejection.
        fn reserve(&mut self, id: TransactionId) {
            let at = self.now();
            let commands = saga::reservation_commands(&self.transactions[&id], at);
            let command = match self.run(commands) {
                Ok(()) => TransactionCommand::RecordReservation { at },
                Err(error) => TransactionCommand::Reject {
                    reason: saga::rejection_for(&error).expect("a rejecting refusal"),
                    at,
                },
            };
            self.record(id, command);
        }

        fn fraud(&mut self, id: TransactionId, outcome: FraudOutcome) {
            let at = self.now();
            let decision = FraudDecision {
                outcome,
                rule: None,
                details: serde_json::Value::Null.into(),
            };
            self.record(id, TransactionCommand::RecordFraudDecision { decision, at });
        }

        fn confirm(&mut self, id: TransactionId) {
            let at = self.now();
            self.record(id, TransactionCommand::Confirm { at });
        }

        fn reject(&mut self, id: TransactionId, reason: RejectionReason) {
            let at = self.now();
            self.record(id, TransactionCommand::Reject { reason, at });
        }

        /// Reserved, approved and confirmed: in flight until settled.
        fn confirmed(&mut self, id: TransactionId) -> TransactionId {
            self.reserve(id);
            self.fraud(id, FraudOutcome::Approved);
            self.confirm(id);
            id
        }

        fn settle(&mut self, id: TransactionId) {
            let at = self.now();
            let commands = saga::settlement_commands(&self.transactions[&id], at);
            self.run(commands).expect("settling never fails");
            self.record(id, TransactionCommand::CompleteSettlement { at });
        }

        fn release(&mut self, id: TransactionId) {
            let at = self.now();
            let commands = saga::release_commands(&self.transactions[&id], at);
            self.run(commands).expect("releasing never fails");
            self.record(id, TransactionCommand::CompleteRelease { at });
        }

        /// A deposit carried to the end.
        fn deposit(&mut self, to: AccountId, minor: i64) -> TransactionId {
            let id = self.create(TransactionKind::Deposit, minor, None, Some(to));
            self.confirmed(id);
            self.settle(id);
            id
        }

        /// An account of `currency` funded by one settled deposit.
        fn funded(&mut self, currency: Currency, minor: i64) -> AccountId {
            let account_id = self.open(currency);
            self.deposit(account_id, minor);
            account_id
        }

        /// The events stored so far on one account for one transaction.
        fn account_events_of(&self, account_id: AccountId, id: TransactionId) -> Vec<AccountEvent> {
            self.entries
                .iter()
                .filter_map(|committed| match committed {
                    Committed::Account {
                        account_id: stream,
                        event,
                        ..
                    } if *stream == account_id && event.transaction_id() == Some(id) => {
                        Some(event.clone())
                    }
                    _ => None,
                })
                .collect()
        }

        fn audit(&self) -> AuditReport {
            audit(&self.entries)
        }
    }

    /// Per currency, minus the sum of the customer balances: what the world account must hold.
    fn minus_customers(accounts: &BTreeMap<AccountId, Account>) -> BTreeMap<Currency, i64> {
        let mut world = BTreeMap::new();
        for account in accounts.values() {
            *world.entry(account.currency).or_default() -= account.balance_minor;
        }
        world
    }

    #[test]
    fn a_clean_log_reports_no_violation_and_the_right_balances() {
        // Deposits, a settled transfer, a released rejection and a withdrawal audit clean, with the balances and counts they imply.
        let mut log = Log::default();
        let alice = log.funded(usd(), 10_000);
        let bob = log.funded(usd(), 500);
        let carol = log.funded(eur(), 7_000);
        let transfer = log.transfer(alice, bob, 3_000);
        log.confirmed(transfer);
        log.settle(transfer);
        let rejected = log.transfer(bob, alice, 200);
        log.reserve(rejected);
        log.fraud(rejected, FraudOutcome::Rejected);
        log.reject(rejected, RejectionReason::FraudSuspected);
        log.release(rejected);
        let withdrawal = log.create(TransactionKind::Withdrawal, 1_500, Some(alice), None);
        log.confirmed(withdrawal);
        log.settle(withdrawal);

        let report = log.audit();

        assert!(report.is_clean(), "{:#?}", report.violations);
        assert!(report.in_flight.is_empty(), "{:?}", report.in_flight);
        let balance = |id| report.accounts[&id].balance_minor;
        assert_eq!(balance(alice), 10_000 - 3_000 - 1_500);
        assert_eq!(balance(bob), 500 + 3_000);
        assert_eq!(balance(carol), 7_000);
        for account in report.accounts.values() {
            assert_eq!(
                account.available_minor(),
                account.balance_minor,
                "{account:?}"
            );
            assert!(account.holds.is_empty() && account.pending_credits.is_empty());
        }
        assert_eq!(
            report.accounts,
            log.accounts.clone().into_iter().collect::<BTreeMap<_, _>>(),
            "the audit folds the accounts as the write side does"
        );
        assert_eq!(
            report.world_balances_minor,
            BTreeMap::from([(usd(), -(10_000 + 500 - 1_500)), (eur(), -7_000)])
        );
        assert_eq!(
            report.world_balances_minor,
            minus_customers(&report.accounts)
        );
        assert_eq!(
            report.transactions_confirmed, 5,
            "three deposits, the transfer, the withdrawal"
        );
        assert_eq!(report.transactions_rejected, 1);
    }

    #[test]
    fn a_confirmed_transaction_not_yet_settled_is_in_flight_not_a_violation() {
        // Confirmed but unsettled transactions, even half settled, are listed in flight and break nothing.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let bob = log.open(usd());
        let unsettled_transfer = log.transfer(alice, bob, 300);
        log.confirmed(unsettled_transfer);
        let unsettled_deposit = log.create(TransactionKind::Deposit, 50, None, Some(bob));
        log.confirmed(unsettled_deposit);
        let half_settled = log.transfer(alice, bob, 200);
        log.confirmed(half_settled);
        let at = log.now();
        log.account(
            alice,
            &AccountCommand::SettleHold {
                transaction_id: half_settled,
                at,
            },
        )
        .expect("the hold is open");

        let report = log.audit();

        assert!(report.is_clean(), "{:#?}", report.violations);
        let mut expected = vec![unsettled_transfer, unsettled_deposit, half_settled];
        expected.sort();
        assert_eq!(report.in_flight, expected);
        assert_eq!(
            report.accounts[&alice].balance_minor, 800,
            "only the settled source moved"
        );
        assert_eq!(report.accounts[&alice].held_minor, 300);
        assert_eq!(
            report.accounts[&bob].balance_minor, 0,
            "no credit landed yet"
        );
        assert_eq!(report.accounts[&bob].pending_credits_minor, 550);
        assert_eq!(
            report.world_balances_minor,
            BTreeMap::from([(usd(), -1_050)])
        );
        assert_eq!(report.transactions_confirmed, 4);
    }

    #[test]
    fn a_leg_applied_twice_is_reported_at_the_second_application() {
        // Replaying a deposit's CreditReserved + CreditPosted pair is reported at the second CreditPosted, and its balance breaks.
        let mut log = Log::default();
        let alice = log.open(usd());
        let deposit = log.deposit(alice, 1_000);
        for event in log.account_events_of(alice, deposit) {
            log.store_account(alice, event);
        }
        let replayed_post = log.account_sequences[&alice];

        let report = log.audit();

        assert_reported(
            &report,
            &account_stream(alice),
            Some(replayed_post),
            "applied twice",
        );
        assert_reported(
            &report,
            &account_stream(alice),
            None,
            "differs from its confirmed legs",
        );
        assert_reported(
            &report,
            "ledger",
            None,
            "USD: customers and world sum to 1000",
        );
        assert_eq!(report.violations.len(), 3, "{:#?}", report.violations);
        assert_eq!(report.accounts[&alice].balance_minor, 2_000);
    }

    #[test]
    fn a_hold_settled_for_a_rejected_transaction_is_reported_at_the_settlement() {
        // Settling the hold of a rejected transfer is reported at the HoldSettled, and the debit breaks the balance.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let bob = log.funded(usd(), 10);
        let rejected = log.transfer(alice, bob, 300);
        log.reserve(rejected);
        log.fraud(rejected, FraudOutcome::Rejected);
        log.reject(rejected, RejectionReason::FraudSuspected);
        let at = log.now();
        log.account(
            alice,
            &AccountCommand::SettleHold {
                transaction_id: rejected,
                at,
            },
        )
        .expect("the hold is still open");
        let settled = log.account_sequences[&alice];
        log.release(rejected);

        let report = log.audit();

        assert_reported(
            &report,
            &account_stream(alice),
            Some(settled),
            "not confirmed",
        );
        assert_reported(&report, &account_stream(alice), None, "balance 700 differs");
        assert_reported(
            &report,
            "ledger",
            None,
            "USD: customers and world sum to -300",
        );
        assert_eq!(report.violations.len(), 3, "{:#?}", report.violations);
        assert!(report.in_flight.is_empty());
        assert_eq!(report.transactions_rejected, 1);
    }

    #[test]
    fn a_credit_posted_without_confirmation_is_reported_and_breaks_the_balance() {
        // A CreditPosted for a deposit the log never confirms is reported at that event, and the balance no longer matches the confirmed legs.
        let mut log = Log::default();
        let alice = log.open(usd());
        let unconfirmed = log.create(TransactionKind::Deposit, 400, None, Some(alice));
        log.reserve(unconfirmed);
        log.fraud(unconfirmed, FraudOutcome::Approved);
        let at = log.now();
        log.account(
            alice,
            &AccountCommand::PostCredit {
                transaction_id: unconfirmed,
                at,
            },
        )
        .expect("the credit is reserved");
        let posted = log.account_sequences[&alice];

        let report = log.audit();

        assert_reported(
            &report,
            &account_stream(alice),
            Some(posted),
            "not confirmed",
        );
        assert_reported(
            &report,
            &account_stream(alice),
            None,
            "balance 400 differs from its confirmed legs 0",
        );
        assert_reported(
            &report,
            "ledger",
            None,
            "USD: customers and world sum to 400",
        );
        assert_eq!(report.violations.len(), 3, "{:#?}", report.violations);
        assert_eq!(report.in_flight, vec![unconfirmed], "still pending");
    }

    #[test]
    fn a_credit_posted_for_a_transaction_the_log_never_created_is_reported() {
        // A reserved and posted credit naming no transaction of the log is reported at its CreditPosted.
        let mut log = Log::default();
        let alice = log.open(usd());
        let unknown = TransactionId(Uuid::from_u128(0xBAD));
        for event in [
            AccountEvent::CreditReserved {
                transaction_id: unknown,
                amount_minor: 70,
                pending_credits_after_minor: 70,
                at: log.now(),
            },
            AccountEvent::CreditPosted {
                transaction_id: unknown,
                amount_minor: 70,
                balance_after_minor: 70,
                pending_credits_after_minor: 0,
                at: log.now(),
            },
        ] {
            log.store_account(alice, event);
        }

        let report = log.audit();

        assert_reported(&report, &account_stream(alice), Some(3), "does not confirm");
        assert_reported(&report, &account_stream(alice), None, "balance 70 differs");
        assert_reported(
            &report,
            "ledger",
            None,
            "USD: customers and world sum to 70",
        );
        assert_eq!(report.violations.len(), 3, "{:#?}", report.violations);
    }

    #[test]
    fn a_settled_transaction_whose_leg_never_landed_is_reported() {
        // SettlementCompleted with the destination's credit never posted is reported on the transaction, and its credit stays open.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let bob = log.open(usd());
        let transfer = log.transfer(alice, bob, 300);
        log.confirmed(transfer);
        let at = log.now();
        log.account(
            alice,
            &AccountCommand::SettleHold {
                transaction_id: transfer,
                at,
            },
        )
        .expect("the hold is open");
        log.record(transfer, TransactionCommand::CompleteSettlement { at });

        let report = log.audit();

        assert_reported(
            &report,
            &transaction_stream(transfer),
            None,
            &format!("its leg on account {bob} was never applied"),
        );
        assert_reported(
            &report,
            &account_stream(bob),
            None,
            "still holds or expects funds",
        );
        assert_reported(
            &report,
            "ledger",
            None,
            "USD: customers and world sum to -300",
        );
        assert_eq!(report.violations.len(), 3, "{:#?}", report.violations);
        assert!(report.in_flight.is_empty(), "settled is not in flight");
    }

    #[test]
    fn a_hold_left_open_on_a_completed_transaction_is_reported() {
        // A rejected transfer marked released while its source still holds the funds is reported on that account.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let bob = log.open(usd());
        let rejected = log.transfer(alice, bob, 300);
        log.reserve(rejected);
        log.reject(rejected, RejectionReason::FraudCheckTimeout);
        let at = log.now();
        log.account(
            bob,
            &AccountCommand::CancelCredit {
                transaction_id: rejected,
                at,
            },
        )
        .expect("the credit is reserved");
        log.record(rejected, TransactionCommand::CompleteRelease { at });

        let report = log.audit();

        assert_reported(
            &report,
            &account_stream(alice),
            None,
            &format!("finished transaction {rejected}"),
        );
        assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
        assert_eq!(report.accounts[&alice].available_minor(), 700);
    }

    #[test]
    fn an_event_before_the_account_is_opened_is_reported_at_that_event() {
        // An account event stored before AccountOpened is reported at its sequence; the rest of the stream still folds.
        let mut log = Log::default();
        let early = AccountId(Uuid::from_u128(0xEA21));
        let stray = TransactionId(Uuid::from_u128(0x57A7));
        let at = log.now();
        log.store_account(
            early,
            AccountEvent::CreditReserved {
                transaction_id: stray,
                amount_minor: 5,
                pending_credits_after_minor: 5,
                at,
            },
        );
        log.store_account(
            early,
            AccountEvent::AccountOpened {
                account_id: early,
                owner_id: OWNER,
                currency: usd(),
                name: None,
                opened_at: at,
            },
        );
        log.deposit(early, 100);

        let report = log.audit();

        assert_reported(&report, &account_stream(early), Some(1), "never opened");
        assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
        assert_eq!(report.accounts[&early].balance_minor, 100);
        assert!(report.accounts[&early].pending_credits.is_empty());
    }

    #[test]
    fn a_hold_beyond_the_available_balance_is_reported_as_an_overdraft() {
        // A FundsHeld for more than the account has available is reported at that event and not folded.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let withdrawal = log.create(TransactionKind::Withdrawal, 1_500, Some(alice), None);
        let at = log.now();
        let held = log.store_account(
            alice,
            AccountEvent::FundsHeld {
                transaction_id: withdrawal,
                amount_minor: 1_500,
                held_after_minor: 1_500,
                available_after_minor: -500,
                at,
            },
        );
        log.reject(withdrawal, RejectionReason::FraudSuspected);
        log.release(withdrawal);

        let report = log.audit();

        assert_reported(&report, &account_stream(alice), Some(held), "overdraws");
        assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
        assert_eq!(report.accounts[&alice].available_minor(), 1_000);
    }

    #[test]
    fn a_confirmation_whose_legs_do_not_sum_to_zero_is_reported_at_that_event() {
        // A TransactionConfirmed whose legs do not cancel is reported at its sequence and the transaction stays pending.
        let mut log = Log::default();
        let alice = log.funded(usd(), 1_000);
        let bob = log.open(usd());
        let transfer = log.transfer(alice, bob, 300);
        log.reserve(transfer);
        log.fraud(transfer, FraudOutcome::Approved);
        let at = log.now();
        let leg = |account_id, amount_minor| Leg {
            account_id,
            amount_minor,
            currency: usd(),
        };
        let confirmed = log.store_transaction(
            transfer,
            TransactionEvent::TransactionConfirmed {
                legs: vec![leg(alice, -300), leg(bob, 200)],
                at,
            },
        );

        let report = log.audit();

        assert_reported(
            &report,
            &transaction_stream(transfer),
            Some(confirmed),
            "do not sum to zero",
        );
        assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
        assert_eq!(report.in_flight, vec![transfer]);
        assert_eq!(report.transactions_confirmed, 1, "the funding deposit only");
    }

    #[test]
    fn confirmed_legs_that_cancel_only_across_currencies_are_reported_per_currency() {
        // Legs summing to zero overall but not per currency are reported as a ledger-wide conservation break in each currency.
        let mut log = Log::default();
        let alice = log.open(usd());
        let deposit = log.create(TransactionKind::Deposit, 300, None, Some(alice));
        log.reserve(deposit);
        log.fraud(deposit, FraudOutcome::Approved);
        let at = log.now();
        log.store_transaction(
            deposit,
            TransactionEvent::TransactionConfirmed {
                legs: vec![
                    Leg {
                        account_id: AccountId::world(usd()),
                        amount_minor: -300,
                        currency: usd(),
                    },
                    Leg {
                        account_id: alice,
                        amount_minor: 300,
                        currency: eur(),
                    },
                ],
                at,
            },
        );
        log.settle(deposit);

        let report = log.audit();

        assert_eq!(
            located(&report),
            BTreeSet::from([("ledger".to_owned(), None)]),
            "{:#?}",
            report.violations
        );
        assert_eq!(report.violations.len(), 2, "{:#?}", report.violations);
        assert!(
            report.violations[0]
                .problem
                .contains("legs in EUR sum to 300")
        );
        assert!(
            report.violations[1]
                .problem
                .contains("legs in USD sum to -300")
        );
    }

    /// The transactions created in `log` and not yet settled or released, by their events alone.
    fn unfinished(log: &[Committed]) -> Vec<TransactionId> {
        let mut created = BTreeSet::new();
        let mut finished = BTreeSet::new();
        for committed in log {
            if let Committed::Transaction {
                transaction_id,
                event,
                ..
            } = committed
            {
                match event {
                    TransactionEvent::TransactionCreated { .. } => created.insert(*transaction_id),
                    TransactionEvent::SettlementCompleted { .. }
                    | TransactionEvent::ReleaseCompleted { .. } => finished.insert(*transaction_id),
                    _ => false,
                };
            }
        }
        created.difference(&finished).copied().collect()
    }

    fn count_events(log: &[Committed], event_type: &str) -> usize {
        log.iter()
            .filter(|committed| {
                matches!(committed, Committed::Transaction { event, .. } if event.event_type() == event_type)
            })
            .count()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: SIMULATED_CASES,
            ..ProptestConfig::default()
        })]

        #[test]
        fn the_simulators_logs_audit_clean(case in simulation::case(), cut in any::<Index>()) {
            // Every log the simulator commits audits clean: with nothing in flight once all is done, and cut anywhere with exactly the unfinished transactions in flight.
            let simulated = simulation::simulate_logged(&case);
            let log = &simulated.log;

            let report = audit(log);
            prop_assert!(report.is_clean(), "{:#?}", report.violations);
            prop_assert!(report.in_flight.is_empty(), "{:?}", report.in_flight);
            let live: BTreeMap<AccountId, Account> = simulated.accounts.clone().into_iter().collect();
            prop_assert_eq!(&report.accounts, &live);
            prop_assert_eq!(&report.world_balances_minor, &minus_customers(&live));
            prop_assert_eq!(report.transactions_confirmed, count_events(log, "TransactionConfirmed"));
            prop_assert_eq!(report.transactions_rejected, count_events(log, "TransactionRejected"));
            prop_assert_eq!(
                report.transactions_confirmed + report.transactions_rejected,
                count_events(log, "TransactionCreated")
            );

            for end in [simulated.operations_end, cut.index(log.len() + 1)] {
                let report = audit(&log[..end]);
                prop_assert!(report.is_clean(), "cut at {}: {:#?}", end, report.violations);
                prop_assert_eq!(report.in_flight, unfinished(&log[..end]), "cut at {}", end);
            }
        }
    }
}
