#[global_allocator]
static ALLOCATOR: controller::Allocator = controller::Allocator;

/// jemalloc's options, read when it starts (its `malloc_conf`):
///
/// - an arena per CPU rather than four, which took 0.7 to 1 MiB off the
///   idle controller with the same throughput (docs/benchmarks.md,
///   nineteenth pass);
/// - freed pages given back to the system by a background thread within
///   about a second: jemalloc otherwise purges only while it allocates, so
///   an idle controller kept what start-up, registrations or the last burst
///   had freed (about 1.3 MB at idle, 3 MB after a cached load at c32;
///   the same CPU per cached hit at c32, twenty-seventh pass).
///
/// `_RJEM_MALLOC_CONF` in the environment still adds to them.
// Unsafe only in that it names a symbol: jemalloc declares this one weak
// for the program to define, and nothing else defines it.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_OPTIONS: &[u8; 63] = b"percpu_arena:percpu,background_thread:true,dirty_decay_ms:1000\0";

fn main() -> std::process::ExitCode {
    controller::cli::main()
}
