//! `doctor`: one line per check, ✔ or ✘ with the fix.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::Context;
use crate::config::ConfigError;

pub fn run(_ctx: &Context) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("doctor", 2)
}

pub fn run_with_config_error(path: Option<&Path>, error: &ConfigError) -> ExitCode {
    let _ = path;
    println!("✘ configuration: {error}");
    ExitCode::FAILURE
}
