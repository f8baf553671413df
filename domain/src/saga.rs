//! The saga's decisions, as pure functions: given a transaction's state and the clock, what is
//! the next step, and which account commands carry it out. The process manager in command-api
//! only executes what these functions say; the property tests execute the same functions against
//! in-memory accounts.
//!
//! Every step is safe to run twice: account steps are keyed by transaction id (a second hold or
//! settlement is a no-op) and transaction steps are no-ops once recorded.

use chrono::{DateTime, TimeDelta, Utc};

use crate::account::AccountCommand;
use crate::ids::AccountId;
use crate::transaction::{FraudOutcome, Outcome, RejectionReason, Transaction, TransactionCommand};

/// The next thing the saga must do for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaStep {
    /// Hold on the source, reserve the credit on the destination, then record `FundsReserved`
    /// (or reject with the reason an account gave).
    Reserve,
    /// Record `TransactionConfirmed` with both legs.
    Confirm,
    /// Record `TransactionRejected` with this reason.
    Reject(RejectionReason),
    /// Settle the hold and post the credit, then record `SettlementCompleted`.
    Settle,
    /// Release the hold and cancel the credit, then record `ReleaseCompleted`.
    Release,
    /// Nothing to do until the fraud decision arrives or the deadline passes.
    AwaitDecision { deadline: DateTime<Utc> },
    /// The transaction is final and fully applied.
    Done,
}

/// Decides the saga's next step. The decision timeout runs from the transaction's creation.
pub fn next_step(
    transaction: &Transaction,
    now: DateTime<Utc>,
    decision_timeout: TimeDelta,
) -> SagaStep {
    match (&transaction.outcome, transaction.completed) {
        (Some(_), true) => return SagaStep::Done,
        (Some(Outcome::Confirmed { .. }), false) => return SagaStep::Settle,
        (Some(Outcome::Rejected { .. }), false) => return SagaStep::Release,
        (None, _) => {}
    }
    let deadline = transaction
        .created_at
        .checked_add_signed(decision_timeout)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    match transaction.fraud.as_ref().map(|decision| decision.outcome) {
        Some(FraudOutcome::Rejected) => SagaStep::Reject(RejectionReason::FraudSuspected),
        None if now >= deadline => SagaStep::Reject(RejectionReason::FraudCheckTimeout),
        _ if !transaction.funds_reserved => SagaStep::Reserve,
        Some(FraudOutcome::Approved) => SagaStep::Confirm,
        None => SagaStep::AwaitDecision { deadline },
    }
}

/// The transaction-only command that can be recorded in the same append as the events just
/// decided on `transaction`: the confirmation once the reservation and an approval are both on
/// record, the rejection once the fraud decision (or the clock) calls for it. `None` when the
/// next step needs the accounts, must wait, or there is none. Whoever records the step that
/// completes the pair (the saga its reservation, the decision consumer the approval) appends the
/// confirmation with it, so a transfer never waits for one more durable append in a row.
pub fn chained_command(
    transaction: &Transaction,
    now: DateTime<Utc>,
    decision_timeout: TimeDelta,
) -> Option<TransactionCommand> {
    match next_step(transaction, now, decision_timeout) {
        SagaStep::Confirm => Some(TransactionCommand::Confirm { at: now }),
        SagaStep::Reject(reason) => Some(TransactionCommand::Reject { reason, at: now }),
        _ => None,
    }
}

/// The account commands of the reservation, in order: the source's hold first (it is the one
/// that can fail for lack of funds), then the destination's pending credit. World accounts have
/// no stream and take no command.
pub fn reservation_commands(
    transaction: &Transaction,
    at: DateTime<Utc>,
) -> Vec<(AccountId, AccountCommand)> {
    let request = &transaction.request;
    let transaction_id = transaction.id;
    let mut commands = Vec::with_capacity(2);
    if let Some(source) = request.source_account_id {
        commands.push((
            source,
            AccountCommand::PlaceHold {
                transaction_id,
                amount: request.amount,
                at,
            },
        ));
    }
    if let Some(destination) = request.destination_account_id {
        commands.push((
            destination,
            AccountCommand::ReserveCredit {
                transaction_id,
                amount: request.amount,
                at,
            },
        ));
    }
    commands
}

