//! A customer account: two-phase, like TigerBeetle's pending transfers.
//!
//! The source of a transaction first **holds** the amount (available drops at once; a customer
//! account's available balance never goes below zero), then the hold is either **settled** (it
//! becomes a debit of the posted balance) or **released**. The destination first **reserves** the
//! incoming credit (a pending credit, bounded so the later posting can never overflow), then the
//! credit is **posted** or **cancelled**.
//!
//! Every step names its transaction, so a repeated step is recognised: holding or reserving twice
//! for one transaction is a no-op, and settling, posting, releasing or cancelling a step that is
//! no longer open is a no-op. The open holds and pending credits are bounded by the transactions
//! in flight, so an account's state stays small however long its history.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, CustomerId, TransactionId};
use crate::money::{Amount, Currency};

/// Longest account name we store, in characters.
pub const ACCOUNT_NAME_CHARS_MAX: usize = 100;

/// What can be asked of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    Open {
        account_id: AccountId,
        owner_id: CustomerId,
        currency: Currency,
        name: Option<String>,
        at: DateTime<Utc>,
    },
    PlaceHold {
        transaction_id: TransactionId,
        amount: Amount,
        at: DateTime<Utc>,
    },
    SettleHold {
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    },
    ReleaseHold {
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    },
    ReserveCredit {
        transaction_id: TransactionId,
        amount: Amount,
        at: DateTime<Utc>,
    },
    PostCredit {
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    },
    CancelCredit {
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    },
}

/// What happened to an account. Stored forever: fields are only ever added (with defaults).
/// Each event carries the balances after it, so read models stay thin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened {
        account_id: AccountId,
        owner_id: CustomerId,
        currency: Currency,
        name: Option<String>,
        opened_at: DateTime<Utc>,
    },
    FundsHeld {
        transaction_id: TransactionId,
        amount_minor: i64,
        held_after_minor: i64,
        available_after_minor: i64,
        at: DateTime<Utc>,
    },
    HoldSettled {
        transaction_id: TransactionId,
        amount_minor: i64,
        balance_after_minor: i64,
        held_after_minor: i64,
        at: DateTime<Utc>,
    },
    HoldReleased {
        transaction_id: TransactionId,
        amount_minor: i64,
        held_after_minor: i64,
        available_after_minor: i64,
        at: DateTime<Utc>,
    },
    CreditReserved {
        transaction_id: TransactionId,
        amount_minor: i64,
        pending_credits_after_minor: i64,
        at: DateTime<Utc>,
    },
    CreditPosted {
        transaction_id: TransactionId,
        amount_minor: i64,
        balance_after_minor: i64,
        pending_credits_after_minor: i64,
        at: DateTime<Utc>,
    },
    CreditCancelled {
        transaction_id: TransactionId,
        amount_minor: i64,
        pending_credits_after_minor: i64,
        at: DateTime<Utc>,
    },
}

impl AccountEvent {
    /// The event's type name as stored in the event store's `event_type` column.
    pub fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::AccountOpened { .. } => "AccountOpened",
            AccountEvent::FundsHeld { .. } => "FundsHeld",
            AccountEvent::HoldSettled { .. } => "HoldSettled",
            AccountEvent::HoldReleased { .. } => "HoldReleased",
            AccountEvent::CreditReserved { .. } => "CreditReserved",
            AccountEvent::CreditPosted { .. } => "CreditPosted",
            AccountEvent::CreditCancelled { .. } => "CreditCancelled",
        }
    }

    /// The transaction this event belongs to, if any.
    pub fn transaction_id(&self) -> Option<TransactionId> {
        match self {
            AccountEvent::AccountOpened { .. } => None,
            AccountEvent::FundsHeld { transaction_id, .. }
            | AccountEvent::HoldSettled { transaction_id, .. }
            | AccountEvent::HoldReleased { transaction_id, .. }
            | AccountEvent::CreditReserved { transaction_id, .. }
            | AccountEvent::CreditPosted { transaction_id, .. }
            | AccountEvent::CreditCancelled { transaction_id, .. } => Some(*transaction_id),
        }
    }
}

/// Why an account refused a command. Expected outcomes, not bugs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("account does not exist")]
    NotOpened,
    #[error("account already exists")]
    AlreadyOpened,
    #[error("insufficient funds: {available_minor} available, {requested_minor} requested")]
    InsufficientFunds {
        available_minor: i64,
        requested_minor: i64,
    },
    #[error("the credit would take the balance beyond what the ledger can represent")]
    BalanceLimitExceeded,
    #[error("transaction {0} already holds a different amount on this account")]
    StepMismatch(TransactionId),
    #[error("account name must be 1 to {ACCOUNT_NAME_CHARS_MAX} characters")]
    InvalidName,
}

/// A stored event that cannot follow the account's current state: data to report (replay,
/// verify), a bug if the running code ever produced it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account event {event_type} cannot apply: {problem}")]
pub struct AccountInvariantViolation {
    pub event_type: &'static str,
    pub problem: &'static str,
}

