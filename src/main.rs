use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = docusearch_agent::cli::Cli::parse();
    // Before anything else, while this is the only thread: it sets environment variables.
    if cli.command.runs_the_model() {
        docusearch_agent::embed::device::set_cpu_thread_env();
    }
    docusearch_agent::cli::run(cli)
}
