//! Property tests of SPEC §8 against an in-memory ledger.
//!
//! The simulator keeps customer accounts and transactions in maps and carries out saga steps
//! exactly as the process manager does, using only the domain's own functions: `saga::next_step`
//! decides, `saga::*_commands` name the account commands, `saga::rejection_for` maps a refusal,
//! and `decide`/`apply` change the accounts and transactions. Random operation sequences then mix
//! new transactions, fraud decisions (duplicated, late), saga steps (duplicated, or cut short by a
//! crash and resumed later) and a clock that jumps past the decision timeout. After every
//! operation and at the end, the invariants of SPEC §8 are checked against expectations computed
//! independently of the domain: no overdraft, conservation, exactly once and liveness.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use uuid::Uuid;

use crate::account::tests::assert_carried_balances_match;
use crate::account::{Account, AccountCommand, AccountEvent};
use crate::ids::{AccountId, CustomerId, TransactionId};
use crate::money::{Amount, Currency};
use crate::saga::{self, SagaStep};
use crate::transaction::{
    FraudDecision, FraudOutcome, Outcome, RejectionReason, Transaction, TransactionCommand,
    TransactionEvent, TransactionKind, TransactionRequest, TransactionStatus,
};

/// The fraud decision timeout of the simulation: SPEC §4's default.
const DECISION_TIMEOUT_SECONDS: i64 = 300;
/// One or two of these currencies per case: one with decimals, one without.
const CURRENCY_CODES: [&str; 2] = ["USD", "JPY"];
/// Enough accounts for transfers in both currencies, few enough that they collide often.
const ACCOUNTS_MAX: usize = 5;
/// The initial deposit of each account is at most this many minor units.
const FUNDING_MINOR_MAX: i64 = 50_000;
/// Transactions move at most this much: close to the funding, so holds run out of funds often.
const TRANSACTION_MINOR_MAX: i64 = 40_000;
/// Operations per case: long enough for holds, crashes and timeouts to interleave.
const OPERATIONS_MAX: usize = 100;
/// Cases of the property test: a few seconds in a debug build.
const CASES: u32 = 1_024;
/// Cases the coverage test generates to show that every path is exercised.
const COVERAGE_CASES: usize = 48;
/// Steps a transaction may take to reach `Done` once operations stop: reserve, a decision or
/// the timeout, confirm or reject, settle or release, with room to spare.
const FINISH_STEPS_MAX: usize = 8;

fn currency(index: usize) -> Currency {
    Currency::from_code(CURRENCY_CODES[index]).expect("the simulation's currencies are known")
}

/// One customer account of a case: its currency and its initial deposit.
#[derive(Debug, Clone, Copy)]
struct AccountSetup {
    currency_index: usize,
    funding_minor: i64,
}

/// The amount of a new transaction: a fixed one, or one at the boundary of what the debited
/// (or, for a deposit, credited) account has available when the transaction is created.
#[derive(Debug, Clone, Copy)]
enum AmountChoice {
    Fixed(i64),
    AvailablePlus(i64),
}

fn amount_choice() -> impl Strategy<Value = AmountChoice> {
    prop_oneof![
        3 => (1..=TRANSACTION_MINOR_MAX).prop_map(AmountChoice::Fixed),
        1 => (-1..=1_i64).prop_map(AmountChoice::AvailablePlus),
    ]
}

/// A transaction chosen when the operation happens: usually an unfinished one, sometimes any
/// (which lets duplicates and late arrivals hit finished transactions).
#[derive(Debug, Clone)]
struct Pick {
    index: Index,
    unfinished: bool,
}

fn pick() -> impl Strategy<Value = Pick> {
    (any::<Index>(), prop::bool::weighted(0.8))
        .prop_map(|(index, unfinished)| Pick { index, unfinished })
}

/// Something that happens to the ledger. Indices pick among what exists when it happens.
#[derive(Debug, Clone)]
enum Operation {
    /// A client creates a transaction. A transfer goes to another account of the same currency.
    Create {
        kind: TransactionKind,
        source: Index,
        destination: Index,
        amount: AmountChoice,
    },
    /// A client retries a creation with the same idempotency key and body.
    RetryCreate { transaction: Pick },
    /// The fraud worker's decision arrives, perhaps twice, perhaps after the outcome.
    DeliverDecision {
        transaction: Pick,
        approved: bool,
        twice: bool,
    },
    /// The process manager runs the next step of a transaction.
    RunStep { transaction: Pick },
    /// The process manager runs the next step, and the same step is delivered again.
    RunStepTwice { transaction: Pick },
    /// The process manager dies after this many account commands of the next step.
    CrashMidStep {
        transaction: Pick,
        commands_done: usize,
    },
    /// Time passes, possibly beyond the decision timeout.
    AdvanceClock { seconds: i64 },
}

#[derive(Debug, Clone)]
pub(crate) struct Case {
    accounts: Vec<AccountSetup>,
    operations: Vec<Operation>,
}

