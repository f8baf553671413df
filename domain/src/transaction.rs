//! A transaction: a deposit, withdrawal or transfer moving one amount from a debit account to a
//! credit account, and its explicit state machine (SPEC §4):
//!
//! ```text
//! Created ──FundsReserved──┐
//!    │  └──FraudChecked────┼──> (reserved + approved) TransactionConfirmed ──> SettlementCompleted
//!    └──TransactionRejected(reason) <── (rejected | timeout | insufficient funds) ──> ReleaseCompleted
//! ```
//!
//! `FundsReserved` and `FraudChecked` may arrive in either order. Repeating a step that already
//! happened is a no-op (no events); a step that cannot follow the current state is an error.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{AccountId, CustomerId, TransactionId};
use crate::money::{Amount, Currency};

/// Longest description a transaction may carry, in characters (SPEC §5).
pub const DESCRIPTION_CHARS_MAX: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionKind {
    /// Money enters from the currency's world account into a customer account.
    Deposit,
    /// Money leaves a customer account for the currency's world account.
    Withdrawal,
    /// Money moves between two customer accounts.
    Transfer,
}

impl TransactionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionKind::Deposit => "deposit",
            TransactionKind::Withdrawal => "withdrawal",
            TransactionKind::Transfer => "transfer",
        }
    }
}

/// A validated request to move money. Parse at the edge with [`TransactionRequest::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionRequest {
    pub kind: TransactionKind,
    /// Stored in minor units; the name says so.
    #[serde(rename = "amount_minor")]
    pub amount: Amount,
    pub currency: Currency,
    /// The customer account debited; `None` for deposits (the world account is debited).
    pub source_account_id: Option<AccountId>,
    /// The customer account credited; `None` for withdrawals (the world account is credited).
    pub destination_account_id: Option<AccountId>,
    pub description: Option<String>,
}

impl TransactionRequest {
    /// Checks the shape of a request: which accounts each kind names, distinct accounts, the
    /// description's length. Whether the accounts exist is the caller's business.
    pub fn new(
        kind: TransactionKind,
        amount: Amount,
        currency: Currency,
        source_account_id: Option<AccountId>,
        destination_account_id: Option<AccountId>,
        description: Option<String>,
    ) -> Result<Self, TransactionError> {
        use TransactionError as E;
        match (kind, source_account_id, destination_account_id) {
            (TransactionKind::Deposit, Some(_), _) => return Err(E::UnexpectedSource),
            (TransactionKind::Deposit, None, None) => return Err(E::MissingDestination),
            (TransactionKind::Withdrawal, None, _) => return Err(E::MissingSource),
            (TransactionKind::Withdrawal, Some(_), Some(_)) => {
                return Err(E::UnexpectedDestination);
            }
            (TransactionKind::Transfer, None, _) => return Err(E::MissingSource),
            (TransactionKind::Transfer, Some(_), None) => return Err(E::MissingDestination),
            (TransactionKind::Transfer, Some(source), Some(destination))
                if source == destination =>
            {
                return Err(E::SameAccount);
            }
            _ => {}
        }
        if let Some(description) = &description
            && description.chars().count() > DESCRIPTION_CHARS_MAX
        {
            return Err(E::DescriptionTooLong);
        }
        Ok(TransactionRequest {
            kind,
            amount,
            currency,
            source_account_id,
            destination_account_id,
            description,
        })
    }

    /// The account debited: the source, or the currency's world account for a deposit.
    pub fn debit_account(&self) -> AccountId {
        self.source_account_id
            .unwrap_or_else(|| AccountId::world(self.currency))
    }

    /// The account credited: the destination, or the currency's world account for a withdrawal.
    pub fn credit_account(&self) -> AccountId {
        self.destination_account_id
            .unwrap_or_else(|| AccountId::world(self.currency))
    }

    /// A hash of the normalised request: two requests with the same fingerprint ask for the same
    /// thing, so a repeated idempotency key with the same fingerprint is a replay and with another
    /// one is a misuse. Every field is written in a fixed order with explicit separators.
    pub fn fingerprint(&self) -> String {
        let optional = |id: Option<AccountId>| id.map(|id| id.to_string()).unwrap_or_default();
        let canonical = format!(
            "v1\nkind={}\namount_minor={}\ncurrency={}\nsource={}\ndestination={}\ndescription={}",
            self.kind.as_str(),
            self.amount.minor(),
            self.currency.code(),
            optional(self.source_account_id),
            optional(self.destination_account_id),
            // Length-prefixed so that no description can imitate the fields above.
            self.description
                .as_deref()
                .map(|text| format!("{}:{text}", text.len()))
                .unwrap_or_default(),
        );
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// The fraud worker's verdict, recorded as `FraudChecked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FraudOutcome {
    Approved,
    Rejected,
}

/// A decision as the fraud worker sent it: the outcome, the rule that fired (if any) and the
/// inputs it saw, kept for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FraudDecision {
    pub outcome: FraudOutcome,
    pub rule: Option<String>,
    /// Shared, never changed: a transaction's state is cloned at every step it takes (caches,
    /// decisions), and copying this nested JSON each time was most of that cost. Stored as the
    /// JSON value itself (serde's `rc`), so the event format is unchanged.
    #[serde(default)]
    pub details: Arc<serde_json::Value>,
}

/// Why a transaction was rejected; the stable strings of SPEC §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    InsufficientFunds,
    FraudSuspected,
    FraudCheckTimeout,
    /// The credit would take the destination beyond what an i64 balance can hold.
    BalanceLimitExceeded,
}

impl RejectionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionReason::InsufficientFunds => "insufficient_funds",
            RejectionReason::FraudSuspected => "fraud_suspected",
            RejectionReason::FraudCheckTimeout => "fraud_check_timeout",
            RejectionReason::BalanceLimitExceeded => "balance_limit_exceeded",
        }
    }
}

/// One side of a confirmed transaction: a signed amount on one account. The legs of a
/// transaction sum to zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    pub account_id: AccountId,
    pub amount_minor: i64,
    pub currency: Currency,
}

