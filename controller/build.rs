//! Rebuilds the controller when a migration changes: `sqlx::migrate!`
//! embeds `migrations/` at compile time, and a macro cannot tell cargo
//! which files it read.
//!
//! Links the binary with its relative relocations packed (DT_RELR: glibc
//! 2.36, binutils 2.38, both in Debian 12). A position-independent
//! executable otherwise carries one 24-byte entry per pointer to fix up at
//! start (about 83,000 here, 1.9 MiB), which the loader reads whole: pages
//! of the binary resident in every controller for nothing after start.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
