//! `embed` and `model fetch`.

use std::process::ExitCode;

use crate::cli::{Context, EmbedArgs};

pub fn embed_command(_ctx: &Context, _args: EmbedArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("embed", 3)
}

pub fn fetch_command(
    _ctx: &Context,
    _model: Option<String>,
    _revision: Option<String>,
) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("model fetch", 3)
}
