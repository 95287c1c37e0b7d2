fn main() -> std::process::ExitCode {
    controller::cli::main()
}
