//! `sqlx::migrate!` embeds the migrations at compile time, but on stable Rust it cannot tell
//! cargo to look at the directory again: a new migration file would not be in the next build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