/// The account commands of the settlement: the hold becomes a debit, the credit lands.
pub fn settlement_commands(
    transaction: &Transaction,
    at: DateTime<Utc>,
) -> Vec<(AccountId, AccountCommand)> {
    let request = &transaction.request;
    let transaction_id = transaction.id;
    let mut commands = Vec::with_capacity(2);
    if let Some(source) = request.source_account_id {
        commands.push((source, AccountCommand::SettleHold { transaction_id, at }));
    }
    if let Some(destination) = request.destination_account_id {
        commands.push((
            destination,
            AccountCommand::PostCredit { transaction_id, at },
        ));
    }
    commands
}

/// The compensation of a rejected transaction: release the hold, cancel the credit. Both are
/// no-ops where nothing was held or reserved (a rejection for lack of funds holds nothing).
pub fn release_commands(
    transaction: &Transaction,
    at: DateTime<Utc>,
) -> Vec<(AccountId, AccountCommand)> {
    let request = &transaction.request;
    let transaction_id = transaction.id;
    let mut commands = Vec::with_capacity(2);
    if let Some(source) = request.source_account_id {
        commands.push((source, AccountCommand::ReleaseHold { transaction_id, at }));
    }
    if let Some(destination) = request.destination_account_id {
        commands.push((
            destination,
            AccountCommand::CancelCredit { transaction_id, at },
        ));
    }
    commands
}

