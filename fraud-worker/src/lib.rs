//! fraud-worker: the ledger's fraud checks (SPEC §2, §4).
//!
//! It consumes `transaction.created` from RabbitMQ, evaluates the rules ([`rules`]: a per-currency
//! amount threshold and a per-account velocity limit counted in Redis (or SQLite, embedded)), and publishes a
//! decision carrying the rule that fired and the inputs it saw. It never touches the event
//! store: command-api turns the decision into `FraudChecked`. `main.rs` only wires
//! [`startup::App`] up; tests reuse everything here.

pub mod config;
pub mod error;
pub mod evaluator;
pub mod handler;
pub mod http;
pub mod messages;
pub mod rules;
pub mod startup;
#[cfg(feature = "testing")]
pub mod testing;
pub mod velocity;

pub use error::{Error, Result};
