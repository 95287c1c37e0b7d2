//! `fnrt-runtime-rust --socket PATH`: see the library's documentation.

fn main() -> std::process::ExitCode {
    fnrt_runtime_rust::main_with_args(std::env::args().skip(1))
}
