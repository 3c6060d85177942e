//! The long-running agent and the one-shot `index`: watch → state → extract → embed → sync.

pub mod changes;
pub mod pipeline;
pub mod stages;

use std::process::ExitCode;

use crate::cli::{Context, IndexArgs, RunArgs, StatusArgs};

pub fn run_command(_ctx: &Context, _args: RunArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("run", 6)
}

pub fn index_command(_ctx: &Context, _args: IndexArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("index", 6)
}

pub fn status_command(_ctx: &Context, _args: StatusArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("status", 6)
}
