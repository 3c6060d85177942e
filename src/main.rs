use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = docusearch_agent::cli::Cli::parse();
    docusearch_agent::cli::run(cli)
}
