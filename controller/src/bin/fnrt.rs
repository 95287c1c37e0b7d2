//! `fnrt`: the client CLI (`controller::client`).

fn main() -> std::process::ExitCode {
    controller::client::cli::main()
}
