//! The gateway's integration tests: the real router against a real PostgreSQL (one scratch
//! database per test), with a small echoing upstream where a test needs to see exactly what was
//! forwarded, or none. The tests with the real command-api, projector and fraud worker behind
//! the gateway are in `system-tests/tests/edge`.

mod edge;
mod health;
mod identities;
mod identity;
mod openapi;
mod proxy;
mod security;
mod support;
