//! The `gateway` binary is a placeholder in the workspace shape of the design card:
//! identity, RBAC and the reverse proxy arrive with issue #5.
//! It refuses to run rather than pretend to serve anything.

fn main() -> std::process::ExitCode {
    eprintln!("gateway: not built yet: identity, RBAC and the reverse proxy arrive with issue #5");
    std::process::ExitCode::from(2)
}
