//! `service install | uninstall | status`: the plan is built by the library
//! (`docusearch_agent::service`), printed here, and carried out step by step.

use std::process::ExitCode;
use std::time::Duration;

use docusearch_agent::service::*;

use super::{client_runtime, Context, ServiceCommand};

pub fn service_command(ctx: &Context, cmd: ServiceCommand) -> anyhow::Result<ExitCode> {
    let platform = Platform::current()?;
    match cmd {
        ServiceCommand::Install { dry_run } => install(ctx, platform, dry_run),
        ServiceCommand::Uninstall { dry_run } => uninstall(platform, dry_run),
        ServiceCommand::Status => status(ctx, platform),
    }
}

fn install(ctx: &Context, platform: Platform, dry_run: bool) -> anyhow::Result<ExitCode> {
    let (spec, write_config) = spec_for(&ctx.config, ctx.config_path.as_deref())?;
    let plan = install_plan(
        platform,
        &spec,
        &platform.service_file()?,
        write_config,
        current_uid(),
    )?;
    if dry_run {
        print_install_plan(&plan, &spec);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &plan.write_default_config {
        // Never overwrite: it may have appeared since we looked.
        if !path.exists() {
            write_file(path, DEFAULT_CONFIG_TOML)?;
            println!("Wrote the default configuration to {}", path.display());
            println!("  Add folders to watch under [watch] folders = [...] there.");
        }
    }
    for dir in &plan.create_dirs {
        std::fs::create_dir_all(dir).map_err(|source| ServiceError::Write {
            path: dir.clone(),
            source,
        })?;
    }
    write_file(&plan.service_file, &plan.contents)?;
    println!("Wrote {}", plan.service_file.display());
    for (k, _) in &spec.env {
        println!("  carried {k} from this shell into the service environment");
    }
    for step in &plan.steps {
        println!("$ {step}");
        if let Err(why) = run_step(step) {
            if step.may_fail {
                continue;
            }
            eprintln!("error: `{step}` failed: {why}");
            match plan.platform {
                Platform::Launchd => {
                    eprintln!("The agent file is in place. Load it by hand with:");
                }
                Platform::Systemd => {
                    eprintln!(
                        "systemctl --user is not usable here (no user systemd instance or session bus?).\n\
                         The unit is written to {}; in a login session run:\n  \
                         systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT}\n\
                         For a service that outlives your login: loginctl enable-linger \"$USER\".\n\
                         Or run the agent directly:",
                        plan.service_file.display()
                    );
                }
            }
            for f in &plan.fallback {
                eprintln!("  {f}");
            }
            return Ok(ExitCode::FAILURE);
        }
    }
    println!("Installed and started {}.", service_name(platform));
    println!("  Check it with: docusearch-agent service status");
    Ok(ExitCode::SUCCESS)
}

fn service_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Launchd => LAUNCHD_LABEL,
        Platform::Systemd => SYSTEMD_UNIT,
    }
}

fn print_install_plan(plan: &InstallPlan, spec: &ServiceSpec) {
    println!("Dry run: nothing is written and nothing is run.");
    if let Some(path) = &plan.write_default_config {
        println!(
            "Would write the default configuration (config.example.toml) to {}",
            path.display()
        );
    }
    for dir in &plan.create_dirs {
        println!("Would create the folder {}", dir.display());
    }
    for (k, _) in &spec.env {
        println!("Would carry {k} from this shell into the service environment");
    }
    println!("Would write {}:", plan.service_file.display());
    println!("{}", plan.contents.trim_end());
    println!("Would run:");
    for step in &plan.steps {
        println!("  {step}");
    }
    println!("If that fails, by hand:");
    for step in &plan.fallback {
        println!("  {step}");
    }
}