fn kind() -> impl Strategy<Value = TransactionKind> {
    prop_oneof![
        Just(TransactionKind::Deposit),
        Just(TransactionKind::Withdrawal),
        Just(TransactionKind::Transfer),
    ]
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => (kind(), any::<Index>(), any::<Index>(), amount_choice()).prop_map(
            |(kind, source, destination, amount)| Operation::Create {
                kind,
                source,
                destination,
                amount,
            }
        ),
        1 => pick().prop_map(|transaction| Operation::RetryCreate { transaction }),
        3 => (pick(), prop::bool::weighted(0.85), prop::bool::weighted(0.2)).prop_map(
            |(transaction, approved, twice)| Operation::DeliverDecision {
                transaction,
                approved,
                twice,
            }
        ),
        6 => pick().prop_map(|transaction| Operation::RunStep { transaction }),
        2 => pick().prop_map(|transaction| Operation::RunStepTwice { transaction }),
        2 => (pick(), 0..=2_usize).prop_map(|(transaction, commands_done)| {
            Operation::CrashMidStep {
                transaction,
                commands_done,
            }
        }),
        1 => (1..=DECISION_TIMEOUT_SECONDS).prop_map(|seconds| Operation::AdvanceClock { seconds }),
    ]
}

pub(crate) fn case() -> impl Strategy<Value = Case> {
    (1..=CURRENCY_CODES.len())
        .prop_flat_map(|currencies| {
            let setup = (0..currencies, 1_000..=FUNDING_MINOR_MAX).prop_map(
                |(currency_index, funding_minor)| AccountSetup {
                    currency_index,
                    funding_minor,
                },
            );
            (
                prop::collection::vec(setup, 2..=ACCOUNTS_MAX),
                prop::collection::vec(operation(), 1..=OPERATIONS_MAX),
            )
        })
        .prop_map(|(accounts, operations)| Case {
            accounts,
            operations,
        })
}

/// How often each path was taken, so a test can show the generator reaches all of them.
#[derive(Debug, Default)]
struct Coverage {
    confirmed: usize,
    rejected: HashMap<RejectionReason, usize>,
    /// Crashes that left some account commands of a step applied and the rest undone.
    partial_crashes: usize,
    duplicate_steps: usize,
    duplicate_decisions: usize,
    late_decisions: usize,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.confirmed += other.confirmed;
        for (reason, count) in other.rejected {
            *self.rejected.entry(reason).or_default() += count;
        }
        self.partial_crashes += other.partial_crashes;
        self.duplicate_steps += other.duplicate_steps;
        self.duplicate_decisions += other.duplicate_decisions;
        self.late_decisions += other.late_decisions;
    }
}

/// How many times each account step of one transaction happened on one account, counted from
/// the account's event log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StepCounts {
    held: usize,
    settled: usize,
    released: usize,
    reserved: usize,
    posted: usize,
    cancelled: usize,
}

/// What became of a step's account commands.
enum Progress {
    /// Every command ran (or was a no-op).
    Completed,
    /// An account refused, for a reason that rejects the transaction.
    Refused(RejectionReason),
    /// The process died before the end.
    Crashed,
}

/// One stored event, as an event store commits it: its stream and its sequence there (from 1).
#[derive(Debug, Clone)]
pub(crate) enum Committed {
    Account {
        account_id: AccountId,
        sequence: u64,
        event: AccountEvent,
    },
    Transaction {
        transaction_id: TransactionId,
        sequence: u64,
        event: TransactionEvent,
    },
}

/// What a case leaves behind for checks made outside this module (the audit's).
pub(crate) struct Simulated {
    /// Every event of every stream, in the order it was committed.
    pub(crate) log: Vec<Committed>,
    /// How much of `log` the random operations wrote, before every transaction was driven to
    /// its end.
    pub(crate) operations_end: usize,
    /// The customer accounts at the end.
    pub(crate) accounts: HashMap<AccountId, Account>,
}

/// The in-memory ledger: customer accounts and transactions with their event logs.
struct Ledger {
    now: DateTime<Utc>,
    /// Customer accounts in opening order, to pick them by index.
    customers: Vec<AccountId>,
    owners: HashMap<AccountId, CustomerId>,
    accounts: HashMap<AccountId, Account>,
    account_events: HashMap<AccountId, Vec<AccountEvent>>,
    transactions: HashMap<TransactionId, Transaction>,
    transaction_events: HashMap<TransactionId, Vec<TransactionEvent>>,
    /// Every event above, in commit order.
    log: Vec<Committed>,
    /// Transactions in creation order, to pick them by index.
    created: Vec<TransactionId>,
    /// Idempotency keys handed out so far; each creation uses a fresh one.
    keys_used: u64,
    coverage: Coverage,
}

