//! The gateway's integration tests: the real router against a real PostgreSQL (one scratch
//! database per test), with real upstreams started in-process (command-api, the fraud worker)
//! or a small echoing upstream where a test needs to see exactly what was forwarded.

mod edge;
mod health;
mod identities;
mod identity;
mod openapi;
mod proxy;
mod security;
mod support;
