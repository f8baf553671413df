//! The cqrs-es aggregates: thin adapters over `domain`. `handle` asks the domain to decide and
//! writes its events to the sink; `apply` folds with the domain. No rule lives here.
//!
//! Events are wrapped in newtypes only because cqrs-es's `DomainEvent` cannot be implemented for
//! the domain's types from this crate; the wrappers are `serde(transparent)`, so the stored JSON
//! is exactly the domain event.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::{
    Account, AccountCommand, AccountError, AccountEvent, Transaction, TransactionCommand,
    TransactionError, TransactionEvent,
};
use serde::{Deserialize, Serialize};

/// The version of every event payload format written today. A future change of an event's
/// meaning gets a new version and an upcaster; stored events are never rewritten.
pub const EVENT_VERSION: &str = "1";

/// A customer account stream. `None` until `AccountOpened`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountAggregate(pub Option<Account>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountEventRecord(pub AccountEvent);

impl DomainEvent for AccountEventRecord {
    fn event_type(&self) -> String {
        self.0.event_type().to_owned()
    }
    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}

impl Aggregate for AccountAggregate {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEventRecord;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in Account::decide(self.0.as_ref(), &command)? {
            sink.write(AccountEventRecord(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        // A stored event that cannot follow the state means the store holds something the
        // domain never decides: a bug or tampering. `ledger verify` reports such data; the write
        // side must not act on it.
        let next = Account::apply(self.0.take(), &event.0)
            .unwrap_or_else(|violation| panic!("account stream is corrupt: {violation}"));
        self.0 = Some(next);
    }
}

/// A transaction stream. `None` until `TransactionCreated`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransactionAggregate(pub Option<Transaction>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransactionEventRecord(pub TransactionEvent);

impl DomainEvent for TransactionEventRecord {
    fn event_type(&self) -> String {
        self.0.event_type().to_owned()
    }
    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}

impl Aggregate for TransactionAggregate {
    const TYPE: &'static str = "transaction";
    type Command = TransactionCommand;
    type Event = TransactionEventRecord;
    type Error = TransactionError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in Transaction::decide(self.0.as_ref(), &command)? {
            sink.write(TransactionEventRecord(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let next = Transaction::apply(self.0.take(), &event.0)
            .unwrap_or_else(|violation| panic!("transaction stream is corrupt: {violation}"));
        self.0 = Some(next);
    }
}
