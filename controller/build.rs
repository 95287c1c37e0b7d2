//! Rebuilds the controller when a migration changes: `sqlx::migrate!`
//! embeds `migrations/` at compile time, and a macro cannot tell cargo
//! which files it read.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
