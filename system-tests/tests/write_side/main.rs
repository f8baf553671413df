//! command-api's write side with the other services' code beside it, in process: the saga's
//! scenarios and the decision consumer, each log audited over SPEC §8 and rebuilt and verified
//! by the projector's jobs; and the whole write path with the fraud worker (in process, and as
//! the real binaries SIGKILLed mid-traffic). One scratch database per test, against a real
//! PostgreSQL, RabbitMQ and Redis. Moved here from command-api's tests so that no service crate
//! dev-depends on another.

mod decisions;
mod end_to_end;
mod saga;
mod support;
