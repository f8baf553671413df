//! The integration tests' helpers: the write side's harness, shared with `system-tests`.
//! (The saga's scenarios, audited over SPEC §8 with the projector's read models verified, are in
//! `system-tests/tests/write_side`.)

pub use command_api::testing::harness::*;
