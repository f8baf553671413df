//! The cqrs-es aggregates: thin adapters over `domain`. `handle` asks the domain to decide and
//! writes its events to the sink; `apply` folds with the domain. No rule lives here.
//!
//! Events are wrapped in newtypes only because cqrs-es's `DomainEvent` cannot be implemented for
//! the domain's types from this crate; what is stored is the domain event itself, through
//! `infra::codec`.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use domain::{
    Account, AccountCommand, AccountError, AccountEvent, Transaction, TransactionCommand,
    TransactionError, TransactionEvent,
};
use infra::codec::EVENT_VERSION;
use serde::{Deserialize, Serialize};

use crate::store::StreamAggregate;

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

impl StreamAggregate for AccountAggregate {
    const STATE_VERSION: i32 = 1;
    type Stored = AccountEvent;
    fn stored(event: &AccountEventRecord) -> &AccountEvent {
        &event.0
    }
    fn record(event: AccountEvent) -> AccountEventRecord {
        AccountEventRecord(event)
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

impl StreamAggregate for TransactionAggregate {
    const STATE_VERSION: i32 = 1;
    type Stored = TransactionEvent;
    fn stored(event: &TransactionEventRecord) -> &TransactionEvent {
        &event.0
    }
    fn record(event: TransactionEvent) -> TransactionEventRecord {
        TransactionEventRecord(event)
    }
}
