//! No code: this crate holds the system tests in `tests/`, which start the real `gateway`,
//! `command-api`, `projector` and `fraud-worker` binaries (build them first:
//! `cargo build --workspace --bins`).