impl Leg {
    /// Whether the leg is on its currency's world account (which has no stream: its balance is
    /// the sum of the world legs, SPEC §3). Narrower and cheaper than
    /// [`AccountId::is_world`], which hashes every currency's world id to recognise any of
    /// them: a leg's world account is its own currency's, so one id is computed.
    pub fn is_world(&self) -> bool {
        self.account_id == AccountId::world(self.currency)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransactionCommand {
    Create {
        transaction_id: TransactionId,
        request: TransactionRequest,
        initiated_by: CustomerId,
        at: DateTime<Utc>,
    },
    RecordReservation {
        at: DateTime<Utc>,
    },
    RecordFraudDecision {
        decision: FraudDecision,
        at: DateTime<Utc>,
    },
    Confirm {
        at: DateTime<Utc>,
    },
    Reject {
        reason: RejectionReason,
        at: DateTime<Utc>,
    },
    CompleteSettlement {
        at: DateTime<Utc>,
    },
    CompleteRelease {
        at: DateTime<Utc>,
    },
}

/// What happened to a transaction. Stored forever: fields are only ever added (with defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransactionEvent {
    TransactionCreated {
        transaction_id: TransactionId,
        request: TransactionRequest,
        request_fingerprint: String,
        initiated_by: CustomerId,
        created_at: DateTime<Utc>,
    },
    /// The source holds the amount and the destination has reserved the credit.
    FundsReserved { at: DateTime<Utc> },
    FraudChecked {
        decision: FraudDecision,
        at: DateTime<Utc>,
    },
    /// The one event that carries both legs.
    TransactionConfirmed { legs: Vec<Leg>, at: DateTime<Utc> },
    TransactionRejected {
        reason: RejectionReason,
        at: DateTime<Utc>,
    },
    /// Both accounts have settled: the source's hold became a debit, the credit landed.
    SettlementCompleted { at: DateTime<Utc> },
    /// Whatever the rejected transaction held or reserved has been released.
    ReleaseCompleted { at: DateTime<Utc> },
}

impl TransactionEvent {
    /// The event's type name as stored in the event store's `event_type` column.
    pub fn event_type(&self) -> &'static str {
        match self {
            TransactionEvent::TransactionCreated { .. } => "TransactionCreated",
            TransactionEvent::FundsReserved { .. } => "FundsReserved",
            TransactionEvent::FraudChecked { .. } => "FraudChecked",
            TransactionEvent::TransactionConfirmed { .. } => "TransactionConfirmed",
            TransactionEvent::TransactionRejected { .. } => "TransactionRejected",
            TransactionEvent::SettlementCompleted { .. } => "SettlementCompleted",
            TransactionEvent::ReleaseCompleted { .. } => "ReleaseCompleted",
        }
    }
}

/// Why a transaction command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    #[error("this transaction type needs a source_account_id")]
    MissingSource,
    #[error("deposits take no source_account_id: the world account is the source")]
    UnexpectedSource,
    #[error("this transaction type needs a destination_account_id")]
    MissingDestination,
    #[error("withdrawals take no destination_account_id: the world account is the destination")]
    UnexpectedDestination,
    #[error("source and destination are the same account")]
    SameAccount,
    #[error("description is longer than {DESCRIPTION_CHARS_MAX} characters")]
    DescriptionTooLong,
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("transaction does not exist")]
    NotCreated,
    #[error("{command} is not allowed while the transaction is {state}")]
    IllegalTransition {
        command: &'static str,
        state: &'static str,
    },
}

/// A stored event that cannot follow the transaction's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transaction event {event_type} cannot apply: {problem}")]
pub struct TransactionInvariantViolation {
    pub event_type: &'static str,
    pub problem: &'static str,
}

/// The public status of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransactionStatus {
    Pending,
    Confirmed,
    Rejected,
}

impl TransactionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionStatus::Pending => "PENDING",
            TransactionStatus::Confirmed => "CONFIRMED",
            TransactionStatus::Rejected => "REJECTED",
        }
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Confirmed { legs: Vec<Leg> },
    Rejected { reason: RejectionReason },
}

/// The state of a created transaction, folded from its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub id: TransactionId,
    pub request: TransactionRequest,
    pub request_fingerprint: String,
    pub initiated_by: CustomerId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub funds_reserved: bool,
    pub fraud: Option<FraudDecision>,
    pub outcome: Option<Outcome>,
    /// The saga's last step ran: settlement after confirmation, release after rejection.
    pub completed: bool,
}

impl Transaction {
    pub fn status(&self) -> TransactionStatus {
        match self.outcome {
            None => TransactionStatus::Pending,
            Some(Outcome::Confirmed { .. }) => TransactionStatus::Confirmed,
            Some(Outcome::Rejected { .. }) => TransactionStatus::Rejected,
        }
    }

    pub fn rejection_reason(&self) -> Option<RejectionReason> {
        match self.outcome {
            Some(Outcome::Rejected { reason }) => Some(reason),
            _ => None,
        }
    }

    /// The two legs of the transaction: the debit account loses the amount, the credit account
    /// gains it. They sum to zero by construction.
    pub fn legs(&self) -> Vec<Leg> {
        let amount = self.request.amount.minor();
        let currency = self.request.currency;
        vec![
            Leg {
                account_id: self.request.debit_account(),
                amount_minor: -amount,
                currency,
            },
            Leg {
                account_id: self.request.credit_account(),
                amount_minor: amount,
                currency,
            },
        ]
    }