impl Ledger {
    /// Opens one account per setup and funds it with a deposit carried through the saga.
    fn open(setups: &[AccountSetup]) -> Ledger {
        let mut ledger = Ledger {
            now: DateTime::from_timestamp(1_700_000_000, 0).expect("a 2023 timestamp is in range"),
            customers: Vec::new(),
            owners: HashMap::new(),
            accounts: HashMap::new(),
            account_events: HashMap::new(),
            transactions: HashMap::new(),
            transaction_events: HashMap::new(),
            log: Vec::new(),
            created: Vec::new(),
            keys_used: 0,
            coverage: Coverage::default(),
        };
        for (index, setup) in setups.iter().enumerate() {
            let number = u128::try_from(index).expect("a handful of accounts") + 1;
            let account_id = AccountId(Uuid::from_u128(number));
            let owner_id = CustomerId(Uuid::from_u128(0x1000 + number));
            let open = AccountCommand::Open {
                account_id,
                owner_id,
                currency: currency(setup.currency_index),
                name: Some(format!("account {number}")),
                at: ledger.now,
            };
            ledger
                .account_command(account_id, &open)
                .expect("a new account opens");
            ledger.customers.push(account_id);
            ledger.owners.insert(account_id, owner_id);
            let request = TransactionRequest::new(
                TransactionKind::Deposit,
                Amount::from_minor(setup.funding_minor).expect("funding is positive"),
                currency(setup.currency_index),
                None,
                Some(account_id),
                Some("initial funding".to_owned()),
            )
            .expect("a deposit into the new account is well formed");
            let id = ledger.create(request);
            ledger.drive_to_done(id, true);
        }
        ledger
    }

    /// Decides and applies one account command, checking the balances each event carries.
    fn account_command(
        &mut self,
        account_id: AccountId,
        command: &AccountCommand,
    ) -> Result<(), crate::account::AccountError> {
        let events = Account::decide(self.accounts.get(&account_id), command)?;
        for event in events {
            let after = Account::apply(self.accounts.remove(&account_id), &event)
                .unwrap_or_else(|violation| panic!("decided {event:?} must apply: {violation}"));
            assert_carried_balances_match(&event, &after);
            self.accounts.insert(account_id, after);
            let stream = self.account_events.entry(account_id).or_default();
            stream.push(event.clone());
            self.log.push(Committed::Account {
                account_id,
                sequence: stream.len() as u64,
                event,
            });
        }
        Ok(())
    }

    /// Decides and applies one transaction command and returns how many events it appended.
    /// The saga only sends commands its state allows, so a refusal is a bug.
    fn record(&mut self, id: TransactionId, command: TransactionCommand) -> usize {
        let events = Transaction::decide(self.transactions.get(&id), &command)
            .unwrap_or_else(|error| panic!("{command:?} on {id:?} refused: {error}"));
        for event in &events {
            let after = Transaction::apply(self.transactions.remove(&id), event)
                .unwrap_or_else(|violation| panic!("decided {event:?} must apply: {violation}"));
            self.transactions.insert(id, after);
            let stream = self.transaction_events.entry(id).or_default();
            stream.push(event.clone());
            self.log.push(Committed::Transaction {
                transaction_id: id,
                sequence: stream.len() as u64,
                event: event.clone(),
            });
        }
        events.len()
    }

    fn create(&mut self, request: TransactionRequest) -> TransactionId {
        let customer_account = request
            .source_account_id
            .or(request.destination_account_id)
            .expect("every request names a customer account");
        let initiated_by = self.owners[&customer_account];
        self.keys_used += 1;
        let key = format!("simulated-{}", self.keys_used);
        let id = TransactionId::from_idempotency_key(initiated_by, &key);
        let command = TransactionCommand::Create {
            transaction_id: id,
            request,
            initiated_by,
            at: self.now,
        };
        assert_eq!(
            self.record(id, command),
            1,
            "a fresh key creates a transaction"
        );
        self.created.push(id);
        id
    }

    fn pick(&self, pick: &Pick) -> TransactionId {
        let unfinished: Vec<TransactionId> = self
            .created
            .iter()
            .copied()
            .filter(|id| !self.transactions[id].completed)
            .collect();
        if pick.unfinished && !unfinished.is_empty() {
            return unfinished[pick.index.index(unfinished.len())];
        }
        // Funding deposits exist from the start, so there is always something to pick.
        self.created[pick.index.index(self.created.len())]
    }

    fn next_step(&self, id: TransactionId) -> SagaStep {
        saga::next_step(
            &self.transactions[&id],
            self.now,
            TimeDelta::seconds(DECISION_TIMEOUT_SECONDS),
        )
    }

    fn deliver_decision(&mut self, id: TransactionId, outcome: FraudOutcome) {
        let before = self.transactions[&id].clone();
        let decision = FraudDecision {
            outcome,
            rule: (outcome == FraudOutcome::Rejected).then(|| "amount_threshold".to_owned()),
            details: serde_json::json!({ "simulated": true }).into(),
        };
        let appended = self.record(
            id,
            TransactionCommand::RecordFraudDecision {
                decision,
                at: self.now,
            },
        );
        if before.outcome.is_some() {
            assert_eq!(appended, 0, "a late decision is acknowledged and ignored");
            self.coverage.late_decisions += 1;
        } else if before.fraud.is_some() {
            assert_eq!(appended, 0, "a duplicate decision is ignored");
            self.coverage.duplicate_decisions += 1;
        } else {
            assert_eq!(appended, 1, "the first decision is recorded");
        }
        if before.fraud.is_some() {
            assert_eq!(
                self.transactions[&id].fraud, before.fraud,
                "the first decision stands"
            );
        }
    }

