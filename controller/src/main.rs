#[global_allocator]
static ALLOCATOR: controller::Allocator = controller::Allocator;

fn main() -> std::process::ExitCode {
    controller::cli::main()
}
