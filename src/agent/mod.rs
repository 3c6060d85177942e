//! The long-running agent and the one-shot `index`: watch → state → extract → embed → sync.

pub mod changes;
mod commands;
pub mod pipeline;
pub mod real;
mod report;
pub mod runtime;
pub mod stages;
pub mod status;

use std::process::ExitCode;

use crate::cli::{Context, IndexArgs, RunArgs, StatusArgs};

pub fn run_command(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    commands::run_command(ctx, args)
}

pub fn index_command(ctx: &Context, args: IndexArgs) -> anyhow::Result<ExitCode> {
    commands::index_command(ctx, args)
}

pub fn status_command(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(status::gather(&ctx.config, &ctx.config.store_dir()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render(&s));
    }
    Ok(ExitCode::SUCCESS)
}