    /// Runs at most `limit` of the step's account commands, in order, stopping at a refusal.
    fn run_account_commands(
        &mut self,
        commands: Vec<(AccountId, AccountCommand)>,
        limit: usize,
    ) -> Progress {
        let count = commands.len();
        for (account_id, command) in commands.into_iter().take(limit) {
            if let Err(error) = self.account_command(account_id, &command) {
                let reason = saga::rejection_for(&error)
                    .unwrap_or_else(|| panic!("{command:?} on {account_id:?} failed: {error}"));
                return Progress::Refused(reason);
            }
        }
        if limit < count {
            Progress::Crashed
        } else {
            Progress::Completed
        }
    }

    /// Carries out `step` as the process manager does. With `crash_after`, the process dies
    /// after that many account commands and before recording anything on the transaction.
    fn execute(&mut self, id: TransactionId, step: SagaStep, crash_after: Option<usize>) {
        let at = self.now;
        let transaction = self.transactions[&id].clone();
        let commands = match step {
            SagaStep::Reserve => saga::reservation_commands(&transaction, at),
            SagaStep::Settle => saga::settlement_commands(&transaction, at),
            SagaStep::Release => saga::release_commands(&transaction, at),
            SagaStep::Confirm | SagaStep::Reject(_) => Vec::new(),
            SagaStep::AwaitDecision { .. } | SagaStep::Done => return,
        };
        let events_before: usize = self.account_events.values().map(Vec::len).sum();
        let progress = self.run_account_commands(commands, crash_after.unwrap_or(usize::MAX));
        if crash_after.is_some() {
            let events_after: usize = self.account_events.values().map(Vec::len).sum();
            if events_after > events_before {
                self.coverage.partial_crashes += 1;
            }
            return;
        }
        let command = match (step, progress) {
            (_, Progress::Crashed) => unreachable!("only a limited run crashes"),
            (SagaStep::Reserve, Progress::Completed) => {
                TransactionCommand::RecordReservation { at }
            }
            (SagaStep::Reserve, Progress::Refused(reason)) => {
                TransactionCommand::Reject { reason, at }
            }
            (_, Progress::Refused(reason)) => panic!("{step:?} of {id:?} refused: {reason:?}"),
            (SagaStep::Confirm, Progress::Completed) => TransactionCommand::Confirm { at },
            (SagaStep::Reject(reason), Progress::Completed) => {
                TransactionCommand::Reject { reason, at }
            }
            (SagaStep::Settle, Progress::Completed) => {
                TransactionCommand::CompleteSettlement { at }
            }
            (SagaStep::Release, Progress::Completed) => TransactionCommand::CompleteRelease { at },
            (SagaStep::AwaitDecision { .. } | SagaStep::Done, _) => unreachable!("returned above"),
        };
        self.record(id, command);
    }

    /// Creates the transaction an operation describes, if the accounts allow one.
    fn create_from(
        &mut self,
        kind: TransactionKind,
        source: &Index,
        destination: &Index,
        amount: AmountChoice,
    ) {
        let source_id = self.customers[source.index(self.customers.len())];
        let source_currency = self.accounts[&source_id].currency;
        let amount_minor = match amount {
            AmountChoice::Fixed(minor) => minor,
            AmountChoice::AvailablePlus(offset) => {
                (self.accounts[&source_id].available_minor() + offset).max(1)
            }
        };
        let amount = Amount::from_minor(amount_minor).expect("amounts are positive and small");
        let (currency, source, destination) = match kind {
            TransactionKind::Deposit => {
                let destination_id = self.customers[destination.index(self.customers.len())];
                (
                    self.accounts[&destination_id].currency,
                    None,
                    Some(destination_id),
                )
            }
            TransactionKind::Withdrawal => (source_currency, Some(source_id), None),
            TransactionKind::Transfer => {
                // The edge refuses transfers across currencies, so the simulation never makes one.
                let candidates: Vec<AccountId> = self
                    .customers
                    .iter()
                    .copied()
                    .filter(|&id| id != source_id && self.accounts[&id].currency == source_currency)
                    .collect();
                if candidates.is_empty() {
                    return;
                }
                let destination_id = candidates[destination.index(candidates.len())];
                (source_currency, Some(source_id), Some(destination_id))
            }
        };
        let request = TransactionRequest::new(kind, amount, currency, source, destination, None)
            .expect("the simulation builds well-formed requests");
        self.create(request);
    }

