//! The `docusearch-agent` program: parses the command line and runs the command (the command
//! layer in `cmd/`; everything else is the `docusearch_agent` library).

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    // Before anything else, while this is the only thread: it sets environment variables.
    if cli.command.runs_the_model() {
        docusearch_agent::embed::device::set_cpu_thread_env();
    }
    cmd::run(cli)
}