/// The rejection reason for an account's refusal during the reservation.
pub fn rejection_for(error: &crate::account::AccountError) -> Option<RejectionReason> {
    use crate::account::AccountError;
    match error {
        AccountError::InsufficientFunds { .. } => Some(RejectionReason::InsufficientFunds),
        AccountError::BalanceLimitExceeded => Some(RejectionReason::BalanceLimitExceeded),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Given a transaction folded from its events and the clock, the saga's next step and the
    //! account commands that carry it out.

    use super::*;
    use crate::account::AccountError;
    use crate::ids::{CustomerId, TransactionId};
    use crate::money::{Amount, Currency};
    use crate::transaction::{
        FraudDecision, Leg, TransactionEvent, TransactionKind, TransactionRequest,
    };
    use uuid::Uuid;

    const ALICE: CustomerId = CustomerId(Uuid::from_u128(0xA11CE));
    const SOURCE: AccountId = AccountId(Uuid::from_u128(0x50));
    const DESTINATION: AccountId = AccountId(Uuid::from_u128(0xD0));
    const TIMEOUT_SECONDS: i64 = 300;

    fn usd() -> Currency {
        Currency::from_code("USD").expect("USD is in the currency table")
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + second, 0).expect("a 2023 timestamp is in range")
    }

    fn timeout() -> TimeDelta {
        TimeDelta::seconds(TIMEOUT_SECONDS)
    }

    /// The decision deadline of a transaction created at `at(0)`.
    fn deadline() -> DateTime<Utc> {
        at(TIMEOUT_SECONDS)
    }

    fn request(kind: TransactionKind) -> TransactionRequest {
        let (source, destination) = match kind {
            TransactionKind::Deposit => (None, Some(DESTINATION)),
            TransactionKind::Withdrawal => (Some(SOURCE), None),
            TransactionKind::Transfer => (Some(SOURCE), Some(DESTINATION)),
        };
        let amount = Amount::from_minor(4_200).expect("positive");
        TransactionRequest::new(kind, amount, usd(), source, destination, None)
            .expect("each kind names its accounts")
    }

    fn created(kind: TransactionKind) -> TransactionEvent {
        let request = request(kind);
        TransactionEvent::TransactionCreated {
            transaction_id: TransactionId::from_idempotency_key(ALICE, "key-1"),
            request_fingerprint: request.fingerprint(),
            request,
            initiated_by: ALICE,
            created_at: at(0),
        }
    }

    fn reserved() -> TransactionEvent {
        TransactionEvent::FundsReserved { at: at(1) }
    }

    fn decided(outcome: FraudOutcome) -> TransactionEvent {
        TransactionEvent::FraudChecked {
            decision: FraudDecision {
                outcome,
                rule: None,
                details: serde_json::Value::Null.into(),
            },
            at: at(2),
        }
    }

    fn confirmed() -> TransactionEvent {
        let amount_minor = 4_200;
        TransactionEvent::TransactionConfirmed {
            legs: vec![
                Leg {
                    account_id: SOURCE,
                    amount_minor: -amount_minor,
                    currency: usd(),
                },
                Leg {
                    account_id: DESTINATION,
                    amount_minor,
                    currency: usd(),
                },
            ],
            at: at(3),
        }
    }

    fn rejected(reason: RejectionReason) -> TransactionEvent {
        TransactionEvent::TransactionRejected { reason, at: at(3) }
    }

    /// A transfer folded from `events` after its creation.
    fn transfer(events: &[TransactionEvent]) -> Transaction {
        transaction(TransactionKind::Transfer, events)
    }

    fn transaction(kind: TransactionKind, events: &[TransactionEvent]) -> Transaction {
        [created(kind)]
            .iter()
            .chain(events)
            .try_fold(None, |state, event| {
                Transaction::apply(state, event).map(Some)
            })
            .expect("the given events are a valid history")
            .expect("created")
    }

    fn step(transaction: &Transaction, now: DateTime<Utc>) -> SagaStep {
        next_step(transaction, now, timeout())
    }

    #[test]
    fn a_new_transaction_reserves_first() {
        // Before any decision and before the deadline, the saga holds the funds.
        assert_eq!(step(&transfer(&[]), at(1)), SagaStep::Reserve);
    }

    #[test]
    fn reserved_and_undecided_waits_for_the_decision_until_the_deadline() {
        // With funds reserved and no decision, the saga waits, naming the deadline.
        assert_eq!(
            step(&transfer(&[reserved()]), deadline() - TimeDelta::seconds(1)),
            SagaStep::AwaitDecision {
                deadline: deadline()
            }
        );
    }

    #[test]
    fn no_decision_by_the_deadline_is_a_timeout_rejection() {
        // At the deadline, reserved or not, an undecided transaction is rejected for timeout.
        let timed_out = SagaStep::Reject(RejectionReason::FraudCheckTimeout);
        assert_eq!(step(&transfer(&[reserved()]), deadline()), timed_out);
        assert_eq!(step(&transfer(&[]), deadline()), timed_out);
        assert_eq!(
            step(&transfer(&[]), deadline() + TimeDelta::days(1)),
            timed_out
        );
        // One second earlier, the unreserved transaction still reserves.
        assert_eq!(
            step(&transfer(&[]), deadline() - TimeDelta::seconds(1)),
            SagaStep::Reserve
        );
    }

    #[test]
    fn a_fraud_rejection_rejects_whether_or_not_funds_are_reserved() {
        // A rejected decision is final: before the reservation nothing is held, after it the
        // release follows.
        let suspected = SagaStep::Reject(RejectionReason::FraudSuspected);
        assert_eq!(
            step(&transfer(&[decided(FraudOutcome::Rejected)]), at(5)),
            suspected
        );
        assert_eq!(
            step(
                &transfer(&[reserved(), decided(FraudOutcome::Rejected)]),
                at(5)
            ),
            suspected
        );
        // A decision counts even when the saga only looks after the deadline.
        assert_eq!(
            step(&transfer(&[decided(FraudOutcome::Rejected)]), deadline()),
            suspected
        );
    }

    #[test]
    fn approved_but_not_reserved_reserves_even_after_the_deadline() {
        // An approval arrived in time: the saga still has to hold the funds, never time out.
        let approved = transfer(&[decided(FraudOutcome::Approved)]);
        assert_eq!(step(&approved, at(5)), SagaStep::Reserve);
        assert_eq!(
            step(&approved, deadline() + TimeDelta::seconds(1)),
            SagaStep::Reserve
        );
    }

    #[test]
    fn reserved_and_approved_confirms() {
        // Both conditions met, in either order, the saga confirms.
        let reserved_first = transfer(&[reserved(), decided(FraudOutcome::Approved)]);
        let approved_first = transfer(&[decided(FraudOutcome::Approved), reserved()]);
        assert_eq!(step(&reserved_first, at(5)), SagaStep::Confirm);
        assert_eq!(
            step(&approved_first, deadline() + TimeDelta::seconds(1)),
            SagaStep::Confirm
        );
    }

    #[test]
    fn only_transaction_steps_chain_onto_an_append() {
        // What may ride in the same append: a confirmation once both conditions are on record
        // (whichever came last), a rejection once the decision or the clock calls for it;
        // never an account step, nothing while waiting, nothing once final.
        let now = at(5);
        let chained =
            |events: &[TransactionEvent], now| chained_command(&transfer(events), now, timeout());
        for events in [
            [reserved(), decided(FraudOutcome::Approved)],
            [decided(FraudOutcome::Approved), reserved()],
        ] {
            assert_eq!(
                chained(&events, now),
                Some(TransactionCommand::Confirm { at: now })
            );
        }
        assert_eq!(
            chained(&[decided(FraudOutcome::Rejected)], now),
            Some(TransactionCommand::Reject {
                reason: RejectionReason::FraudSuspected,
                at: now
            })
        );
        assert_eq!(
            chained(&[reserved()], deadline()),
            Some(TransactionCommand::Reject {
                reason: RejectionReason::FraudCheckTimeout,
                at: deadline()
            })
        );
        assert_eq!(chained(&[], now), None, "a reservation needs the accounts");
        assert_eq!(
            chained(&[decided(FraudOutcome::Approved)], now),
            None,
            "approved but not reserved: the accounts first"
        );
        assert_eq!(
            chained(&[reserved()], now),
            None,
            "waiting for the decision"
        );
        let confirmed = [reserved(), decided(FraudOutcome::Approved), confirmed()];
        assert_eq!(
            chained(&confirmed, now),
            None,
            "settling needs the accounts"
        );
    }

    #[test]
    fn confirmed_but_not_completed_settles() {
        // After the confirmation, the accounts must settle, whatever the clock says.
        let confirmed = transfer(&[reserved(), decided(FraudOutcome::Approved), confirmed()]);
        assert_eq!(step(&confirmed, at(5)), SagaStep::Settle);
        assert_eq!(
            step(&confirmed, deadline() + TimeDelta::days(1)),
            SagaStep::Settle
        );
    }

    #[test]
    fn rejected_but_not_completed_releases() {
        // After any rejection, the saga compensates by releasing.
        for reason in [
            RejectionReason::InsufficientFunds,
            RejectionReason::FraudSuspected,
            RejectionReason::FraudCheckTimeout,
            RejectionReason::BalanceLimitExceeded,
        ] {
            assert_eq!(
                step(&transfer(&[rejected(reason)]), at(5)),
                SagaStep::Release
            );
        }
        let reserved_then_rejected = transfer(&[
            reserved(),
            decided(FraudOutcome::Rejected),
            rejected(RejectionReason::FraudSuspected),
        ]);
        assert_eq!(step(&reserved_then_rejected, at(5)), SagaStep::Release);
    }

    #[test]
    fn a_completed_transaction_is_done() {
        // Once settled or released nothing is left, even with an approval on record.
        let settled = transfer(&[
            reserved(),
            decided(FraudOutcome::Approved),
            confirmed(),
            TransactionEvent::SettlementCompleted { at: at(4) },
        ]);
        let released = transfer(&[
            decided(FraudOutcome::Approved),
            rejected(RejectionReason::InsufficientFunds),
            TransactionEvent::ReleaseCompleted { at: at(4) },
        ]);
        assert_eq!(step(&settled, at(5)), SagaStep::Done);
        assert_eq!(
            step(&released, deadline() + TimeDelta::days(1)),
            SagaStep::Done
        );
    }

    #[test]
    fn an_unrepresentable_deadline_never_times_out() {
        // A timeout too large for the calendar means no deadline, not a panic.
        let transaction = transfer(&[reserved()]);
        assert_eq!(
            next_step(&transaction, at(5), TimeDelta::MAX),
            SagaStep::AwaitDecision {
                deadline: DateTime::<Utc>::MAX_UTC
            }
        );
    }

    #[test]
    fn reservation_holds_on_the_source_then_reserves_on_the_destination() {
        // The hold comes first, because it is the step that can fail for lack of funds.
        let transaction = transfer(&[]);
        let amount = transaction.request.amount;
        assert_eq!(
            reservation_commands(&transaction, at(7)),
            vec![
                (
                    SOURCE,
                    AccountCommand::PlaceHold {
                        transaction_id: transaction.id,
                        amount,
                        at: at(7),
                    }
                ),
                (
                    DESTINATION,
                    AccountCommand::ReserveCredit {
                        transaction_id: transaction.id,
                        amount,
                        at: at(7),
                    }
                ),
            ]
        );
    }

    #[test]
    fn settlement_and_release_name_both_customer_accounts_of_a_transfer() {
        // Settle: the hold becomes a debit and the credit lands; release: both are undone.
        let transaction = transfer(&[]);
        let transaction_id = transaction.id;
        assert_eq!(
            settlement_commands(&transaction, at(7)),
            vec![
                (
                    SOURCE,
                    AccountCommand::SettleHold {
                        transaction_id,
                        at: at(7)
                    }
                ),
                (
                    DESTINATION,
                    AccountCommand::PostCredit {
                        transaction_id,
                        at: at(7)
                    }
                ),
            ]
        );
        assert_eq!(
            release_commands(&transaction, at(7)),
            vec![
                (
                    SOURCE,
                    AccountCommand::ReleaseHold {
                        transaction_id,
                        at: at(7)
                    }
                ),
                (
                    DESTINATION,
                    AccountCommand::CancelCredit {
                        transaction_id,
                        at: at(7)
                    }
                ),
            ]
        );
    }

    #[test]
    fn world_accounts_take_no_command() {
        // A deposit only touches its destination and a withdrawal only its source.
        let deposit = transaction(TransactionKind::Deposit, &[]);
        let withdrawal = transaction(TransactionKind::Withdrawal, &[]);
        let deposit_id = deposit.id;
        assert_eq!(
            reservation_commands(&deposit, at(7)),
            vec![(
                DESTINATION,
                AccountCommand::ReserveCredit {
                    transaction_id: deposit_id,
                    amount: deposit.request.amount,
                    at: at(7),
                }
            )]
        );
        assert_eq!(
            settlement_commands(&deposit, at(7)),
            vec![(
                DESTINATION,
                AccountCommand::PostCredit {
                    transaction_id: deposit_id,
                    at: at(7)
                }
            )]
        );
        assert_eq!(
            release_commands(&deposit, at(7)),
            vec![(
                DESTINATION,
                AccountCommand::CancelCredit {
                    transaction_id: deposit_id,
                    at: at(7)
                }
            )]
        );
        let withdrawal_id = withdrawal.id;
        assert_eq!(
            reservation_commands(&withdrawal, at(7)),
            vec![(
                SOURCE,
                AccountCommand::PlaceHold {
                    transaction_id: withdrawal_id,
                    amount: withdrawal.request.amount,
                    at: at(7),
                }
            )]
        );
        assert_eq!(
            settlement_commands(&withdrawal, at(7)),
            vec![(
                SOURCE,
                AccountCommand::SettleHold {
                    transaction_id: withdrawal_id,
                    at: at(7)
                }
            )]
        );
        assert_eq!(
            release_commands(&withdrawal, at(7)),
            vec![(
                SOURCE,
                AccountCommand::ReleaseHold {
                    transaction_id: withdrawal_id,
                    at: at(7)
                }
            )]
        );
        for transaction in [&deposit, &withdrawal] {
            let commands = [
                reservation_commands(transaction, at(7)),
                settlement_commands(transaction, at(7)),
                release_commands(transaction, at(7)),
            ];
            assert!(
                commands
                    .iter()
                    .flatten()
                    .all(|(account_id, _)| !account_id.is_world()),
                "no command for a world account in {commands:?}"
            );
        }
    }

    #[test]
    fn only_expected_account_refusals_become_rejections() {
        // Lack of funds and the balance limit reject the transaction; anything else is a bug.
        assert_eq!(
            rejection_for(&AccountError::InsufficientFunds {
                available_minor: 1,
                requested_minor: 2,
            }),
            Some(RejectionReason::InsufficientFunds)
        );
        assert_eq!(
            rejection_for(&AccountError::BalanceLimitExceeded),
            Some(RejectionReason::BalanceLimitExceeded)
        );
        for error in [
            AccountError::NotOpened,
            AccountError::AlreadyOpened,
            AccountError::StepMismatch(TransactionId(Uuid::from_u128(1))),
            AccountError::InvalidName,
        ] {
            assert_eq!(rejection_for(&error), None, "{error:?}");
        }
    }
}