    fn perform(&mut self, operation: &Operation) {
        self.now += TimeDelta::seconds(1);
        match operation {
            Operation::Create {
                kind,
                source,
                destination,
                amount,
            } => self.create_from(*kind, source, destination, *amount),
            Operation::RetryCreate { transaction } => {
                let id = self.pick(transaction);
                let existing = &self.transactions[&id];
                let retry = TransactionCommand::Create {
                    transaction_id: id,
                    request: existing.request.clone(),
                    initiated_by: existing.initiated_by,
                    at: self.now,
                };
                assert_eq!(self.record(id, retry), 0, "a retried creation is a replay");
            }
            Operation::DeliverDecision {
                transaction,
                approved,
                twice,
            } => {
                let id = self.pick(transaction);
                let outcome = if *approved {
                    FraudOutcome::Approved
                } else {
                    FraudOutcome::Rejected
                };
                self.deliver_decision(id, outcome);
                if *twice {
                    self.deliver_decision(id, outcome);
                }
            }
            Operation::RunStep { transaction } => {
                let id = self.pick(transaction);
                self.execute(id, self.next_step(id), None);
            }
            Operation::RunStepTwice { transaction } => {
                let id = self.pick(transaction);
                let step = self.next_step(id);
                self.execute(id, step, None);
                self.check_invariants();
                self.execute(id, step, None);
                if !matches!(step, SagaStep::AwaitDecision { .. } | SagaStep::Done) {
                    self.coverage.duplicate_steps += 1;
                }
            }
            Operation::CrashMidStep {
                transaction,
                commands_done,
            } => {
                let id = self.pick(transaction);
                self.execute(id, self.next_step(id), Some(*commands_done));
            }
            Operation::AdvanceClock { seconds } => self.now += TimeDelta::seconds(*seconds),
        }
    }

    /// Runs the saga of one transaction to its end. An undecided transaction is approved, or
    /// left to time out.
    fn drive_to_done(&mut self, id: TransactionId, approve: bool) {
        for _ in 0..FINISH_STEPS_MAX {
            match self.next_step(id) {
                SagaStep::Done => return,
                SagaStep::AwaitDecision { .. } if approve => {
                    self.deliver_decision(id, FraudOutcome::Approved);
                }
                SagaStep::AwaitDecision { deadline } => self.now = deadline,
                step => self.execute(id, step, None),
            }
            self.check_invariants();
        }
        assert_eq!(self.next_step(id), SagaStep::Done, "{id:?} did not finish");
    }

    /// Drives every transaction to `Done`: every other undecided one is approved, the rest
    /// time out.
    fn finish(&mut self) {
        for (position, id) in self.created.clone().into_iter().enumerate() {
            self.drive_to_done(id, position % 2 == 0);
        }
    }

    fn check_invariants(&self) {
        self.check_no_overdraft();
        self.check_open_steps_belong_to_live_transactions();
        self.check_conservation();
        self.check_each_step_happens_at_most_once();
    }

    /// SPEC §8.2: available never negative; the totals match the open steps.
    fn check_no_overdraft(&self) {
        for (account_id, account) in &self.accounts {
            assert!(
                account.available_minor() >= 0,
                "{account_id:?} overdrawn: {account:?}"
            );
            assert_eq!(
                account.held_minor,
                account.holds.values().sum::<i64>(),
                "{account:?}"
            );
            assert_eq!(
                account.pending_credits_minor,
                account.pending_credits.values().sum::<i64>(),
                "{account:?}"
            );
            assert!(
                account.held_minor >= 0 && account.pending_credits_minor >= 0,
                "{account:?}"
            );
        }
    }

    /// Every open hold or pending credit belongs to an unfinished transaction naming that
    /// account, for its amount; a transaction recorded as reserved has both in place.
    fn check_open_steps_belong_to_live_transactions(&self) {
        for (&account_id, account) in &self.accounts {
            for (transaction_id, &amount_minor) in &account.holds {
                let transaction = &self.transactions[transaction_id];
                assert_eq!(transaction.request.source_account_id, Some(account_id));
                assert_eq!(transaction.request.amount.minor(), amount_minor);
                assert!(
                    !transaction.completed,
                    "{transaction_id:?} finished, its hold remains"
                );
            }
            for (transaction_id, &amount_minor) in &account.pending_credits {
                let transaction = &self.transactions[transaction_id];
                assert_eq!(transaction.request.destination_account_id, Some(account_id));
                assert_eq!(transaction.request.amount.minor(), amount_minor);
                assert!(
                    !transaction.completed,
                    "{transaction_id:?} finished, its credit remains"
                );
            }
        }
        for transaction in self.transactions.values() {
            if transaction.funds_reserved && transaction.outcome.is_none() {
                let request = &transaction.request;
                if let Some(source) = request.source_account_id {
                    assert!(self.accounts[&source].holds.contains_key(&transaction.id));
                }
                if let Some(destination) = request.destination_account_id {
                    assert!(
                        self.accounts[&destination]
                            .pending_credits
                            .contains_key(&transaction.id)
                    );
                }
            }
        }
    }

