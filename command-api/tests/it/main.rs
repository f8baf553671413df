//! command-api's integration tests: the real router, saga and event store against a real
//! PostgreSQL, one scratch database per test.

mod api;
mod end_to_end;
mod eventlog;
mod messaging;
mod process;
mod saga;
mod state;
mod store;
mod support;
