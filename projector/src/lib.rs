//! projector: the ledger's read side (SPEC §2, §5, §7).
//!
//! Follows command-api's event log in commit order and keeps three projections in its own
//! schema — `accounts`, `transactions`, `account_history` — each with its own checkpoint moved
//! in the same transaction as its rows, and one active runner across instances. Serves every
//! GET of the public API from them, with a Redis cache in front of single transactions. The
//! `ledger` CLI uses [`rebuild`] and [`verify`] from here.

pub mod cache;
pub mod config;
pub mod error;
pub mod generations;
pub mod http;
pub mod model;
pub mod rebuild;
pub mod runner;
pub mod startup;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod verify;

pub use error::{Error, Result};