    /// SPEC §8.1: per currency the confirmed legs sum to zero; each account's balance is the
    /// sum of its confirmed legs whose account step has run (the others are in flight, visible
    /// as an open hold or pending credit); customers plus the world account plus what is in
    /// flight sum to zero.
    fn check_conservation(&self) {
        let mut legs_sum: HashMap<Currency, i64> = HashMap::new();
        let mut world_balance: HashMap<Currency, i64> = HashMap::new();
        let mut in_flight: HashMap<Currency, i64> = HashMap::new();
        let mut applied: HashMap<AccountId, i64> = HashMap::new();
        for transaction in self.transactions.values() {
            let Some(Outcome::Confirmed { legs }) = &transaction.outcome else {
                continue;
            };
            assert_eq!(legs.len(), 2, "{legs:?}");
            for leg in legs {
                assert_eq!(leg.currency, transaction.request.currency);
                *legs_sum.entry(leg.currency).or_default() += leg.amount_minor;
                if leg.is_world() {
                    *world_balance.entry(leg.currency).or_default() += leg.amount_minor;
                    continue;
                }
                let account = &self.accounts[&leg.account_id];
                let open = account.holds.contains_key(&transaction.id)
                    || account.pending_credits.contains_key(&transaction.id);
                if open {
                    *in_flight.entry(leg.currency).or_default() += leg.amount_minor;
                } else {
                    *applied.entry(leg.account_id).or_default() += leg.amount_minor;
                }
            }
        }
        for (currency, sum) in &legs_sum {
            assert_eq!(*sum, 0, "the confirmed {currency} legs do not sum to zero");
        }
        let mut customers: HashMap<Currency, i64> = HashMap::new();
        for (account_id, account) in &self.accounts {
            let expected = applied.get(account_id).copied().unwrap_or(0);
            assert_eq!(
                account.balance_minor, expected,
                "{account_id:?} against its legs"
            );
            *customers.entry(account.currency).or_default() += account.balance_minor;
        }
        for (currency, customers_minor) in customers {
            let world = world_balance.get(&currency).copied().unwrap_or(0);
            let flying = in_flight.get(&currency).copied().unwrap_or(0);
            assert_eq!(
                customers_minor + world + flying,
                0,
                "{currency} is not conserved"
            );
        }
    }

    fn step_counts(&self) -> HashMap<(AccountId, TransactionId), StepCounts> {
        let mut counts: HashMap<(AccountId, TransactionId), StepCounts> = HashMap::new();
        for (&account_id, events) in &self.account_events {
            for event in events {
                let Some(transaction_id) = event.transaction_id() else {
                    continue;
                };
                let entry = counts.entry((account_id, transaction_id)).or_default();
                match event {
                    AccountEvent::AccountOpened { .. } => unreachable!("has no transaction"),
                    AccountEvent::FundsHeld { .. } => entry.held += 1,
                    AccountEvent::HoldSettled { .. } => entry.settled += 1,
                    AccountEvent::HoldReleased { .. } => entry.released += 1,
                    AccountEvent::CreditReserved { .. } => entry.reserved += 1,
                    AccountEvent::CreditPosted { .. } => entry.posted += 1,
                    AccountEvent::CreditCancelled { .. } => entry.cancelled += 1,
                }
            }
        }
        counts
    }

    /// SPEC §8.3, from the account logs: each step of a transaction happens at most once on an
    /// account, money moves only for confirmed transactions and returns only for rejected ones.
    fn check_each_step_happens_at_most_once(&self) {
        for ((account_id, transaction_id), counts) in self.step_counts() {
            let context = format!("{transaction_id:?} on {account_id:?}: {counts:?}");
            assert!(counts.held <= 1, "{context}");
            assert!(counts.settled + counts.released <= counts.held, "{context}");
            assert!(counts.reserved <= 1, "{context}");
            assert!(
                counts.posted + counts.cancelled <= counts.reserved,
                "{context}"
            );
            let status = self.transactions[&transaction_id].status();
            if counts.settled + counts.posted > 0 {
                assert_eq!(status, TransactionStatus::Confirmed, "{context}");
            }
            if counts.released + counts.cancelled > 0 {
                assert_eq!(status, TransactionStatus::Rejected, "{context}");
            }
        }
    }

