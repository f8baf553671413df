//! The `fraud-worker` binary is a placeholder in the workspace shape of the design card:
//! the fraud rules and their RabbitMQ consumer arrive with issue #3.
//! It refuses to run rather than pretend to serve anything.

fn main() -> std::process::ExitCode {
    eprintln!(
        "fraud-worker: not built yet: the fraud rules and their RabbitMQ consumer arrive with issue #3"
    );
    std::process::ExitCode::from(2)
}
