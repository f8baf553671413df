//! The `projector` binary is a placeholder in the workspace shape of the design card:
//! the read side (read models, Redis cache, query API) arrives with issue #4.
//! It refuses to run rather than pretend to serve anything.

fn main() -> std::process::ExitCode {
    eprintln!(
        "projector: not built yet: the read side (read models, Redis cache, query API) arrives with issue #4"
    );
    std::process::ExitCode::from(2)
}
