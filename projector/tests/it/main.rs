//! The projector's integration tests: command-api (with its saga, relay and decision consumer)
//! and the projector on one scratch database per test, against real PostgreSQL, RabbitMQ and
//! Redis, each test with its own AMQP prefix and Redis key prefix.

mod cache;
mod queries;
mod read_models;
mod rebuild;
mod runner;
mod support;
mod verify;