/// The state of an opened account, folded from its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub owner_id: CustomerId,
    pub currency: Currency,
    pub name: Option<String>,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The posted (settled) balance.
    pub balance_minor: i64,
    /// Sum of the open holds.
    pub held_minor: i64,
    /// Sum of the reserved, not yet posted, incoming credits.
    pub pending_credits_minor: i64,
    /// Open holds by transaction: bounded by the transactions in flight.
    pub holds: BTreeMap<TransactionId, i64>,
    /// Reserved incoming credits by transaction: bounded by the transactions in flight.
    pub pending_credits: BTreeMap<TransactionId, i64>,
}

impl Account {
    /// What can be spent now: the posted balance less the open holds.
    pub fn available_minor(&self) -> i64 {
        // Both are bounded by checked arithmetic in `decide`; the subtraction of two values whose
        // difference was checked when the hold was placed cannot overflow.
        self.balance_minor - self.held_minor
    }

    /// Decides what a command does to an account (`None` before it is opened). Pure: the clock
    /// comes in with the command.
    pub fn decide(
        account: Option<&Account>,
        command: &AccountCommand,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        let account = match (account, command) {
            (None, AccountCommand::Open { .. }) => return decide_open(command),
            (Some(_), AccountCommand::Open { .. }) => return Err(AccountError::AlreadyOpened),
            (None, _) => return Err(AccountError::NotOpened),
            (Some(account), _) => account,
        };
        let event = match *command {
            AccountCommand::Open { .. } => unreachable!("handled above"),
            AccountCommand::PlaceHold {
                transaction_id,
                amount,
                at,
            } => account.decide_hold(transaction_id, amount, at)?,
            AccountCommand::SettleHold { transaction_id, at } => {
                account.decide_settle(transaction_id, at)
            }
            AccountCommand::ReleaseHold { transaction_id, at } => {
                account.decide_release(transaction_id, at)
            }
            AccountCommand::ReserveCredit {
                transaction_id,
                amount,
                at,
            } => account.decide_reserve_credit(transaction_id, amount, at)?,
            AccountCommand::PostCredit { transaction_id, at } => {
                account.decide_post_credit(transaction_id, at)
            }
            AccountCommand::CancelCredit { transaction_id, at } => {
                account.decide_cancel_credit(transaction_id, at)
            }
        };
        let events: Vec<AccountEvent> = event.into_iter().collect();
        // Paired assertion: whatever we decide must apply cleanly and keep the account sound.
        debug_assert!(
            events
                .iter()
                .try_fold(account.clone(), |state, event| Account::apply(
                    Some(state),
                    event
                ))
                .is_ok_and(|state| state.available_minor() >= 0),
            "decide produced events that break the account"
        );
        Ok(events)
    }

    fn decide_hold(
        &self,
        transaction_id: TransactionId,
        amount: Amount,
        at: DateTime<Utc>,
    ) -> Result<Option<AccountEvent>, AccountError> {
        if let Some(&held) = self.holds.get(&transaction_id) {
            return if held == amount.minor() {
                Ok(None)
            } else {
                Err(AccountError::StepMismatch(transaction_id))
            };
        }
        let available = self.available_minor();
        if available < amount.minor() {
            return Err(AccountError::InsufficientFunds {
                available_minor: available,
                requested_minor: amount.minor(),
            });
        }
        let held_after = self
            .held_minor
            .checked_add(amount.minor())
            .ok_or(AccountError::BalanceLimitExceeded)?;
        Ok(Some(AccountEvent::FundsHeld {
            transaction_id,
            amount_minor: amount.minor(),
            held_after_minor: held_after,
            available_after_minor: available - amount.minor(),
            at,
        }))
    }

    fn decide_settle(
        &self,
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    ) -> Option<AccountEvent> {
        let &amount = self.holds.get(&transaction_id)?;
        Some(AccountEvent::HoldSettled {
            transaction_id,
            amount_minor: amount,
            balance_after_minor: self.balance_minor - amount,
            held_after_minor: self.held_minor - amount,
            at,
        })
    }

    fn decide_release(
        &self,
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    ) -> Option<AccountEvent> {
        let &amount = self.holds.get(&transaction_id)?;
        Some(AccountEvent::HoldReleased {
            transaction_id,
            amount_minor: amount,
            held_after_minor: self.held_minor - amount,
            available_after_minor: self.available_minor() + amount,
            at,
        })
    }

    fn decide_reserve_credit(
        &self,
        transaction_id: TransactionId,
        amount: Amount,
        at: DateTime<Utc>,
    ) -> Result<Option<AccountEvent>, AccountError> {
        if let Some(&reserved) = self.pending_credits.get(&transaction_id) {
            return if reserved == amount.minor() {
                Ok(None)
            } else {
                Err(AccountError::StepMismatch(transaction_id))
            };
        }
        // The balance must be able to absorb every reserved credit, so posting never overflows.
        let pending_after = self
            .pending_credits_minor
            .checked_add(amount.minor())
            .ok_or(AccountError::BalanceLimitExceeded)?;
        self.balance_minor
            .checked_add(pending_after)
            .ok_or(AccountError::BalanceLimitExceeded)?;
        Ok(Some(AccountEvent::CreditReserved {
            transaction_id,
            amount_minor: amount.minor(),
            pending_credits_after_minor: pending_after,
            at,
        }))
    }

