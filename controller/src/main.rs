#[global_allocator]
static ALLOCATOR: controller::Allocator = controller::Allocator;

/// jemalloc's options, read when it starts (its `malloc_conf`): an arena
/// per CPU rather than four, which took 0.7 to 1 MiB off the idle
/// controller with the same throughput (docs/benchmarks.md, nineteenth
/// pass). `_RJEM_MALLOC_CONF` in the environment still adds to them.
// Unsafe only in that it names a symbol: jemalloc declares this one weak
// for the program to define, and nothing else defines it.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 20] = b"percpu_arena:percpu\0";

fn main() -> std::process::ExitCode {
    controller::cli::main()
}
