//! The `lookalike` command-line tool: add images, query, inspect and remove.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