    fn decide_post_credit(
        &self,
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    ) -> Option<AccountEvent> {
        let &amount = self.pending_credits.get(&transaction_id)?;
        Some(AccountEvent::CreditPosted {
            transaction_id,
            amount_minor: amount,
            balance_after_minor: self.balance_minor + amount,
            pending_credits_after_minor: self.pending_credits_minor - amount,
            at,
        })
    }

    fn decide_cancel_credit(
        &self,
        transaction_id: TransactionId,
        at: DateTime<Utc>,
    ) -> Option<AccountEvent> {
        let &amount = self.pending_credits.get(&transaction_id)?;
        Some(AccountEvent::CreditCancelled {
            transaction_id,
            amount_minor: amount,
            pending_credits_after_minor: self.pending_credits_minor - amount,
            at,
        })
    }

    /// Folds one stored event into the state. Checked: a stored event that cannot follow the
    /// state is reported, so replay and verify can name it; the write side treats that as a bug.
    pub fn apply(
        account: Option<Account>,
        event: &AccountEvent,
    ) -> Result<Account, AccountInvariantViolation> {
        let violation = |problem| AccountInvariantViolation {
            event_type: event.event_type(),
            problem,
        };
        let mut account = match (account, event) {
            (None, AccountEvent::AccountOpened { .. }) => return Ok(open(event)),
            (Some(_), AccountEvent::AccountOpened { .. }) => {
                return Err(violation("the account is already open"));
            }
            (None, _) => return Err(violation("the account was never opened")),
            (Some(account), _) => account,
        };
        match *event {
            AccountEvent::AccountOpened { .. } => unreachable!("handled above"),
            AccountEvent::FundsHeld {
                transaction_id,
                amount_minor,
                at,
                ..
            } => {
                if account.holds.insert(transaction_id, amount_minor).is_some() {
                    return Err(violation("the transaction already holds funds"));
                }
                account.held_minor =
                    checked(account.held_minor.checked_add(amount_minor), violation)?;
                if account.available_minor() < 0 {
                    return Err(violation("the hold overdraws the account"));
                }
                account.updated_at = at;
            }
            AccountEvent::HoldSettled {
                transaction_id, at, ..
            } => {
                let amount = account
                    .holds
                    .remove(&transaction_id)
                    .ok_or_else(|| violation("no open hold for the transaction"))?;
                account.held_minor -= amount;
                account.balance_minor -= amount;
                account.updated_at = at;
            }
            AccountEvent::HoldReleased {
                transaction_id, at, ..
            } => {
                let amount = account
                    .holds
                    .remove(&transaction_id)
                    .ok_or_else(|| violation("no open hold for the transaction"))?;
                account.held_minor -= amount;
                account.updated_at = at;
            }
            AccountEvent::CreditReserved {
                transaction_id,
                amount_minor,
                at,
                ..
            } => {
                if account
                    .pending_credits
                    .insert(transaction_id, amount_minor)
                    .is_some()
                {
                    return Err(violation("the transaction already reserved a credit"));
                }
                account.pending_credits_minor = checked(
                    account.pending_credits_minor.checked_add(amount_minor),
                    violation,
                )?;
                account.updated_at = at;
            }
            AccountEvent::CreditPosted {
                transaction_id, at, ..
            } => {
                let amount = account
                    .pending_credits
                    .remove(&transaction_id)
                    .ok_or_else(|| violation("no reserved credit for the transaction"))?;
                account.pending_credits_minor -= amount;
                account.balance_minor =
                    checked(account.balance_minor.checked_add(amount), violation)?;
                account.updated_at = at;
            }
            AccountEvent::CreditCancelled {
                transaction_id, at, ..
            } => {
                let amount = account
                    .pending_credits
                    .remove(&transaction_id)
                    .ok_or_else(|| violation("no reserved credit for the transaction"))?;
                account.pending_credits_minor -= amount;
                account.updated_at = at;
            }
        }
        Ok(account)
    }
}

