//! Installing the agent as a launchd agent (macOS) or a systemd user unit (Linux).

use std::process::ExitCode;

use crate::cli::{Context, ServiceCommand};

pub fn service_command(_ctx: &Context, _cmd: ServiceCommand) -> anyhow::Result<ExitCode> {
    crate::cli::not_implemented("service", 7)
}
