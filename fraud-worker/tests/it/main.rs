//! The fraud worker's integration tests: the real worker against the real RabbitMQ and Redis
//! (`TEST_AMQP_URL`, `TEST_REDIS_URL`, defaulting to the local ones). Each test has its own
//! topology prefix and Redis key prefix and deletes both at the end.

mod counters;
mod decisions;
mod embedded;
mod http;
mod lifecycle;
mod poison;
mod resilience;
mod velocity;

use std::time::Duration;

/// How long a test waits for the worker to do something that normally takes milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);
