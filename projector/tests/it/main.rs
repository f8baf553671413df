//! The projector's integration tests: the conformance suites of its seams (the read models on
//! PostgreSQL and SQLite, the cache on Redis and in memory) and the embedded wiring on one SQLite
//! file. The tests that drive the projector with command-api's real write side are in
//! `system-tests/tests/read_side`.

mod cache;
mod read_models;