    fn state_name(&self) -> &'static str {
        match (&self.outcome, self.completed) {
            (None, _) => "pending",
            (Some(Outcome::Confirmed { .. }), false) => "confirmed",
            (Some(Outcome::Confirmed { .. }), true) => "settled",
            (Some(Outcome::Rejected { .. }), false) => "rejected",
            (Some(Outcome::Rejected { .. }), true) => "released",
        }
    }

    /// Decides what a command does to a transaction (`None` before it is created).
    pub fn decide(
        transaction: Option<&Transaction>,
        command: &TransactionCommand,
    ) -> Result<Vec<TransactionEvent>, TransactionError> {
        let transaction = match (transaction, command) {
            (None, TransactionCommand::Create { .. }) => return Ok(vec![decide_create(command)]),
            (None, _) => return Err(TransactionError::NotCreated),
            (Some(transaction), _) => transaction,
        };
        let illegal = |command: &'static str| TransactionError::IllegalTransition {
            command,
            state: transaction.state_name(),
        };
        let event = match command {
            TransactionCommand::Create { request, .. } => {
                // The stream's first event is the idempotency lock: the same request again is
                // a replay (no event), another request under the same key is refused.
                if request.fingerprint() == transaction.request_fingerprint {
                    None
                } else {
                    return Err(TransactionError::IdempotencyKeyReused);
                }
            }
            TransactionCommand::RecordReservation { at } => match transaction.outcome {
                _ if transaction.funds_reserved => None,
                None => Some(TransactionEvent::FundsReserved { at: *at }),
                Some(_) => return Err(illegal("RecordReservation")),
            },
            TransactionCommand::RecordFraudDecision { decision, at } => {
                // A duplicate decision, or a late one after the outcome, is acknowledged and
                // changes nothing: the first recorded decision stands.
                if transaction.fraud.is_some() || transaction.outcome.is_some() {
                    None
                } else {
                    Some(TransactionEvent::FraudChecked {
                        decision: decision.clone(),
                        at: *at,
                    })
                }
            }
            TransactionCommand::Confirm { at } => match &transaction.outcome {
                Some(Outcome::Confirmed { .. }) => None,
                Some(Outcome::Rejected { .. }) => return Err(illegal("Confirm")),
                None => {
                    let approved = transaction
                        .fraud
                        .as_ref()
                        .is_some_and(|decision| decision.outcome == FraudOutcome::Approved);
                    if !transaction.funds_reserved || !approved {
                        return Err(illegal("Confirm"));
                    }
                    let legs = transaction.legs();
                    assert_eq!(
                        legs.iter().map(|leg| leg.amount_minor).sum::<i64>(),
                        0,
                        "a transaction's legs sum to zero"
                    );
                    Some(TransactionEvent::TransactionConfirmed { legs, at: *at })
                }
            },
            TransactionCommand::Reject { reason, at } => match &transaction.outcome {
                Some(Outcome::Rejected { .. }) => None,
                Some(Outcome::Confirmed { .. }) => return Err(illegal("Reject")),
                None => Some(TransactionEvent::TransactionRejected {
                    reason: *reason,
                    at: *at,
                }),
            },
            TransactionCommand::CompleteSettlement { at } => match &transaction.outcome {
                Some(Outcome::Confirmed { .. }) if transaction.completed => None,
                Some(Outcome::Confirmed { .. }) => {
                    Some(TransactionEvent::SettlementCompleted { at: *at })
                }
                _ => return Err(illegal("CompleteSettlement")),
            },
            TransactionCommand::CompleteRelease { at } => match &transaction.outcome {
                Some(Outcome::Rejected { .. }) if transaction.completed => None,
                Some(Outcome::Rejected { .. }) => {
                    Some(TransactionEvent::ReleaseCompleted { at: *at })
                }
                _ => return Err(illegal("CompleteRelease")),
            },
        };
        Ok(event.into_iter().collect())
    }

    /// Folds one stored event into the state, reporting an event that cannot follow it.
    pub fn apply(
        transaction: Option<Transaction>,
        event: &TransactionEvent,
    ) -> Result<Transaction, TransactionInvariantViolation> {
        let violation = |problem| TransactionInvariantViolation {
            event_type: event.event_type(),
            problem,
        };
        let mut transaction = match (transaction, event) {
            (
                None,
                TransactionEvent::TransactionCreated {
                    transaction_id,
                    request,
                    request_fingerprint,
                    initiated_by,
                    created_at,
                },
            ) => {
                return Ok(Transaction {
                    id: *transaction_id,
                    request: request.clone(),
                    request_fingerprint: request_fingerprint.clone(),
                    initiated_by: *initiated_by,
                    created_at: *created_at,
                    updated_at: *created_at,
                    funds_reserved: false,
                    fraud: None,
                    outcome: None,
                    completed: false,
                });
            }
            (Some(_), TransactionEvent::TransactionCreated { .. }) => {
                return Err(violation("the transaction already exists"));
            }
            (None, _) => return Err(violation("the transaction was never created")),
            (Some(transaction), _) => transaction,
        };
        match event {
            TransactionEvent::TransactionCreated { .. } => unreachable!("handled above"),
            TransactionEvent::FundsReserved { at } => {
                if transaction.funds_reserved || transaction.outcome.is_some() {
                    return Err(violation("funds reserved twice or after the outcome"));
                }
                transaction.funds_reserved = true;
                transaction.updated_at = *at;
            }
            TransactionEvent::FraudChecked { decision, at } => {
                if transaction.fraud.is_some() {
                    return Err(violation("a second fraud decision"));
                }
                transaction.fraud = Some(decision.clone());
                transaction.updated_at = *at;
            }
            TransactionEvent::TransactionConfirmed { legs, at } => {
                let approved = transaction
                    .fraud
                    .as_ref()
                    .is_some_and(|decision| decision.outcome == FraudOutcome::Approved);
                if transaction.outcome.is_some() || !transaction.funds_reserved || !approved {
                    return Err(violation("confirmed without reservation and approval"));
                }
                if legs.iter().map(|leg| leg.amount_minor).sum::<i64>() != 0 {
                    return Err(violation("the legs do not sum to zero"));
                }
                transaction.outcome = Some(Outcome::Confirmed { legs: legs.clone() });
                transaction.updated_at = *at;
            }
            TransactionEvent::TransactionRejected { reason, at } => {
                if transaction.outcome.is_some() {
                    return Err(violation("rejected after the outcome"));
                }
                transaction.outcome = Some(Outcome::Rejected { reason: *reason });
                transaction.updated_at = *at;
            }
            TransactionEvent::SettlementCompleted { at } => {
                if !matches!(transaction.outcome, Some(Outcome::Confirmed { .. }))
                    || transaction.completed
                {
                    return Err(violation("settled without confirmation, or twice"));
                }
                transaction.completed = true;
                transaction.updated_at = *at;
            }
            TransactionEvent::ReleaseCompleted { at } => {
                if !matches!(transaction.outcome, Some(Outcome::Rejected { .. }))
                    || transaction.completed
                {
                    return Err(violation("released without rejection, or twice"));
                }
                transaction.completed = true;
                transaction.updated_at = *at;
            }
        }
        Ok(transaction)
    }
}

