//! The `lookalike` command-line tool: add images, query, inspect and remove.

mod cli;

// mimalloc instead of the system allocator: training allocates and frees megabyte-sized
// tensors at a high rate, and glibc's malloc hands them back to the kernel only to fault them
// in again (docs/benchmarks.md, "Allocator"). A library cannot choose the process's
// allocator; applications that train should link one too (docs/training.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
