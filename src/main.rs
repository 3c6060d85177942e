use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // First, while this is the only thread: it sets environment variables.
    docusearch_agent::embed::device::set_cpu_thread_env();
    let cli = docusearch_agent::cli::Cli::parse();
    docusearch_agent::cli::run(cli)
}