fn decide_create(command: &TransactionCommand) -> TransactionEvent {
    let TransactionCommand::Create {
        transaction_id,
        request,
        initiated_by,
        at,
    } = command
    else {
        unreachable!("decide_create is only called with Create");
    };
    TransactionEvent::TransactionCreated {
        transaction_id: *transaction_id,
        request: request.clone(),
        request_fingerprint: request.fingerprint(),
        initiated_by: *initiated_by,
        created_at: *at,
    }
}

#[cfg(test)]
mod tests {
    //! Given stored events folded with `Transaction::apply`, when a command is decided with
    //! `Transaction::decide`, then these events or this error.

    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    const ALICE: CustomerId = CustomerId(Uuid::from_u128(0xA11CE));
    const SOURCE: AccountId = AccountId(Uuid::from_u128(0x50));
    const DESTINATION: AccountId = AccountId(Uuid::from_u128(0xD0));
    const OTHER: AccountId = AccountId(Uuid::from_u128(0x07));

    fn usd() -> Currency {
        Currency::from_code("USD").expect("USD is in the currency table")
    }

    fn eur() -> Currency {
        Currency::from_code("EUR").expect("EUR is in the currency table")
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

    fn id() -> TransactionId {
        TransactionId::from_idempotency_key(ALICE, "key-1")
    }

    fn request(
        kind: TransactionKind,
        source: Option<AccountId>,
        destination: Option<AccountId>,
    ) -> Result<TransactionRequest, TransactionError> {
        TransactionRequest::new(kind, amount(12_550), usd(), source, destination, None)
    }

    fn transfer() -> TransactionRequest {
        TransactionRequest::new(
            TransactionKind::Transfer,
            amount(12_550),
            usd(),
            Some(SOURCE),
            Some(DESTINATION),
            Some("rent".to_owned()),
        )
        .expect("a transfer between two accounts is well formed")
    }

    fn deposit() -> TransactionRequest {
        request(TransactionKind::Deposit, None, Some(DESTINATION))
            .expect("a deposit names a destination")
    }

    fn withdrawal() -> TransactionRequest {
        request(TransactionKind::Withdrawal, Some(SOURCE), None)
            .expect("a withdrawal names a source")
    }

    fn approved() -> FraudDecision {
        FraudDecision {
            outcome: FraudOutcome::Approved,
            rule: None,
            details: json!({}).into(),
        }
    }

    fn fraud_rejected() -> FraudDecision {
        FraudDecision {
            outcome: FraudOutcome::Rejected,
            rule: Some("amount_threshold".to_owned()),
            details: json!({ "threshold_minor": 1_000_000 }).into(),
        }
    }

    fn created(request: TransactionRequest) -> TransactionEvent {
        TransactionEvent::TransactionCreated {
            transaction_id: id(),
            request_fingerprint: request.fingerprint(),
            request,
            initiated_by: ALICE,
            created_at: at(0),
        }
    }

    fn reserved() -> TransactionEvent {
        TransactionEvent::FundsReserved { at: at(1) }
    }

    fn checked(decision: FraudDecision) -> TransactionEvent {
        TransactionEvent::FraudChecked {
            decision,
            at: at(2),
        }
    }

    fn rejected(reason: RejectionReason) -> TransactionEvent {
        TransactionEvent::TransactionRejected { reason, at: at(3) }
    }

    /// The legs of [`transfer`], written out independently of `Transaction::legs`.
    fn transfer_legs() -> Vec<Leg> {
        vec![
            Leg {
                account_id: SOURCE,
                amount_minor: -12_550,
                currency: usd(),
            },
            Leg {
                account_id: DESTINATION,
                amount_minor: 12_550,
                currency: usd(),
            },
        ]
    }

    fn confirmed() -> TransactionEvent {
        TransactionEvent::TransactionConfirmed {
            legs: transfer_legs(),
            at: at(3),
        }
    }

    /// A transfer that is reserved, approved and confirmed.
    fn confirmed_transfer() -> Vec<TransactionEvent> {
        vec![
            created(transfer()),
            reserved(),
            checked(approved()),
            confirmed(),
        ]
    }

    fn given(events: &[TransactionEvent]) -> Option<Transaction> {
        events.iter().fold(None, |state, event| {
            Some(Transaction::apply(state, event).expect("the given events are a valid history"))
        })
    }

    fn when(
        events: &[TransactionEvent],
        command: TransactionCommand,
    ) -> Result<Vec<TransactionEvent>, TransactionError> {
        Transaction::decide(given(events).as_ref(), &command)
    }

    fn create(request: TransactionRequest) -> TransactionCommand {
        TransactionCommand::Create {
            transaction_id: id(),
            request,
            initiated_by: ALICE,
            at: now(),
        }
    }

    fn record_reservation() -> TransactionCommand {
        TransactionCommand::RecordReservation { at: now() }
    }

    fn record_decision(decision: FraudDecision) -> TransactionCommand {
        TransactionCommand::RecordFraudDecision {
            decision,
            at: now(),
        }
    }

    fn confirm() -> TransactionCommand {
        TransactionCommand::Confirm { at: now() }
    }

    fn reject(reason: RejectionReason) -> TransactionCommand {
        TransactionCommand::Reject { reason, at: now() }
    }

    fn complete_settlement() -> TransactionCommand {
        TransactionCommand::CompleteSettlement { at: now() }
    }

    fn complete_release() -> TransactionCommand {
        TransactionCommand::CompleteRelease { at: now() }
    }

    fn illegal(command: &'static str, state: &'static str) -> TransactionError {
        TransactionError::IllegalTransition { command, state }
    }

    fn with(events: &[TransactionEvent], more: TransactionEvent) -> Vec<TransactionEvent> {
        events.iter().cloned().chain([more]).collect()
    }

    #[test]
    fn create_stores_the_request_and_its_fingerprint() {
        // The first event records the request, who made it and the fingerprint of the request.
        let events = when(&[], create(transfer())).expect("a new transaction is created");
        assert_eq!(
            events,
            vec![TransactionEvent::TransactionCreated {
                transaction_id: id(),
                request: transfer(),
                request_fingerprint: transfer().fingerprint(),
                initiated_by: ALICE,
                created_at: now(),
            }]
        );
        let transaction = given(&events).expect("created");
        assert_eq!(transaction.status(), TransactionStatus::Pending);
        assert_eq!(transaction.request_fingerprint.len(), 64, "a hex SHA-256");
        assert!(!transaction.funds_reserved && transaction.fraud.is_none());
        assert!(!transaction.completed);
    }

    #[test]
    fn the_same_request_under_the_same_key_is_a_replay() {
        // Creating again with an identical request appends nothing, whatever state it is in.
        assert_eq!(when(&[created(transfer())], create(transfer())), Ok(vec![]));
        assert_eq!(when(&confirmed_transfer(), create(transfer())), Ok(vec![]));
    }

    #[test]
    fn a_different_request_under_the_same_key_is_refused() {
        // Reusing an idempotency key for another request is a misuse, not a new transaction.
        let mut other = transfer();
        other.description = Some("rent for March".to_owned());
        assert_eq!(
            when(&[created(transfer())], create(other)),
            Err(TransactionError::IdempotencyKeyReused)
        );
        assert_eq!(
            when(&[created(transfer())], create(deposit())),
            Err(TransactionError::IdempotencyKeyReused)
        );
    }

    #[test]
    fn the_fingerprint_changes_when_any_field_changes() {
        // Every field, the description included, takes part in the fingerprint.
        let base = transfer();
        let mut variants = vec![base.clone()];
        let mut change = |edit: fn(&mut TransactionRequest)| {
            let mut variant = base.clone();
            edit(&mut variant);
            variants.push(variant);
        };
        change(|r| r.kind = TransactionKind::Deposit);
        change(|r| r.amount = Amount::from_minor(12_551).expect("positive"));
        change(|r| r.currency = Currency::from_code("EUR").expect("known"));
        change(|r| r.source_account_id = Some(OTHER));
        change(|r| r.source_account_id = None);
        change(|r| r.destination_account_id = Some(OTHER));
        change(|r| r.destination_account_id = None);
        change(|r| r.description = Some("Rent".to_owned()));
        change(|r| r.description = Some(String::new()));
        change(|r| r.description = None);
        let fingerprints: Vec<String> = variants
            .iter()
            .map(TransactionRequest::fingerprint)
            .collect();
        for (index, fingerprint) in fingerprints.iter().enumerate() {
            for (other_index, other) in fingerprints.iter().enumerate().skip(index + 1) {
                assert_ne!(
                    fingerprint, other,
                    "{:?} and {:?} share a fingerprint",
                    variants[index], variants[other_index]
                );
            }
        }
        // And it is stable: an equal request has an equal fingerprint.
        assert_eq!(transfer().fingerprint(), base.fingerprint());
    }

    #[test]
    fn request_shapes_that_name_the_wrong_accounts_are_refused() {
        // Each kind names exactly the customer accounts it touches, and a transfer two of them.
        use TransactionKind::{Deposit, Transfer, Withdrawal};
        let cases = [
            (
                Deposit,
                Some(SOURCE),
                Some(DESTINATION),
                TransactionError::UnexpectedSource,
            ),
            (
                Deposit,
                Some(SOURCE),
                None,
                TransactionError::UnexpectedSource,
            ),
            (Deposit, None, None, TransactionError::MissingDestination),
            (Withdrawal, None, None, TransactionError::MissingSource),
            (
                Withdrawal,
                None,
                Some(DESTINATION),
                TransactionError::MissingSource,
            ),
            (
                Withdrawal,
                Some(SOURCE),
                Some(DESTINATION),
                TransactionError::UnexpectedDestination,
            ),
            (
                Transfer,
                None,
                Some(DESTINATION),
                TransactionError::MissingSource,
            ),
            (Transfer, None, None, TransactionError::MissingSource),
            (
                Transfer,
                Some(SOURCE),
                None,
                TransactionError::MissingDestination,
            ),
            (
                Transfer,
                Some(SOURCE),
                Some(SOURCE),
                TransactionError::SameAccount,
            ),
        ];
        for (kind, source, destination, expected) in cases {
            assert_eq!(
                request(kind, source, destination),
                Err(expected.clone()),
                "{kind:?} from {source:?} to {destination:?}"
            );
        }
    }

    #[test]
    fn well_formed_requests_are_accepted() {
        // The three valid shapes build a request that keeps what it was given.
        let request = transfer();
        assert_eq!(request.kind, TransactionKind::Transfer);
        assert_eq!(request.amount.minor(), 12_550);
        assert_eq!(
            (request.source_account_id, request.destination_account_id),
            (Some(SOURCE), Some(DESTINATION))
        );
        assert_eq!(request.description.as_deref(), Some("rent"));
        assert_eq!(deposit().source_account_id, None);
        assert_eq!(withdrawal().destination_account_id, None);
    }

    #[test]
    fn the_description_limit_counts_characters_not_bytes() {
        // 500 two-byte characters are allowed; 501 characters of any width are not.
        let describe = |text: String| {
            TransactionRequest::new(
                TransactionKind::Deposit,
                amount(1),
                usd(),
                None,
                Some(DESTINATION),
                Some(text),
            )
        };
        let five_hundred = "é".repeat(DESCRIPTION_CHARS_MAX);
        assert_eq!(five_hundred.len(), 1_000);
        assert!(describe(five_hundred).is_ok());
        assert_eq!(
            describe("é".repeat(DESCRIPTION_CHARS_MAX + 1)),
            Err(TransactionError::DescriptionTooLong)
        );
        assert_eq!(
            describe("a".repeat(DESCRIPTION_CHARS_MAX + 1)),
            Err(TransactionError::DescriptionTooLong)
        );
    }

    #[test]
    fn reservation_then_approval_confirms_with_both_legs() {
        // Funds reserved first, the approval second: the confirmation carries both legs.
        let given = [created(transfer())];
        let reservation = when(&given, record_reservation()).expect("a pending transfer reserves");
        assert_eq!(
            reservation,
            vec![TransactionEvent::FundsReserved { at: now() }]
        );
        let given = with(&given, reserved());
        let decision = when(&given, record_decision(approved())).expect("the decision is recorded");
        assert_eq!(
            decision,
            vec![TransactionEvent::FraudChecked {
                decision: approved(),
                at: now(),
            }]
        );
        let given = with(&given, checked(approved()));
        assert_eq!(
            when(&given, confirm()),
            Ok(vec![TransactionEvent::TransactionConfirmed {
                legs: transfer_legs(),
                at: now(),
            }])
        );
    }

    #[test]
    fn approval_then_reservation_confirms_too() {
        // The fraud decision may arrive before the funds are reserved.
        let given = [created(transfer()), checked(approved())];
        assert_eq!(
            when(&given, record_reservation()),
            Ok(vec![TransactionEvent::FundsReserved { at: now() }])
        );
        let given = with(&given, reserved());
        assert_eq!(
            when(&given, confirm()),
            Ok(vec![TransactionEvent::TransactionConfirmed {
                legs: transfer_legs(),
                at: now(),
            }])
        );
        let transaction = given_confirmed(&given);
        assert_eq!(transaction.status(), TransactionStatus::Confirmed);
    }

    fn given_confirmed(events: &[TransactionEvent]) -> Transaction {
        let decided = when(events, confirm()).expect("confirmable");
        given(&[events, &decided].concat()).expect("created")
    }

    #[test]
    fn confirm_needs_both_the_reservation_and_an_approval() {
        // Without reservation, without decision, or with a rejection, confirming is illegal.
        let cases: [&[TransactionEvent]; 4] = [
            &[created(transfer())],
            &[created(transfer()), reserved()],
            &[created(transfer()), checked(approved())],
            &[created(transfer()), reserved(), checked(fraud_rejected())],
        ];
        for given in cases {
            assert_eq!(
                when(given, confirm()),
                Err(illegal("Confirm", "pending")),
                "{given:?}"
            );
        }
        assert_eq!(when(&[], confirm()), Err(TransactionError::NotCreated));
    }

    #[test]
    fn confirming_twice_is_a_no_op() {
        // A redelivered confirmation appends nothing, before or after settlement.
        assert_eq!(when(&confirmed_transfer(), confirm()), Ok(vec![]));
        let settled = with(
            &confirmed_transfer(),
            TransactionEvent::SettlementCompleted { at: at(4) },
        );
        assert_eq!(when(&settled, confirm()), Ok(vec![]));
    }

    #[test]
    fn a_rejected_transaction_cannot_be_confirmed_and_vice_versa() {
        // The outcome is final: confirm after reject and reject after confirm are illegal.
        let rejected_after_reservation = [
            created(transfer()),
            reserved(),
            rejected(RejectionReason::FraudCheckTimeout),
        ];
        assert_eq!(
            when(&rejected_after_reservation, confirm()),
            Err(illegal("Confirm", "rejected"))
        );
        assert_eq!(
            when(
                &confirmed_transfer(),
                reject(RejectionReason::FraudSuspected)
            ),
            Err(illegal("Reject", "confirmed"))
        );
    }

    #[test]
    fn rejecting_records_the_reason_once() {
        // The first rejection is recorded with its reason; a second one appends nothing.
        assert_eq!(
            when(
                &[created(transfer())],
                reject(RejectionReason::InsufficientFunds)
            ),
            Ok(vec![TransactionEvent::TransactionRejected {
                reason: RejectionReason::InsufficientFunds,
                at: now(),
            }])
        );
        let given = [
            created(transfer()),
            rejected(RejectionReason::InsufficientFunds),
        ];
        assert_eq!(
            when(&given, reject(RejectionReason::FraudSuspected)),
            Ok(vec![])
        );
        let transaction = self::given(&given).expect("created");
        assert_eq!(transaction.status(), TransactionStatus::Rejected);
        assert_eq!(
            transaction.rejection_reason(),
            Some(RejectionReason::InsufficientFunds)
        );
    }

    #[test]
    fn duplicate_and_late_fraud_decisions_are_no_ops() {
        // The first decision stands; a duplicate or a decision after the outcome changes nothing.
        let decided = [created(transfer()), checked(approved())];
        assert_eq!(
            when(&decided, record_decision(fraud_rejected())),
            Ok(vec![])
        );
        assert_eq!(when(&decided, record_decision(approved())), Ok(vec![]));
        let timed_out = [
            created(transfer()),
            rejected(RejectionReason::FraudCheckTimeout),
        ];
        assert_eq!(when(&timed_out, record_decision(approved())), Ok(vec![]));
        let released = with(&timed_out, TransactionEvent::ReleaseCompleted { at: at(4) });
        assert_eq!(when(&released, record_decision(approved())), Ok(vec![]));
        assert_eq!(
            when(&confirmed_transfer(), record_decision(fraud_rejected())),
            Ok(vec![])
        );
    }

    #[test]
    fn recording_the_reservation_twice_is_a_no_op_and_after_a_rejection_is_illegal() {
        // A redelivered reservation appends nothing; reserving after the outcome is refused.
        assert_eq!(
            when(&[created(transfer()), reserved()], record_reservation()),
            Ok(vec![])
        );
        assert_eq!(
            when(&confirmed_transfer(), record_reservation()),
            Ok(vec![])
        );
        let rejected_unreserved = [
            created(transfer()),
            rejected(RejectionReason::FraudSuspected),
        ];
        assert_eq!(
            when(&rejected_unreserved, record_reservation()),
            Err(illegal("RecordReservation", "rejected"))
        );
        assert_eq!(
            when(&[], record_reservation()),
            Err(TransactionError::NotCreated)
        );
    }

    #[test]
    fn settlement_completes_only_a_confirmed_transaction_once() {
        // CompleteSettlement follows a confirmation, once; anywhere else it is illegal.
        assert_eq!(
            when(&confirmed_transfer(), complete_settlement()),
            Ok(vec![TransactionEvent::SettlementCompleted { at: now() }])
        );
        let settled = with(
            &confirmed_transfer(),
            TransactionEvent::SettlementCompleted { at: at(4) },
        );
        assert_eq!(when(&settled, complete_settlement()), Ok(vec![]));
        let transaction = given(&settled).expect("created");
        assert!(transaction.completed);
        assert_eq!(transaction.status(), TransactionStatus::Confirmed);
        assert_eq!(
            when(&[created(transfer())], complete_settlement()),
            Err(illegal("CompleteSettlement", "pending"))
        );
        let rejected_transfer = [
            created(transfer()),
            rejected(RejectionReason::FraudSuspected),
        ];
        assert_eq!(
            when(&rejected_transfer, complete_settlement()),
            Err(illegal("CompleteSettlement", "rejected"))
        );
        assert_eq!(
            when(&settled, complete_release()),
            Err(illegal("CompleteRelease", "settled"))
        );
    }

    #[test]
    fn release_completes_only_a_rejected_transaction_once() {
        // CompleteRelease follows a rejection, once; anywhere else it is illegal.
        let rejected_transfer = [
            created(transfer()),
            rejected(RejectionReason::FraudSuspected),
        ];
        assert_eq!(
            when(&rejected_transfer, complete_release()),
            Ok(vec![TransactionEvent::ReleaseCompleted { at: now() }])
        );
        let released = with(
            &rejected_transfer,
            TransactionEvent::ReleaseCompleted { at: at(4) },
        );
        assert_eq!(when(&released, complete_release()), Ok(vec![]));
        assert!(given(&released).expect("created").completed);
        assert_eq!(
            when(&[created(transfer())], complete_release()),
            Err(illegal("CompleteRelease", "pending"))
        );
        assert_eq!(
            when(&confirmed_transfer(), complete_release()),
            Err(illegal("CompleteRelease", "confirmed"))
        );
        assert_eq!(
            when(&released, complete_settlement()),
            Err(illegal("CompleteSettlement", "released"))
        );
    }

    #[test]
    fn legs_sum_to_zero_and_name_the_world_account_for_deposits_and_withdrawals() {
        // A deposit debits the world account, a withdrawal credits it, a transfer never names it.
        let legs_of =
            |request: TransactionRequest| given(&[created(request)]).expect("created").legs();
        let world = AccountId::world(usd());
        assert_eq!(legs_of(transfer()), transfer_legs());
        assert_eq!(
            legs_of(deposit()),
            vec![
                Leg {
                    account_id: world,
                    amount_minor: -12_550,
                    currency: usd(),
                },
                Leg {
                    account_id: DESTINATION,
                    amount_minor: 12_550,
                    currency: usd(),
                },
            ]
        );
        assert_eq!(
            legs_of(withdrawal()),
            vec![
                Leg {
                    account_id: SOURCE,
                    amount_minor: -12_550,
                    currency: usd(),
                },
                Leg {
                    account_id: world,
                    amount_minor: 12_550,
                    currency: usd(),
                },
            ]
        );
        for request in [transfer(), deposit(), withdrawal()] {
            let legs = legs_of(request);
            assert_eq!(legs.iter().map(|leg| leg.amount_minor).sum::<i64>(), 0);
        }
        // The world account is the currency's own: a EUR deposit never debits the USD one.
        let mut euro_deposit = deposit();
        euro_deposit.currency = eur();
        assert_eq!(legs_of(euro_deposit)[0].account_id, AccountId::world(eur()));
    }

    /// Applies `event` after `given` and returns the violation.
    fn violation(
        given: &[TransactionEvent],
        event: &TransactionEvent,
    ) -> TransactionInvariantViolation {
        Transaction::apply(self::given(given), event)
            .expect_err("the stored sequence is impossible")
    }

    #[test]
    fn apply_reports_impossible_stored_sequences() {
        // Every ordering the state machine forbids is reported when folding stored events.
        let pending = [created(transfer())];
        let settled = TransactionEvent::SettlementCompleted { at: at(4) };
        let released = TransactionEvent::ReleaseCompleted { at: at(4) };
        let rejected_transfer = [
            created(transfer()),
            rejected(RejectionReason::FraudSuspected),
        ];
        let unbalanced = TransactionEvent::TransactionConfirmed {
            legs: vec![transfer_legs()[0], transfer_legs()[0]],
            at: at(3),
        };
        let cases: Vec<(Vec<TransactionEvent>, TransactionEvent, &str)> = vec![
            (vec![], reserved(), "the transaction was never created"),
            (
                pending.to_vec(),
                created(transfer()),
                "the transaction already exists",
            ),
            (
                with(&pending, reserved()),
                reserved(),
                "funds reserved twice or after the outcome",
            ),
            (
                rejected_transfer.to_vec(),
                reserved(),
                "funds reserved twice or after the outcome",
            ),
            (
                with(&pending, checked(approved())),
                checked(approved()),
                "a second fraud decision",
            ),
            (
                with(&pending, reserved()),
                confirmed(),
                "confirmed without reservation and approval",
            ),
            (
                with(&pending, checked(approved())),
                confirmed(),
                "confirmed without reservation and approval",
            ),
            (
                vec![created(transfer()), reserved(), checked(fraud_rejected())],
                confirmed(),
                "confirmed without reservation and approval",
            ),
            (
                confirmed_transfer(),
                confirmed(),
                "confirmed without reservation and approval",
            ),
            (
                vec![created(transfer()), reserved(), checked(approved())],
                unbalanced,
                "the legs do not sum to zero",
            ),
            (
                confirmed_transfer(),
                rejected(RejectionReason::FraudCheckTimeout),
                "rejected after the outcome",
            ),
            (
                pending.to_vec(),
                settled.clone(),
                "settled without confirmation, or twice",
            ),
            (
                rejected_transfer.to_vec(),
                settled.clone(),
                "settled without confirmation, or twice",
            ),
            (
                with(&confirmed_transfer(), settled.clone()),
                settled,
                "settled without confirmation, or twice",
            ),
            (
                pending.to_vec(),
                released.clone(),
                "released without rejection, or twice",
            ),
            (
                confirmed_transfer(),
                released.clone(),
                "released without rejection, or twice",
            ),
            (
                with(&rejected_transfer, released.clone()),
                released,
                "released without rejection, or twice",
            ),
        ];
        for (given, event, problem) in cases {
            let found = violation(&given, &event);
            assert_eq!(
                found,
                TransactionInvariantViolation {
                    event_type: event.event_type(),
                    problem,
                },
                "{event:?} after {given:?}"
            );
        }
    }

    #[test]
    fn every_event_survives_a_json_round_trip() {
        // Transaction events are a stored format: what is written reads back identically.
        let events = vec![
            created(transfer()),
            created(deposit()),
            created(withdrawal()),
            reserved(),
            checked(approved()),
            checked(fraud_rejected()),
            confirmed(),
            rejected(RejectionReason::InsufficientFunds),
            rejected(RejectionReason::BalanceLimitExceeded),
            TransactionEvent::SettlementCompleted { at: at(4) },
            TransactionEvent::ReleaseCompleted { at: at(4) },
        ];
        let mut types: Vec<&str> = events.iter().map(TransactionEvent::event_type).collect();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), 7, "every event type is covered");
        for event in &events {
            let json = serde_json::to_string(event).expect("a transaction event serialises");
            let back: TransactionEvent = serde_json::from_str(&json).expect("and deserialises");
            assert_eq!(&back, event, "through {json}");
        }
    }

    #[test]
    fn a_stored_fraud_check_reads_and_writes_as_it_always_did() {
        // The decision's inputs are shared in memory (`Arc`), not in the stored format: the JSON
        // written before that change reads back, and the same JSON is written now.
        let stored = r#"{"FraudChecked":{"decision":{"outcome":"rejected","rule":"amount_threshold","details":{"threshold_minor":1000000}},"at":"2023-11-14T22:13:22Z"}}"#;
        let event: TransactionEvent = serde_json::from_str(stored).expect("reads");
        assert_eq!(event, checked(fraud_rejected()));
        assert_eq!(serde_json::to_string(&event).expect("writes"), stored);
        let without: TransactionEvent = serde_json::from_str(
            r#"{"FraudChecked":{"decision":{"outcome":"approved","rule":null},"at":"2023-11-14T22:13:21Z"}}"#,
        )
        .expect("details default to null");
        let TransactionEvent::FraudChecked { decision, .. } = without else {
            panic!("a fraud check");
        };
        assert_eq!(*decision.details, serde_json::Value::Null);
    }

    #[test]
    fn the_stored_created_event_keeps_the_amount_as_integer_minor_units() {
        // The stored JSON names the amount `amount_minor` and writes it as an integer, never a
        // float or a decimal string.
        let value = serde_json::to_value(created(transfer())).expect("serialises");
        let request = &value["TransactionCreated"]["request"];
        assert!(request["amount_minor"].is_i64(), "amount_minor in {value}");
        assert_eq!(request["amount_minor"].as_i64(), Some(12_550));
        assert!(
            request.get("amount").is_none(),
            "no field named plain `amount` in {value}"
        );
        assert_eq!(request["currency"], json!("USD"));
        assert_eq!(request["kind"], json!("transfer"));
        assert_eq!(request["source_account_id"], json!(SOURCE.to_string()));
        assert_eq!(
            value["TransactionCreated"]["request_fingerprint"],
            json!(transfer().fingerprint())
        );
        // A stored amount that is not a valid Amount does not read back.
        let mut broken = value.clone();
        broken["TransactionCreated"]["request"]["amount_minor"] = json!(0);
        assert!(serde_json::from_value::<TransactionEvent>(broken).is_err());
        let mut float = value;
        float["TransactionCreated"]["request"]["amount_minor"] = json!(125.5);
        assert!(serde_json::from_value::<TransactionEvent>(float).is_err());
    }

    #[test]
    fn stable_strings_match_their_serialised_form() {
        // The reason, status and kind strings of the API are exactly what serde stores.
        for reason in [
            RejectionReason::InsufficientFunds,
            RejectionReason::FraudSuspected,
            RejectionReason::FraudCheckTimeout,
            RejectionReason::BalanceLimitExceeded,
        ] {
            assert_eq!(
                serde_json::to_value(reason).expect("serialises"),
                json!(reason.as_str())
            );
        }
        for status in [
            TransactionStatus::Pending,
            TransactionStatus::Confirmed,
            TransactionStatus::Rejected,
        ] {
            assert_eq!(
                serde_json::to_value(status).expect("serialises"),
                json!(status.as_str())
            );
        }
        for kind in [
            TransactionKind::Deposit,
            TransactionKind::Withdrawal,
            TransactionKind::Transfer,
        ] {
            assert_eq!(
                serde_json::to_value(kind).expect("serialises"),
                json!(kind.as_str())
            );
        }
        assert_eq!(
            RejectionReason::FraudCheckTimeout.as_str(),
            "fraud_check_timeout"
        );
    }
}
