//! command-api's integration tests: the real router, saga and event store against a real
//! PostgreSQL, one scratch database per test. The tests that need another service (the fraud
//! worker end to end, the saga's scenarios whose logs the projector must verify) are in
//! `system-tests/tests/write_side`.

mod api;
mod eventlog;
mod messaging;
mod process;
mod state;
mod store;
mod support;
