//! The read path: two-stage search (Chroma on the mean vector, then exact MaxSim) and `repair`.

pub mod maxsim;

use std::process::ExitCode;

use crate::cli::{Context, RepairArgs, SearchArgs};

pub fn search_command(_ctx: &Context, _args: SearchArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("search", 8)
}

pub fn repair_command(_ctx: &Context, _args: RepairArgs) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("repair", 8)
}
