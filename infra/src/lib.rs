//! Shared plumbing of the ledger services. Nothing here decides about money: it is the database
//! (pools per schema, migrations, the commit-order log reader and its decoding into domain
//! events, leader locks), the HTTP edge
//! (problem+json, JSON bodies, correlation ids, request logs and metrics, JWT verification) and
//! telemetry. Each service crate builds on it; the domain never does.

pub mod amqp;
pub mod auth;
pub mod bus;
pub mod codec;
pub mod db;
pub mod error;
pub mod eventlog;
pub mod follow;
pub mod http;
pub mod leader;
pub mod log;
pub mod messages;
pub mod problem;
pub mod replay;
pub mod server;
pub mod sqlite;
pub mod tasks;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};
