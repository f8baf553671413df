//! Identifiers of the model. Each is a UUID newtype so that an account id can never be passed
//! where a transaction id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Currency;

/// Namespace of the ids the ledger derives (transaction ids from idempotency keys, world
/// accounts from currencies). Fixed forever: changing it would change every derived id.
const LEDGER_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_4000_8000_6e61_6d65_7370);

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

uuid_newtype!(
    /// An account: a customer account (with a stream of its own) or a currency's world account.
    AccountId
);
uuid_newtype!(
    /// A transaction, derived from the caller and its idempotency key.
    TransactionId
);
uuid_newtype!(
    /// A customer (the JWT `sub`); the owner of accounts.
    CustomerId
);

impl AccountId {
    /// The external *world* account of a currency: deposits debit it, withdrawals credit it.
    /// It has no stream (it must never serialise deposits); its balance is a projection.
    pub fn world(currency: Currency) -> AccountId {
        AccountId(Uuid::new_v5(
            &LEDGER_NAMESPACE,
            format!("world-account/{}", currency.code()).as_bytes(),
        ))
    }

    /// Whether this id is the world account of some currency.
    pub fn is_world(self) -> bool {
        Currency::all().any(|currency| AccountId::world(currency) == self)
    }
}

impl TransactionId {
    /// The transaction id of a caller's request: the same caller with the same idempotency key
    /// always names the same transaction, so the transaction stream's first event is the lock
    /// that makes a retried request a replay. The separator cannot appear in a UUID, so two
    /// different (caller, key) pairs never share an input.
    pub fn from_idempotency_key(caller: CustomerId, idempotency_key: &str) -> TransactionId {
        let name = format!("transaction/{}/{idempotency_key}", caller.0);
        TransactionId(Uuid::new_v5(&LEDGER_NAMESPACE, name.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_ids_depend_on_caller_and_key() {
        let alice = CustomerId(Uuid::from_u128(1));
        let bob = CustomerId(Uuid::from_u128(2));
        let first = TransactionId::from_idempotency_key(alice, "key-1");
        assert_eq!(first, TransactionId::from_idempotency_key(alice, "key-1"));
        assert_ne!(first, TransactionId::from_idempotency_key(alice, "key-2"));
        assert_ne!(first, TransactionId::from_idempotency_key(bob, "key-1"));
    }

    #[test]
    fn each_currency_has_its_own_world_account() {
        let usd = Currency::from_code("USD").expect("known");
        let eur = Currency::from_code("EUR").expect("known");
        assert_ne!(AccountId::world(usd), AccountId::world(eur));
        assert!(AccountId::world(usd).is_world());
        assert!(!AccountId(Uuid::from_u128(7)).is_world());
    }
}
