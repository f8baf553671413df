//! The ledger's domain: money, accounts, transactions and the saga's decisions as plain types and
//! pure `decide`/`apply` functions (SPEC §2–§4).
//!
//! **Boundary:** no IO, no async, no clock, no database, no cqrs-es. Time and ids come in as
//! arguments; external verdicts (the fraud decision) come in as commands that become events.
//! The write side wraps these types in thin cqrs-es adapters.

pub mod account;
pub mod audit;
pub mod ids;
pub mod money;
pub mod saga;
#[cfg(test)]
mod simulation;
pub mod transaction;

pub use account::{Account, AccountCommand, AccountError, AccountEvent, AccountInvariantViolation};
pub use ids::{AccountId, CustomerId, TransactionId};
pub use money::{AMOUNT_MINOR_MAX, Amount, Currency, MoneyError, format_minor};
pub use saga::SagaStep;
pub use transaction::{
    FraudDecision, FraudOutcome, Leg, Outcome, RejectionReason, Transaction, TransactionCommand,
    TransactionError, TransactionEvent, TransactionInvariantViolation, TransactionKind,
    TransactionRequest, TransactionStatus,
};