fn checked(
    value: Option<i64>,
    violation: impl Fn(&'static str) -> AccountInvariantViolation,
) -> Result<i64, AccountInvariantViolation> {
    value.ok_or_else(|| violation("arithmetic overflow"))
}

fn decide_open(command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
    let AccountCommand::Open {
        account_id,
        owner_id,
        currency,
        ref name,
        at,
    } = *command
    else {
        unreachable!("decide_open is only called with Open");
    };
    if let Some(name) = name {
        let chars = name.chars().count();
        if chars == 0 || chars > ACCOUNT_NAME_CHARS_MAX || name.trim().is_empty() {
            return Err(AccountError::InvalidName);
        }
    }
    Ok(vec![AccountEvent::AccountOpened {
        account_id,
        owner_id,
        currency,
        name: name.clone(),
        opened_at: at,
    }])
}

fn open(event: &AccountEvent) -> Account {
    let AccountEvent::AccountOpened {
        account_id,
        owner_id,
        currency,
        ref name,
        opened_at,
    } = *event
    else {
        unreachable!("open is only called with AccountOpened");
    };
    Account {
        id: account_id,
        owner_id,
        currency,
        name: name.clone(),
        opened_at,
        updated_at: opened_at,
        balance_minor: 0,
        held_minor: 0,
        pending_credits_minor: 0,
        holds: BTreeMap::new(),
        pending_credits: BTreeMap::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Given stored events folded with `Account::apply`, when a command is decided with
    //! `Account::decide`, then these events or this error.

    use super::*;
    use crate::money::AMOUNT_MINOR_MAX;
    use uuid::Uuid;

    const ACCOUNT: AccountId = AccountId(Uuid::from_u128(0xACC0));
    const OWNER: CustomerId = CustomerId(Uuid::from_u128(0xC0FFEE));
    /// The deposit that funds the account in [`funded`].
    const FUNDING: TransactionId = TransactionId(Uuid::from_u128(0xF0));
    const FIRST: TransactionId = TransactionId(Uuid::from_u128(1));
    const SECOND: TransactionId = TransactionId(Uuid::from_u128(2));

    fn usd() -> Currency {
        Currency::from_code("USD").expect("USD is in the currency table")
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + second, 0).expect("a 2023 timestamp is in range")
    }

    /// The time at which every command under test is decided.
    fn now() -> DateTime<Utc> {
        at(100)
    }

    fn amount(minor: i64) -> Amount {
        Amount::from_minor(minor).expect("test amounts are positive and at most the maximum")
    }

    fn opened() -> AccountEvent {
        AccountEvent::AccountOpened {
            account_id: ACCOUNT,
            owner_id: OWNER,
            currency: usd(),
            name: Some("Savings".to_owned()),
            opened_at: at(0),
        }
    }

    /// An open account whose posted balance is `balance_minor`, credited by one deposit.
    fn funded(balance_minor: i64) -> Vec<AccountEvent> {
        vec![
            opened(),
            credit_reserved(FUNDING, balance_minor, balance_minor),
            AccountEvent::CreditPosted {
                transaction_id: FUNDING,
                amount_minor: balance_minor,
                balance_after_minor: balance_minor,
                pending_credits_after_minor: 0,
                at: at(2),
            },
        ]
    }

    fn funds_held(
        transaction_id: TransactionId,
        amount_minor: i64,
        held_after_minor: i64,
        available_after_minor: i64,
    ) -> AccountEvent {
        AccountEvent::FundsHeld {
            transaction_id,
            amount_minor,
            held_after_minor,
            available_after_minor,
            at: at(3),
        }
    }

    fn credit_reserved(
        transaction_id: TransactionId,
        amount_minor: i64,
        pending_credits_after_minor: i64,
    ) -> AccountEvent {
        AccountEvent::CreditReserved {
            transaction_id,
            amount_minor,
            pending_credits_after_minor,
            at: at(1),
        }
    }

    /// `given` events plus `more`, as one history.
    fn and(
        given: Vec<AccountEvent>,
        more: impl IntoIterator<Item = AccountEvent>,
    ) -> Vec<AccountEvent> {
        given.into_iter().chain(more).collect()
    }

    fn given(events: &[AccountEvent]) -> Option<Account> {
        events.iter().fold(None, |state, event| {
            Some(Account::apply(state, event).expect("the given events are a valid history"))
        })
    }

    fn when(
        events: &[AccountEvent],
        command: AccountCommand,
    ) -> Result<Vec<AccountEvent>, AccountError> {
        Account::decide(given(events).as_ref(), &command)
    }

    /// The state after the given events and the decided ones.
    fn then_state(events: &[AccountEvent], decided: &[AccountEvent]) -> Account {
        given(&and(events.to_vec(), decided.iter().cloned())).expect("the account is open")
    }

    fn open(name: Option<&str>) -> AccountCommand {
        AccountCommand::Open {
            account_id: ACCOUNT,
            owner_id: OWNER,
            currency: usd(),
            name: name.map(str::to_owned),
            at: now(),
        }
    }

    fn hold(transaction_id: TransactionId, minor: i64) -> AccountCommand {
        AccountCommand::PlaceHold {
            transaction_id,
            amount: amount(minor),
            at: now(),
        }
    }

    fn settle(transaction_id: TransactionId) -> AccountCommand {
        AccountCommand::SettleHold {
            transaction_id,
            at: now(),
        }
    }

    fn release(transaction_id: TransactionId) -> AccountCommand {
        AccountCommand::ReleaseHold {
            transaction_id,
            at: now(),
        }
    }

    fn reserve(transaction_id: TransactionId, minor: i64) -> AccountCommand {
        AccountCommand::ReserveCredit {
            transaction_id,
            amount: amount(minor),
            at: now(),
        }
    }

    fn post(transaction_id: TransactionId) -> AccountCommand {
        AccountCommand::PostCredit {
            transaction_id,
            at: now(),
        }
    }

    fn cancel(transaction_id: TransactionId) -> AccountCommand {
        AccountCommand::CancelCredit {
            transaction_id,
            at: now(),
        }
    }

    /// Asserts that the balances an event carries are those of the state after it. Shared with
    /// the simulation, which checks every event it produces.
    pub(crate) fn assert_carried_balances_match(event: &AccountEvent, after: &Account) {
        match *event {
            AccountEvent::AccountOpened { .. } => {
                assert_eq!(
                    (
                        after.balance_minor,
                        after.held_minor,
                        after.pending_credits_minor
                    ),
                    (0, 0, 0),
                    "an account opens empty"
                );
            }
            AccountEvent::FundsHeld {
                held_after_minor,
                available_after_minor,
                ..
            }
            | AccountEvent::HoldReleased {
                held_after_minor,
                available_after_minor,
                ..
            } => {
                assert_eq!(held_after_minor, after.held_minor, "held after {event:?}");
                assert_eq!(
                    available_after_minor,
                    after.available_minor(),
                    "available after {event:?}"
                );
            }
            AccountEvent::HoldSettled {
                balance_after_minor,
                held_after_minor,
                ..
            } => {
                assert_eq!(
                    balance_after_minor, after.balance_minor,
                    "balance after {event:?}"
                );
                assert_eq!(held_after_minor, after.held_minor, "held after {event:?}");
            }
            AccountEvent::CreditReserved {
                pending_credits_after_minor,
                ..
            }
            | AccountEvent::CreditCancelled {
                pending_credits_after_minor,
                ..
            } => {
                assert_eq!(
                    pending_credits_after_minor, after.pending_credits_minor,
                    "pending credits after {event:?}"
                );
            }
            AccountEvent::CreditPosted {
                balance_after_minor,
                pending_credits_after_minor,
                ..
            } => {
                assert_eq!(
                    balance_after_minor, after.balance_minor,
                    "balance after {event:?}"
                );
                assert_eq!(
                    pending_credits_after_minor, after.pending_credits_minor,
                    "pending credits after {event:?}"
                );
            }
        }
    }

    #[test]
    fn open_records_owner_currency_and_name() {
        // Opening a new account records exactly what the command named, with empty balances.
        let events = when(&[], open(Some("Savings"))).expect("a new account opens");
        assert_eq!(
            events,
            vec![AccountEvent::AccountOpened {
                account_id: ACCOUNT,
                owner_id: OWNER,
                currency: usd(),
                name: Some("Savings".to_owned()),
                opened_at: now(),
            }]
        );
        let account = then_state(&[], &events);
        assert_eq!(
            (
                account.balance_minor,
                account.held_minor,
                account.available_minor()
            ),
            (0, 0, 0)
        );
        assert_eq!((account.opened_at, account.updated_at), (now(), now()));
    }

    #[test]
    fn open_accepts_no_name_and_names_up_to_the_limit_in_characters() {
        // A missing name is fine, and the 100-character limit counts characters, not bytes.
        assert!(when(&[], open(None)).is_ok());
        let hundred_accented = "é".repeat(ACCOUNT_NAME_CHARS_MAX);
        assert_eq!(hundred_accented.len(), 2 * ACCOUNT_NAME_CHARS_MAX);
        assert!(when(&[], open(Some(&hundred_accented))).is_ok());
    }

    #[test]
    fn open_refuses_empty_blank_and_too_long_names() {
        // A name that is empty, only whitespace or longer than 100 characters is refused.
        let too_long = "a".repeat(ACCOUNT_NAME_CHARS_MAX + 1);
        for name in ["", "   ", "\t\n", too_long.as_str()] {
            assert_eq!(
                when(&[], open(Some(name))),
                Err(AccountError::InvalidName),
                "name {name:?}"
            );
        }
    }

    #[test]
    fn opening_twice_is_refused() {
        // An account that exists cannot be opened again, even with the same command.
        assert_eq!(
            when(&[opened()], open(Some("Savings"))),
            Err(AccountError::AlreadyOpened)
        );
    }

    #[test]
    fn every_command_before_open_is_refused() {
        // No money command applies to an account that was never opened.
        for command in [
            hold(FIRST, 1),
            settle(FIRST),
            release(FIRST),
            reserve(FIRST, 1),
            post(FIRST),
            cancel(FIRST),
        ] {
            assert_eq!(
                when(&[], command.clone()),
                Err(AccountError::NotOpened),
                "{command:?}"
            );
        }
    }

    #[test]
    fn a_hold_of_exactly_the_available_amount_succeeds() {
        // The boundary is inclusive: holding everything that is available leaves zero.
        let given = and(funded(100), [funds_held(FIRST, 30, 30, 70)]);
        let events = when(&given, hold(SECOND, 70)).expect("70 of 70 available can be held");
        assert_eq!(
            events,
            vec![AccountEvent::FundsHeld {
                transaction_id: SECOND,
                amount_minor: 70,
                held_after_minor: 100,
                available_after_minor: 0,
                at: now(),
            }]
        );
        assert_eq!(then_state(&given, &events).available_minor(), 0);
    }

    #[test]
    fn a_hold_one_minor_unit_above_the_available_amount_is_refused() {
        // Open holds count: with 70 of 100 available, 71 is insufficient and nothing happens.
        let given = and(funded(100), [funds_held(FIRST, 30, 30, 70)]);
        assert_eq!(
            when(&given, hold(SECOND, 71)),
            Err(AccountError::InsufficientFunds {
                available_minor: 70,
                requested_minor: 71,
            })
        );
        assert_eq!(
            when(&[opened()], hold(FIRST, 1)),
            Err(AccountError::InsufficientFunds {
                available_minor: 0,
                requested_minor: 1,
            })
        );
    }

    #[test]
    fn a_hold_lowers_available_at_once_but_not_the_balance() {
        // Holding is the first phase: the posted balance stays, available drops, held rises.
        let events = when(&funded(100), hold(FIRST, 40)).expect("40 of 100 can be held");
        let account = then_state(&funded(100), &events);
        assert_eq!(account.balance_minor, 100);
        assert_eq!(account.held_minor, 40);
        assert_eq!(account.available_minor(), 60);
        assert_eq!(account.holds.get(&FIRST), Some(&40));
        assert_eq!(account.updated_at, now());
    }

    #[test]
    fn a_repeated_hold_with_the_same_amount_is_a_no_op() {
        // A redelivered hold for the same transaction changes nothing, even with no funds left.
        let given = and(funded(100), [funds_held(FIRST, 100, 100, 0)]);
        assert_eq!(when(&given, hold(FIRST, 100)), Ok(vec![]));
    }

    #[test]
    fn a_repeated_hold_with_a_different_amount_is_a_step_mismatch() {
        // One transaction holds one amount: another amount under its id is refused.
        let given = and(funded(100), [funds_held(FIRST, 30, 30, 70)]);
        assert_eq!(
            when(&given, hold(FIRST, 31)),
            Err(AccountError::StepMismatch(FIRST))
        );
        assert_eq!(
            when(&given, hold(FIRST, 29)),
            Err(AccountError::StepMismatch(FIRST))
        );
    }

    #[test]
    fn settling_turns_the_hold_into_a_debit() {
        // Settlement lowers the balance by the hold and removes the hold; available is unchanged.
        let given = and(
            funded(100),
            [
                funds_held(FIRST, 30, 30, 70),
                funds_held(SECOND, 20, 50, 50),
            ],
        );
        let events = when(&given, settle(FIRST)).expect("an open hold settles");
        assert_eq!(
            events,
            vec![AccountEvent::HoldSettled {
                transaction_id: FIRST,
                amount_minor: 30,
                balance_after_minor: 70,
                held_after_minor: 20,
                at: now(),
            }]
        );
        let account = then_state(&given, &events);
        assert_eq!(
            (
                account.balance_minor,
                account.held_minor,
                account.available_minor()
            ),
            (70, 20, 50)
        );
        assert!(!account.holds.contains_key(&FIRST));
        assert_eq!(account.holds.get(&SECOND), Some(&20));
    }

    #[test]
    fn settling_twice_or_without_a_hold_is_a_no_op() {
        // A redelivered settlement, or a release after it, never debits or frees money again.
        let given = and(
            funded(100),
            [
                funds_held(FIRST, 30, 30, 70),
                AccountEvent::HoldSettled {
                    transaction_id: FIRST,
                    amount_minor: 30,
                    balance_after_minor: 70,
                    held_after_minor: 0,
                    at: at(4),
                },
            ],
        );
        assert_eq!(when(&given, settle(FIRST)), Ok(vec![]));
        assert_eq!(when(&given, release(FIRST)), Ok(vec![]));
        assert_eq!(when(&funded(100), settle(SECOND)), Ok(vec![]));
    }

    #[test]
    fn releasing_gives_the_held_amount_back_to_available() {
        // The compensation: the hold disappears, available rises, the balance never moved.
        let given = and(funded(100), [funds_held(FIRST, 30, 30, 70)]);
        let events = when(&given, release(FIRST)).expect("an open hold releases");
        assert_eq!(
            events,
            vec![AccountEvent::HoldReleased {
                transaction_id: FIRST,
                amount_minor: 30,
                held_after_minor: 0,
                available_after_minor: 100,
                at: now(),
            }]
        );
        let account = then_state(&given, &events);
        assert_eq!(
            (
                account.balance_minor,
                account.held_minor,
                account.available_minor()
            ),
            (100, 0, 100)
        );
    }

    #[test]
    fn releasing_twice_or_without_a_hold_is_a_no_op() {
        // A redelivered release, or a settlement after it, changes nothing.
        let given = and(
            funded(100),
            [
                funds_held(FIRST, 30, 30, 70),
                AccountEvent::HoldReleased {
                    transaction_id: FIRST,
                    amount_minor: 30,
                    held_after_minor: 0,
                    available_after_minor: 100,
                    at: at(4),
                },
            ],
        );
        assert_eq!(when(&given, release(FIRST)), Ok(vec![]));
        assert_eq!(when(&given, settle(FIRST)), Ok(vec![]));
        assert_eq!(when(&funded(100), release(FIRST)), Ok(vec![]));
    }

    #[test]
    fn reserving_a_credit_makes_it_pending_without_touching_balance_or_available() {
        // An incoming credit is pending until posted: it is not spendable yet.
        let given = funded(100);
        let events = when(&given, reserve(FIRST, 25)).expect("a credit can be reserved");
        assert_eq!(
            events,
            vec![AccountEvent::CreditReserved {
                transaction_id: FIRST,
                amount_minor: 25,
                pending_credits_after_minor: 25,
                at: now(),
            }]
        );
        let account = then_state(&given, &events);
        assert_eq!(
            (
                account.balance_minor,
                account.available_minor(),
                account.pending_credits_minor
            ),
            (100, 100, 25)
        );
        assert_eq!(account.pending_credits.get(&FIRST), Some(&25));
    }

    #[test]
    fn a_repeated_credit_reservation_is_a_no_op_or_a_step_mismatch() {
        // The same amount again is a redelivery; another amount under the same id is refused.
        let given = and(funded(100), [credit_reserved(FIRST, 25, 25)]);
        assert_eq!(when(&given, reserve(FIRST, 25)), Ok(vec![]));
        assert_eq!(
            when(&given, reserve(FIRST, 26)),
            Err(AccountError::StepMismatch(FIRST))
        );
    }

    /// An account credited with `count` deposits of the largest amount, by stored events.
    fn credited_with_maximum_deposits(count: i64) -> Vec<AccountEvent> {
        let mut events = vec![opened()];
        for index in 0..count {
            let transaction_id = TransactionId(Uuid::from_u128(0x1_0000 + index as u128));
            events.push(credit_reserved(
                transaction_id,
                AMOUNT_MINOR_MAX,
                AMOUNT_MINOR_MAX,
            ));
            events.push(AccountEvent::CreditPosted {
                transaction_id,
                amount_minor: AMOUNT_MINOR_MAX,
                balance_after_minor: (index + 1) * AMOUNT_MINOR_MAX,
                pending_credits_after_minor: 0,
                at: at(2),
            });
        }
        events
    }

    #[test]
    fn a_credit_that_could_overflow_the_balance_is_refused() {
        // Balance plus pending credits must fit in an i64, so posting can never overflow.
        let deposits = i64::MAX / AMOUNT_MINOR_MAX;
        let given = credited_with_maximum_deposits(deposits);
        let headroom = i64::MAX - deposits * AMOUNT_MINOR_MAX;
        assert!(
            headroom < AMOUNT_MINOR_MAX,
            "the next maximum deposit cannot fit"
        );

        assert_eq!(
            when(&given, reserve(FIRST, AMOUNT_MINOR_MAX)),
            Err(AccountError::BalanceLimitExceeded)
        );
        // Exactly the headroom fits; one more minor unit, even as a second credit, does not.
        let events = when(&given, reserve(FIRST, headroom)).expect("the headroom fits exactly");
        let with_pending = and(given, events);
        assert_eq!(
            when(&with_pending, reserve(SECOND, 1)),
            Err(AccountError::BalanceLimitExceeded)
        );
    }

    #[test]
    fn posting_a_credit_lands_it_in_the_balance() {
        // The second phase of a credit: pending becomes posted and spendable.
        let given = and(funded(100), [credit_reserved(FIRST, 25, 25)]);
        let events = when(&given, post(FIRST)).expect("a reserved credit posts");
        assert_eq!(
            events,
            vec![AccountEvent::CreditPosted {
                transaction_id: FIRST,
                amount_minor: 25,
                balance_after_minor: 125,
                pending_credits_after_minor: 0,
                at: now(),
            }]
        );
        let account = then_state(&given, &events);
        assert_eq!(
            (
                account.balance_minor,
                account.available_minor(),
                account.pending_credits_minor
            ),
            (125, 125, 0)
        );
        // Posting again, cancelling afterwards or posting an unknown credit changes nothing.
        let posted = and(given, events);
        assert_eq!(when(&posted, post(FIRST)), Ok(vec![]));
        assert_eq!(when(&posted, cancel(FIRST)), Ok(vec![]));
        assert_eq!(when(&posted, post(SECOND)), Ok(vec![]));
    }

    #[test]
    fn cancelling_a_credit_drops_it_without_touching_the_balance() {
        // The compensation on the destination: the pending credit disappears, nothing lands.
        let given = and(funded(100), [credit_reserved(FIRST, 25, 25)]);
        let events = when(&given, cancel(FIRST)).expect("a reserved credit cancels");
        assert_eq!(
            events,
            vec![AccountEvent::CreditCancelled {
                transaction_id: FIRST,
                amount_minor: 25,
                pending_credits_after_minor: 0,
                at: now(),
            }]
        );
        let account = then_state(&given, &events);
        assert_eq!(
            (account.balance_minor, account.pending_credits_minor),
            (100, 0)
        );
        let cancelled = and(given, events);
        assert_eq!(when(&cancelled, cancel(FIRST)), Ok(vec![]));
        assert_eq!(when(&cancelled, post(FIRST)), Ok(vec![]));
    }

    #[test]
    fn every_event_carries_the_balances_of_the_state_after_it() {
        // Read models rely on the carried balances: each one equals the folded state.
        let script = [
            open(Some("Wallet")),
            reserve(FUNDING, 1_000),
            post(FUNDING),
            hold(FIRST, 300),
            hold(SECOND, 200),
            reserve(TransactionId(Uuid::from_u128(3)), 50),
            settle(FIRST),
            release(SECOND),
            reserve(TransactionId(Uuid::from_u128(4)), 70),
            post(TransactionId(Uuid::from_u128(3))),
            cancel(TransactionId(Uuid::from_u128(4))),
            hold(TransactionId(Uuid::from_u128(5)), 750),
        ];
        let mut state: Option<Account> = None;
        let mut decided = 0;
        for command in script {
            let events = Account::decide(state.as_ref(), &command).expect("the script is valid");
            assert_eq!(events.len(), 1, "{command:?} decides one event");
            for event in &events {
                let after = Account::apply(state.take(), event).expect("decided events apply");
                assert_carried_balances_match(event, &after);
                state = Some(after);
                decided += 1;
            }
        }
        assert_eq!(decided, 12);
        let account = state.expect("opened");
        assert_eq!(
            (
                account.balance_minor,
                account.held_minor,
                account.available_minor()
            ),
            (750, 750, 0)
        );
    }

    /// Applies `event` after `given` and returns the violation's problem.
    fn violation(given: &[AccountEvent], event: &AccountEvent) -> AccountInvariantViolation {
        Account::apply(self::given(given), event).expect_err("the stored sequence is impossible")
    }

    #[test]
    fn apply_reports_a_hold_released_twice() {
        // A second release of one hold would free money twice: it is reported, not folded.
        let released = AccountEvent::HoldReleased {
            transaction_id: FIRST,
            amount_minor: 30,
            held_after_minor: 0,
            available_after_minor: 100,
            at: at(4),
        };
        let given = and(
            funded(100),
            [funds_held(FIRST, 30, 30, 70), released.clone()],
        );
        assert_eq!(
            violation(&given, &released),
            AccountInvariantViolation {
                event_type: "HoldReleased",
                problem: "no open hold for the transaction",
            }
        );
    }

    #[test]
    fn apply_reports_events_before_the_account_is_opened() {
        // Every event but AccountOpened needs an open account.
        assert_eq!(
            violation(&[], &funds_held(FIRST, 1, 1, 0)),
            AccountInvariantViolation {
                event_type: "FundsHeld",
                problem: "the account was never opened",
            }
        );
        assert_eq!(
            violation(&[], &credit_reserved(FIRST, 1, 1)).event_type,
            "CreditReserved"
        );
    }

    #[test]
    fn apply_reports_a_hold_that_overdraws() {
        // No stored hold may take available below zero, even if the event claims it did not.
        assert_eq!(
            violation(&funded(100), &funds_held(FIRST, 101, 101, 0)),
            AccountInvariantViolation {
                event_type: "FundsHeld",
                problem: "the hold overdraws the account",
            }
        );
    }

    #[test]
    fn apply_reports_other_impossible_sequences() {
        // Opening twice, a second hold or credit for one transaction, and closing a step that
        // was never opened are all reported.
        assert_eq!(
            violation(&[opened()], &opened()).problem,
            "the account is already open"
        );
        let held = and(funded(100), [funds_held(FIRST, 10, 10, 90)]);
        assert_eq!(
            violation(&held, &funds_held(FIRST, 10, 20, 80)).problem,
            "the transaction already holds funds"
        );
        let settled = AccountEvent::HoldSettled {
            transaction_id: SECOND,
            amount_minor: 10,
            balance_after_minor: 90,
            held_after_minor: 0,
            at: at(4),
        };
        assert_eq!(
            violation(&funded(100), &settled).problem,
            "no open hold for the transaction"
        );
        let reserved = and(funded(100), [credit_reserved(FIRST, 5, 5)]);
        assert_eq!(
            violation(&reserved, &credit_reserved(FIRST, 5, 10)).problem,
            "the transaction already reserved a credit"
        );
        let posted = AccountEvent::CreditPosted {
            transaction_id: SECOND,
            amount_minor: 5,
            balance_after_minor: 105,
            pending_credits_after_minor: 0,
            at: at(4),
        };
        assert_eq!(
            violation(&funded(100), &posted).problem,
            "no reserved credit for the transaction"
        );
    }

    #[test]
    fn account_events_survive_a_json_round_trip() {
        // Account events are a stored format: what is written reads back identically.
        let events = and(
            funded(100),
            [
                funds_held(FIRST, 30, 30, 70),
                AccountEvent::HoldSettled {
                    transaction_id: FIRST,
                    amount_minor: 30,
                    balance_after_minor: 70,
                    held_after_minor: 0,
                    at: at(4),
                },
                funds_held(SECOND, 5, 5, 65),
                AccountEvent::HoldReleased {
                    transaction_id: SECOND,
                    amount_minor: 5,
                    held_after_minor: 0,
                    available_after_minor: 70,
                    at: at(5),
                },
                credit_reserved(FIRST, 9, 9),
                AccountEvent::CreditCancelled {
                    transaction_id: FIRST,
                    amount_minor: 9,
                    pending_credits_after_minor: 0,
                    at: at(6),
                },
            ],
        );
        let mut types: Vec<&str> = events.iter().map(AccountEvent::event_type).collect();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), 7, "every event type is covered");
        for event in &events {
            let json = serde_json::to_string(event).expect("an account event serialises");
            let back: AccountEvent = serde_json::from_str(&json).expect("and deserialises");
            assert_eq!(&back, event);
        }
    }
}