    /// SPEC §8 once every transaction is done: liveness, nothing left open, balances equal to
    /// an expectation computed from the requests alone, and a replay of every log equal to the
    /// live state.
    fn check_final(&mut self) {
        let mut expected: HashMap<AccountId, i64> = HashMap::new();
        let mut net_deposits: HashMap<Currency, i64> = HashMap::new();
        let counts = self.step_counts();
        let count = |account_id, transaction_id| {
            counts
                .get(&(account_id, transaction_id))
                .copied()
                .unwrap_or_default()
        };
        for (id, transaction) in &self.transactions {
            assert!(
                transaction.completed,
                "{id:?} is not completed: {transaction:?}"
            );
            assert_ne!(transaction.status(), TransactionStatus::Pending, "{id:?}");
            let request = &transaction.request;
            let amount_minor = request.amount.minor();
            match transaction
                .outcome
                .as_ref()
                .expect("completed transactions have an outcome")
            {
                Outcome::Confirmed { .. } => {
                    self.coverage.confirmed += 1;
                    if let Some(source) = request.source_account_id {
                        *expected.entry(source).or_default() -= amount_minor;
                        let on_source = count(source, *id);
                        assert_eq!(
                            (on_source.held, on_source.settled, on_source.released),
                            (1, 1, 0)
                        );
                    }
                    if let Some(destination) = request.destination_account_id {
                        *expected.entry(destination).or_default() += amount_minor;
                        let on_destination = count(destination, *id);
                        assert_eq!(
                            (
                                on_destination.reserved,
                                on_destination.posted,
                                on_destination.cancelled
                            ),
                            (1, 1, 0)
                        );
                    }
                    let net = net_deposits.entry(request.currency).or_default();
                    match request.kind {
                        TransactionKind::Deposit => *net += amount_minor,
                        TransactionKind::Withdrawal => *net -= amount_minor,
                        TransactionKind::Transfer => {}
                    }
                }
                Outcome::Rejected { reason } => {
                    *self.coverage.rejected.entry(*reason).or_default() += 1;
                    for account_id in [request.source_account_id, request.destination_account_id]
                        .into_iter()
                        .flatten()
                    {
                        let on_account = count(account_id, *id);
                        assert_eq!(on_account.settled + on_account.posted, 0, "{id:?}");
                        assert_eq!(on_account.held, on_account.released, "{id:?}");
                        assert_eq!(on_account.reserved, on_account.cancelled, "{id:?}");
                    }
                }
            }
        }
        let mut customers: HashMap<Currency, i64> = HashMap::new();
        for (account_id, account) in &self.accounts {
            assert!(
                account.holds.is_empty(),
                "{account_id:?} keeps holds: {account:?}"
            );
            assert!(
                account.pending_credits.is_empty(),
                "{account_id:?}: {account:?}"
            );
            let expected_minor = expected.get(account_id).copied().unwrap_or(0);
            assert_eq!(
                account.balance_minor, expected_minor,
                "{account_id:?} moved wrongly"
            );
            *customers.entry(account.currency).or_default() += account.balance_minor;
        }
        let mut world: HashMap<Currency, i64> = HashMap::new();
        for transaction in self.transactions.values() {
            if let Some(Outcome::Confirmed { legs }) = &transaction.outcome {
                for leg in legs.iter().filter(|leg| leg.account_id.is_world()) {
                    *world.entry(leg.currency).or_default() += leg.amount_minor;
                }
            }
        }
        for (currency, customers_minor) in customers {
            let world_minor = world.get(&currency).copied().unwrap_or(0);
            assert_eq!(
                customers_minor + world_minor,
                0,
                "{currency} is not conserved"
            );
            let net = net_deposits.get(&currency).copied().unwrap_or(0);
            assert_eq!(
                world_minor, -net,
                "the {currency} world account against the requests"
            );
        }
        self.check_replay_equals_live_state();
    }

    fn check_replay_equals_live_state(&self) {
        for (account_id, events) in &self.account_events {
            let replayed = events
                .iter()
                .try_fold(None, |state, event| Account::apply(state, event).map(Some))
                .expect("the account log replays");
            assert_eq!(replayed.as_ref(), self.accounts.get(account_id));
        }
        for (id, events) in &self.transaction_events {
            let replayed = events
                .iter()
                .try_fold(None, |state, event| {
                    Transaction::apply(state, event).map(Some)
                })
                .expect("the transaction log replays");
            assert_eq!(replayed.as_ref(), self.transactions.get(id));
        }
    }
}

/// Runs one case: funding, every operation, then every transaction to its end, checking the
/// invariants after each operation and at the end.
fn simulate(case: &Case) -> Coverage {
    run(case).0.coverage
}

/// Runs one case as [`simulate`] does and returns its log in commit order.
pub(crate) fn simulate_logged(case: &Case) -> Simulated {
    let (ledger, operations_end) = run(case);
    Simulated {
        log: ledger.log,
        operations_end,
        accounts: ledger.accounts,
    }
}

/// The ledger after [`simulate`], and the length of its log when the operations ended.
fn run(case: &Case) -> (Ledger, usize) {
    let mut ledger = Ledger::open(&case.accounts);
    ledger.check_invariants();
    for operation in &case.operations {
        ledger.perform(operation);
        ledger.check_invariants();
    }
    let operations_end = ledger.log.len();
    ledger.finish();
    ledger.check_invariants();
    ledger.check_final();
    (ledger, operations_end)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    })]

    #[test]
    fn spec_section_8_holds_under_random_operations(case in case()) {
        // No overdraft, conservation, exactly once and liveness survive duplicated steps,
        // duplicated and late decisions, crashes mid-step and timeouts, in any order.
        simulate(&case);
    }
}

