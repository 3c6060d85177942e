//! The long-running agent and the one-shot `index`: watch → state → extract → embed → sync.

pub mod changes;
pub mod pipeline;
pub mod runtime;
pub mod stages;
pub mod status;

use std::process::ExitCode;

use crate::cli::{Context, IndexArgs, RunArgs, StatusArgs};

pub fn run_command(_ctx: &Context, _args: RunArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("run", 6)
}

pub fn index_command(_ctx: &Context, _args: IndexArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("index", 6)
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