fn uninstall(platform: Platform, dry_run: bool) -> anyhow::Result<ExitCode> {
    let plan = uninstall_plan(platform, &platform.service_file()?, current_uid());
    if dry_run {
        println!("Dry run: nothing is removed and nothing is run.");
        println!("Would run:");
        for step in &plan.stop_steps {
            println!("  {step}");
        }
        println!("Would remove {}", plan.service_file.display());
        for step in &plan.after_steps {
            println!("  {step}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !plan.service_file.exists() {
        println!(
            "{} is not installed ({} does not exist); nothing to do.",
            service_name(platform),
            plan.service_file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for step in &plan.stop_steps {
        println!("$ {step}");
        if let Err(why) = run_step(step) {
            if !step.may_fail {
                eprintln!("error: `{step}` failed: {why}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    std::fs::remove_file(&plan.service_file).map_err(|source| ServiceError::Remove {
        path: plan.service_file.clone(),
        source,
    })?;
    println!("Removed {}", plan.service_file.display());
    for step in &plan.after_steps {
        println!("$ {step}");
        if let Err(why) = run_step(step) {
            eprintln!("warning: `{step}` failed: {why}");
        }
    }
    println!("The configuration and the index are kept.");
    Ok(ExitCode::SUCCESS)
}

/// Exit status of `service status` when the service is not installed or not running (LSB).
pub const EXIT_NOT_RUNNING: u8 = 3;

fn status(ctx: &Context, platform: Platform) -> anyhow::Result<ExitCode> {
    let file = platform.service_file()?;
    let installed = file.is_file();
    println!(
        "service file: {} ({})",
        file.display(),
        if installed {
            "installed"
        } else {
            "not installed"
        }
    );
    let running = match platform {
        Platform::Launchd => {
            let (_, service) = launchd_target(current_uid());
            match capture("launchctl", ["print", service.as_str()]) {
                Ok(text) => {
                    let field = |name: &str| {
                        text.lines()
                            .map(str::trim)
                            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                    };
                    let state = field("state = ").unwrap_or_else(|| "unknown".into());
                    println!("launchd: {service} is loaded, state {state}");
                    if let Some(pid) = field("pid = ") {
                        println!("  pid {pid}");
                    }
                    if let Some(code) = field("last exit code = ") {
                        println!("  last exit code {code}");
                    }
                    state == "running"
                }
                Err(_) => {
                    println!("launchd: {service} is not loaded");
                    false
                }
            }
        }
        Platform::Systemd => {
            // is-active prints the state and exits non-zero unless active.
            let active = capture_any("systemctl", ["--user", "is-active", SYSTEMD_UNIT]);
            let enabled = capture_any("systemctl", ["--user", "is-enabled", SYSTEMD_UNIT]);
            match (active, enabled) {
                (Ok(a), Ok(e)) => {
                    println!("systemd: {SYSTEMD_UNIT} is {} and {}", a.trim(), e.trim());
                    a.trim() == "active"
                }
                (Err(why), _) | (_, Err(why)) => {
                    println!("systemd: cannot ask systemctl --user: {why}");
                    false
                }
            }
        }
    };
    let api = health_line(ctx);
    println!("status API: {api}");
    Ok(if installed && running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_RUNNING)
    })
}

/// What the running agent's `/health` says, as one line.
fn health_line(ctx: &Context) -> String {
    if !ctx.config.api.enabled {
        return "disabled in the configuration (api.enabled = false)".into();
    }
    let client =
        match docusearch_agent::api::ApiClient::new(&ctx.config.api, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        };
    let rt = match client_runtime() {
        Ok(rt) => rt,
        Err(e) => return docusearch_agent::errors::describe(e.as_ref()),
    };
    match rt.block_on(client.health()) {
        Ok(None) => format!("no agent answers at {}", client.base_url()),
        Ok(Some(h)) if h.is_healthy() => format!("healthy ({})", client.base_url()),
        Ok(Some(h)) => format!("degraded: {}", h.reasons.join("; ")),
        Err(e) => e.to_string(),
    }
}