#[test]
fn the_generated_operations_reach_every_path() {
    // The property test means something only if its cases confirm, reject for every reason
    // the simulation can produce, crash mid-step, and duplicate steps and decisions.
    let mut runner = TestRunner::deterministic();
    let mut total = Coverage::default();
    for _ in 0..COVERAGE_CASES {
        let case = case()
            .new_tree(&mut runner)
            .expect("the strategy always generates a case")
            .current();
        total.add(simulate(&case));
    }
    let rejected = |reason| total.rejected.get(&reason).copied().unwrap_or(0);
    assert!(total.confirmed > 0, "{total:?}");
    assert!(
        rejected(RejectionReason::InsufficientFunds) > 0,
        "{total:?}"
    );
    assert!(rejected(RejectionReason::FraudSuspected) > 0, "{total:?}");
    assert!(
        rejected(RejectionReason::FraudCheckTimeout) > 0,
        "{total:?}"
    );
    assert!(total.partial_crashes > 0, "{total:?}");
    assert!(total.duplicate_steps > 0, "{total:?}");
    assert!(total.duplicate_decisions > 0, "{total:?}");
    assert!(total.late_decisions > 0, "{total:?}");
}

/// A ledger with one USD account funded with 1,000 minor units, and a second one empty but
/// for 1 minor unit.
fn two_usd_accounts() -> (Ledger, AccountId, AccountId) {
    let setup = |funding_minor| AccountSetup {
        currency_index: 0,
        funding_minor,
    };
    let ledger = Ledger::open(&[setup(1_000), setup(1)]);
    let (first, second) = (ledger.customers[0], ledger.customers[1]);
    (ledger, first, second)
}

fn transfer(
    ledger: &mut Ledger,
    from: AccountId,
    to: AccountId,
    amount_minor: i64,
) -> TransactionId {
    let request = TransactionRequest::new(
        TransactionKind::Transfer,
        Amount::from_minor(amount_minor).expect("positive"),
        currency(0),
        Some(from),
        Some(to),
        None,
    )
    .expect("a transfer between two accounts");
    ledger.create(request)
}

#[test]
fn a_crash_after_the_hold_then_a_timeout_releases_the_hold() {
    // A reservation cut short after the hold leaves the funds held until the timeout's release.
    let (mut ledger, first, second) = two_usd_accounts();
    let id = transfer(&mut ledger, first, second, 600);
    ledger.execute(id, SagaStep::Reserve, Some(1));
    assert_eq!(
        ledger.accounts[&first].available_minor(),
        400,
        "the hold landed"
    );
    assert!(
        !ledger.transactions[&id].funds_reserved,
        "the crash recorded nothing"
    );
    ledger.check_invariants();
    ledger.now += TimeDelta::seconds(DECISION_TIMEOUT_SECONDS);
    ledger.drive_to_done(id, false);
    assert_eq!(
        ledger.transactions[&id].rejection_reason(),
        Some(RejectionReason::FraudCheckTimeout)
    );
    assert_eq!(ledger.accounts[&first].available_minor(), 1_000);
    assert_eq!(ledger.accounts[&second].balance_minor, 1);
    ledger.check_final();
}

#[test]
fn a_crash_mid_settlement_then_a_duplicated_settlement_moves_the_money_once() {
    // Resuming a half-done settlement, twice, debits the source and credits the destination once.
    let (mut ledger, first, second) = two_usd_accounts();
    let id = transfer(&mut ledger, first, second, 600);
    ledger.execute(id, SagaStep::Reserve, None);
    ledger.deliver_decision(id, FraudOutcome::Approved);
    ledger.execute(id, SagaStep::Confirm, None);
    ledger.execute(id, SagaStep::Settle, Some(1));
    assert_eq!(
        ledger.accounts[&first].balance_minor, 400,
        "the source settled"
    );
    assert_eq!(
        ledger.accounts[&second].balance_minor, 1,
        "the credit is still pending"
    );
    ledger.check_invariants();
    ledger.execute(id, SagaStep::Settle, None);
    ledger.execute(id, SagaStep::Settle, None);
    assert_eq!(ledger.accounts[&first].balance_minor, 400);
    assert_eq!(ledger.accounts[&second].balance_minor, 601);
    assert_eq!(ledger.next_step(id), SagaStep::Done);
    ledger.check_final();
}

#[test]
fn a_hold_beyond_the_available_balance_rejects_for_insufficient_funds() {
    // The reservation's refusal becomes the rejection, and the release changes nothing.
    let (mut ledger, first, second) = two_usd_accounts();
    let id = transfer(&mut ledger, second, first, 2);
    ledger.deliver_decision(id, FraudOutcome::Approved);
    ledger.drive_to_done(id, true);
    assert_eq!(
        ledger.transactions[&id].rejection_reason(),
        Some(RejectionReason::InsufficientFunds)
    );
    assert_eq!(ledger.accounts[&second].balance_minor, 1);
    assert_eq!(ledger.accounts[&first].balance_minor, 1_000);
    ledger.check_final();
}
