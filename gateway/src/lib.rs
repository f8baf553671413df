//! gateway: the ledger's edge (SPEC §2, §5).
//!
//! Identity in its own schema (register, tokens, roles; [`identity`], [`passwords`]), failed
//! login limits ([`limiter`]), and the reverse proxy ([`proxy`]) that forwards every other
//! request by the configured routing table ([`routes`]) once the token and the table's roles
//! are checked at the edge. The services behind verify tokens themselves as well. `main.rs`
//! only wires [`startup::App`] up; tests and the benchmark reuse everything here.

pub mod clients;
pub mod config;
pub mod error;
pub mod http;
pub mod identity;
pub mod limiter;
pub mod passwords;
pub mod proxy;
pub mod routes;
pub mod startup;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};
