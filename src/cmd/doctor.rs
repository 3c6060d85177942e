//! `doctor`: one line per check, ✔ or ✘, and for each ✘ the fix. Exit status 1 when any check
//! fails.

use std::path::Path;
use std::process::ExitCode;

use docusearch_agent::config::{Config, ConfigError};
use docusearch_agent::doctor::{run_checks, Check};

use super::Context;

fn print(c: &Check) {
    let mark = if c.ok { "✔" } else { "✘" };
    println!("{mark} {}: {}", c.name, c.detail);
    if let Some(fix) = &c.fix {
        println!("    fix: {fix}");
    }
}

pub fn run(ctx: &Context) -> anyhow::Result<ExitCode> {
    let source = match &ctx.config_path {
        Some(p) => format!("loaded from {}", p.display()),
        None => match docusearch_agent::config::default_config_path().filter(|p| p.is_file()) {
            Some(p) => format!("loaded from {}", p.display()),
            None => "no config file; using the defaults".to_string(),
        },
    };
    let mut checks = vec![Check::pass("configuration", source)];
    checks.extend(run_checks(&ctx.config));
    for c in &checks {
        print(c);
    }
    Ok(exit_code(&checks))
}

/// Doctor with a configuration that was refused: reports it, and the checks that do not need it.
pub fn run_with_config_error(path: Option<&Path>, error: &ConfigError) -> ExitCode {
    let where_ = path
        .map(|p| p.display().to_string())
        .or_else(|| {
            docusearch_agent::config::default_config_path().map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| "the config file".into());
    let mut checks = vec![Check::fail(
        "configuration",
        error.to_string(),
        format!("edit {where_}; every key and its default is in config.example.toml"),
    )];
    // The rest runs against the defaults so one bad key does not hide other problems.
    checks.extend(run_checks(&Config::default()));
    for c in &checks {
        print(c);
    }
    exit_code(&checks)
}

fn exit_code(checks: &[Check]) -> ExitCode {
    if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
