//! The projector fed by command-api's real write side (its saga, relay and decision consumer),
//! both in process on one scratch database per test, against real PostgreSQL, RabbitMQ and Redis,
//! each test with its own AMQP prefix and Redis key prefix: the queries, the cache, the runner,
//! rebuild and verify. Moved here from the projector's tests so that no service crate
//! dev-depends on another.

mod cache;
mod queries;
mod rebuild;
mod runner;
mod support;
mod verify;
