//! command-api: the ledger's write side (SPEC §2, §4, §5).
//!
//! HTTP commands append events to the event store (cqrs-es + postgres-es on PostgreSQL, in the
//! `command_api` schema); the saga follows the committed log and carries every transaction to
//! its end; fraud decisions enter through [`decisions::FraudDecisions`]. `main.rs` only wires
//! [`startup::App`] up; tests and benchmarks reuse everything here.

pub mod aggregates;
pub mod checkpoints;
pub mod config;
pub mod decision_consumer;
pub mod decisions;
pub mod error;
pub mod http;
pub mod metadata;
pub mod relay;
pub mod replay;
pub mod saga;
pub mod startup;
pub mod state;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod views;

pub use error::{Error, Result};
