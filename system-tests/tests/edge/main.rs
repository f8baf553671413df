//! The gateway in front of the real command-api, projector and fraud worker, all in process on
//! one scratch database per test, against real PostgreSQL, RabbitMQ and Redis. Moved here from
//! the gateway's tests so that no service crate dev-depends on another.

mod proxy;
mod support;
