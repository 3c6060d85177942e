//! Installing the agent as a launchd agent (macOS) or a systemd user unit (Linux).
//!
//! The files are made by plain functions ([`launchd_plist`], [`systemd_unit`]) and the work by a
//! plan ([`install_plan`], [`uninstall_plan`]) of files and commands, so everything but running
//! `launchctl` itself can be checked on any platform, and `--dry-run` prints exactly what a real
//! run does.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// The launchd label, also the unified-log subsystem.
pub const LAUNCHD_LABEL: &str = "com.docusearch.agent";
/// The systemd user unit's name.
pub const SYSTEMD_UNIT: &str = "docusearch-agent.service";
/// launchd starts agents with a bare PATH; this one also finds Homebrew's tools (soffice,
/// chroma) on Apple silicon and Intel Macs.
pub const SERVICE_PATH: &str = "/opt/homebrew/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
/// The systemd unit's PATH: the usual places, and Homebrew on Linux.
pub const SYSTEMD_SERVICE_PATH: &str =
    "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin:/home/linuxbrew/.linuxbrew/bin";
/// Nice value of the service: indexing yields to what the user is doing.
pub const SERVICE_NICE: i64 = 10;
/// Seconds launchd waits before starting a crashed agent again.
pub const THROTTLE_INTERVAL_S: i64 = 30;
/// Seconds between SIGTERM and SIGKILL when the service is stopped.
pub const STOP_TIMEOUT_S: i64 = 15;
/// Exit status of a configuration error (EX_CONFIG): restarting does not fix it.
pub const EXIT_CONFIG: u8 = 78;
/// The default configuration written when `service install` finds none.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config.example.toml");

/// Environment variables carried from the installing shell into the service, so that settings
/// made that way keep working under launchd/systemd. Secrets (tokens) are never carried: the
/// service files are world-readable.
pub const CARRIED_ENV: &[&str] = &[
    "CHROMA_HOST",
    "CHROMA_PORT",
    "DEVICE",
    "MODEL_NAME",
    "BATCH_SIZE_VISUAL",
    "BATCH_SIZE_TEXT",
    "TEXT_CHUNK_SIZE",
    "TEXT_CHUNK_OVERLAP",
    "PAGE_RENDER_DPI",
    "PDFIUM_DYNAMIC_LIB_PATH",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "RUST_LOG",
];

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("services are supported on macOS (launchd) and Linux (systemd) only; run `docusearch-agent run` under your own supervisor instead")]
    UnsupportedPlatform,
    #[error("cannot find the home directory (is HOME set?), needed to place the service file")]
    NoHome,
    #[error("cannot find this program's own path: {0}")]
    CurrentExe(std::io::Error),
    #[error("the config file {path} cannot be resolved: {source}")]
    ConfigPath {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot render the launchd plist: {0}")]
    Plist(#[from] plist::Error),
    #[error("{what} ({value:?}) holds a control character that XML, and so a launchd plist, cannot carry — rename the path or unset the variable, then install again")]
    NotXml { what: String, value: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What a service definition needs: absolute paths only (launchd and systemd have no shell and
/// no useful working directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The `docusearch-agent` executable.
    pub exe: PathBuf,
    /// The configuration file passed with `--config`.
    pub config: PathBuf,
    /// The agent's state directory (its working directory, and where the fallback logs go).
    pub state_dir: PathBuf,
    /// Extra environment (see [`CARRIED_ENV`]); PATH is always set.
    pub env: Vec<(String, String)>,
}

impl ServiceSpec {
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    /// launchd's StandardOutPath: the agent logs to the unified log; this catches the rest.
    pub fn stdout_log(&self) -> PathBuf {
        self.log_dir().join("agent.out.log")
    }
    /// launchd's StandardErrorPath: panics and errors from before logging starts.
    pub fn stderr_log(&self) -> PathBuf {
        self.log_dir().join("agent.err.log")
    }
    fn program_arguments(&self) -> Vec<String> {
        vec![
            self.exe.display().to_string(),
            "run".into(),
            "--config".into(),
            self.config.display().to_string(),
        ]
    }
}

/// The launchd agent definition (see `launchd/com.docusearch.agent.plist` for each key's why).
pub fn launchd_plist(spec: &ServiceSpec) -> plist::Value {
    use plist::{Dictionary, Value};
    let mut d = Dictionary::new();
    d.insert("Label".into(), Value::String(LAUNCHD_LABEL.into()));
    d.insert(
        "ProgramArguments".into(),
        Value::Array(
            spec.program_arguments()
                .into_iter()
                .map(Value::String)
                .collect(),
        ),
    );
    d.insert("RunAtLoad".into(), Value::Boolean(true));
    let mut keep_alive = Dictionary::new();
    keep_alive.insert("SuccessfulExit".into(), Value::Boolean(false));
    d.insert("KeepAlive".into(), Value::Dictionary(keep_alive));
    d.insert("ProcessType".into(), Value::String("Background".into()));
    d.insert("LowPriorityIO".into(), Value::Boolean(true));
    d.insert("Nice".into(), Value::Integer(SERVICE_NICE.into()));
    d.insert(
        "ThrottleInterval".into(),
        Value::Integer(THROTTLE_INTERVAL_S.into()),
    );
    d.insert("ExitTimeOut".into(), Value::Integer(STOP_TIMEOUT_S.into()));
    d.insert(
        "WorkingDirectory".into(),
        Value::String(spec.state_dir.display().to_string()),
    );
    let mut env = Dictionary::new();
    env.insert("PATH".into(), Value::String(SERVICE_PATH.into()));
    for (k, v) in &spec.env {
        env.insert(k.clone(), Value::String(v.clone()));
    }
    d.insert("EnvironmentVariables".into(), Value::Dictionary(env));
    d.insert(
        "StandardOutPath".into(),
        Value::String(spec.stdout_log().display().to_string()),
    );
    d.insert(
        "StandardErrorPath".into(),
        Value::String(spec.stderr_log().display().to_string()),
    );
    Value::Dictionary(d)
}

/// [`launchd_plist`] as XML text. Refuses a value XML 1.0 cannot carry (most control
/// characters have no escape), which would make a plist launchd does not read.
pub fn launchd_plist_xml(spec: &ServiceSpec) -> Result<String, ServiceError> {
    let is_xml_char = |c: char| matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..);
    let paths = [
        ("the executable path", &spec.exe),
        ("the config file path", &spec.config),
        ("the state directory", &spec.state_dir),
    ];
    let values = paths
        .iter()
        .map(|(what, p)| (what.to_string(), p.display().to_string()))
        .chain(
            spec.env
                .iter()
                .map(|(k, v)| (format!("the environment variable {k}"), v.clone())),
        );
    for (what, value) in values {
        if !value.chars().all(is_xml_char) {
            return Err(ServiceError::NotXml { what, value });
        }
    }
    let mut buf = Vec::new();
    plist::to_writer_xml(&mut buf, &launchd_plist(spec))?;
    buf.push(b'\n');
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The systemd user unit.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let exec = spec
        .program_arguments()
        .iter()
        .map(|a| systemd_exec_arg(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut env = vec![format!("PATH={SYSTEMD_SERVICE_PATH}")];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let env_lines: String = env
        .iter()
        .map(|e| {
            format!(
                "Environment={}\n",
                systemd_quoted(&systemd_escape_specifiers(e))
            )
        })
        .collect();
    format!(
        "\
# Written by `docusearch-agent service install`; `service uninstall` removes it.
# Logs: journalctl --user -u docusearch-agent -f
[Unit]
Description=docusearch-agent: keeps a DocuSearch index in sync with watched folders

[Service]
Type=exec
ExecStart={exec}
WorkingDirectory={workdir}
{env_lines}\
# Restart after a crash, but not after a clean stop or a configuration error (exit {EXIT_CONFIG}).
Restart=on-failure
RestartSec={THROTTLE_INTERVAL_S}
RestartPreventExitStatus={EXIT_CONFIG}
# Indexing yields to interactive work.
Nice={SERVICE_NICE}
IOSchedulingClass=idle
# SIGTERM to the agent only: it checkpoints its batch and stops its own children.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_S}
SyslogIdentifier=docusearch-agent

[Install]
WantedBy=default.target
",
        workdir = systemd_escape_specifiers(&spec.state_dir.display().to_string()),
    )
}

/// `%` starts a specifier in every unit setting.
fn systemd_escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// One ExecStart word: quoted when it holds anything but plain path characters; `$` would
/// expand a variable.
fn systemd_exec_arg(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.,:+@=-".contains(c));
    let s = systemd_escape_specifiers(arg).replace('$', "$$");
    if plain {
        s
    } else {
        systemd_quoted(&s)
    }
}

/// A double-quoted systemd value (specifiers must be escaped by the caller).
fn systemd_quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The service manager this platform has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Launchd,
    Systemd,
}

impl Platform {
    pub fn current() -> Result<Platform, ServiceError> {
        if cfg!(target_os = "macos") {
            Ok(Platform::Launchd)
        } else if cfg!(target_os = "linux") {
            Ok(Platform::Systemd)
        } else {
            Err(ServiceError::UnsupportedPlatform)
        }
    }

    /// Where the service file goes: `~/Library/LaunchAgents/com.docusearch.agent.plist` or
    /// `$XDG_CONFIG_HOME/systemd/user/docusearch-agent.service`.
    pub fn service_file(self) -> Result<PathBuf, ServiceError> {
        let base = directories::BaseDirs::new().ok_or(ServiceError::NoHome)?;
        Ok(match self {
            Platform::Launchd => base
                .home_dir()
                .join("Library/LaunchAgents")
                .join(format!("{LAUNCHD_LABEL}.plist")),
            Platform::Systemd => base.config_dir().join("systemd/user").join(SYSTEMD_UNIT),
        })
    }

    pub fn render(self, spec: &ServiceSpec) -> Result<String, ServiceError> {
        match self {
            Platform::Launchd => launchd_plist_xml(spec),
            Platform::Systemd => Ok(systemd_unit(spec)),
        }
    }
}

/// One command of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub program: String,
    pub args: Vec<String>,
    /// A failure here is expected in some states (e.g. stopping a service that is not loaded).
    pub may_fail: bool,
    /// Shown next to the command.
    pub note: Option<&'static str>,
    /// Extra tries, a second apart, before giving up.
    pub retries: u32,
}

impl Step {
    fn new(program: &str, args: &[&str]) -> Step {
        Step {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            may_fail: false,
            note: None,
            retries: 0,
        }
    }
    fn retries(mut self, n: u32) -> Step {
        self.retries = n;
        self
    }
    fn may_fail(mut self, note: &'static str) -> Step {
        self.may_fail = true;
        self.note = Some(note);
        self
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", shell_quote(&self.program))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        if let Some(note) = self.note {
            write!(f, "    # {note}")?;
        }
        Ok(())
    }
}

/// Quotes a word for a POSIX shell when it needs it, so printed commands can be pasted.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.,:+@=%-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Everything `service install` does, in order.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    pub platform: Platform,
    /// Written with the default configuration first, when no config file exists.
    pub write_default_config: Option<PathBuf>,
    pub create_dirs: Vec<PathBuf>,
    pub service_file: PathBuf,
    pub contents: String,
    pub steps: Vec<Step>,
    /// What to run by hand when the service manager refuses.
    pub fallback: Vec<Step>,
}

/// Everything `service uninstall` does, in order.
#[derive(Debug, Clone)]
pub struct UninstallPlan {
    pub platform: Platform,
    pub service_file: PathBuf,
    /// Run before the file is removed.
    pub stop_steps: Vec<Step>,
    /// Run after.
    pub after_steps: Vec<Step>,
}

pub fn launchd_target(uid: u32) -> (String, String) {
    let domain = format!("gui/{uid}");
    let service = format!("{domain}/{LAUNCHD_LABEL}");
    (domain, service)
}

pub fn install_plan(
    platform: Platform,
    spec: &ServiceSpec,
    service_file: &Path,
    write_default_config: bool,
    uid: u32,
) -> Result<InstallPlan, ServiceError> {
    let file = service_file.display().to_string();
    let (steps, fallback) = match platform {
        Platform::Launchd => {
            let (domain, service) = launchd_target(uid);
            (
                vec![
                    Step::new("launchctl", &["bootout", &service])
                        .may_fail("unloads an older copy; fails harmlessly when none is loaded"),
                    Step::new("launchctl", &["enable", &service]),
                    // bootout returns before launchd has let go of the old job; bootstrap
                    // right after it can fail with "Input/output error".
                    Step::new("launchctl", &["bootstrap", &domain, &file]).retries(3),
                ],
                vec![Step::new("launchctl", &["load", "-w", &file])],
            )
        }
        Platform::Systemd => (
            vec![
                Step::new("systemctl", &["--user", "daemon-reload"]),
                Step::new("systemctl", &["--user", "enable", SYSTEMD_UNIT]),
                // restart, not start: a reinstall must pick up the new unit.
                Step::new("systemctl", &["--user", "restart", SYSTEMD_UNIT]),
            ],
            vec![Step::new(
                &spec.exe.display().to_string(),
                &["run", "--config", &spec.config.display().to_string()],
            )],
        ),
    };
    // launchd opens the log files itself; systemd needs the working directory to exist.
    let mut create_dirs = vec![match platform {
        Platform::Launchd => spec.log_dir(),
        Platform::Systemd => spec.state_dir.clone(),
    }];
    if let Some(parent) = service_file.parent() {
        create_dirs.push(parent.to_path_buf());
    }
    Ok(InstallPlan {
        platform,
        write_default_config: write_default_config.then(|| spec.config.clone()),
        create_dirs,
        service_file: service_file.to_path_buf(),
        contents: platform.render(spec)?,
        steps,
        fallback,
    })
}

pub fn uninstall_plan(platform: Platform, service_file: &Path, uid: u32) -> UninstallPlan {
    match platform {
        Platform::Launchd => {
            let (_, service) = launchd_target(uid);
            UninstallPlan {
                platform,
                service_file: service_file.to_path_buf(),
                stop_steps: vec![Step::new("launchctl", &["bootout", &service])
                    .may_fail("fails harmlessly when it is not loaded")],
                after_steps: vec![],
            }
        }
        Platform::Systemd => UninstallPlan {
            platform,
            service_file: service_file.to_path_buf(),
            stop_steps: vec![
                Step::new("systemctl", &["--user", "disable", "--now", SYSTEMD_UNIT])
                    .may_fail("fails harmlessly when it is not enabled"),
            ],
            after_steps: vec![Step::new("systemctl", &["--user", "daemon-reload"])],
        },
    }
}

/// The current user's id (launchd's `gui/<uid>` domain).
pub fn current_uid() -> u32 {
    // SAFETY: getuid cannot fail and has no preconditions.
    unsafe { libc::getuid() }
}

/// The spec for this program and configuration, and whether the default config must be written.
pub fn spec_for(
    cfg: &Config,
    config_path: Option<&Path>,
) -> Result<(ServiceSpec, bool), ServiceError> {
    let exe = std::env::current_exe().map_err(ServiceError::CurrentExe)?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let (config, missing) = match config_path {
        Some(p) => (
            p.canonicalize()
                .map_err(|source| ServiceError::ConfigPath {
                    path: p.to_path_buf(),
                    source,
                })?,
            false,
        ),
        None => {
            let p = crate::config::default_config_path().ok_or(ServiceError::NoHome)?;
            let missing = !p.is_file();
            (p, missing)
        }
    };
    let state_dir =
        std::path::absolute(&cfg.state_dir).map_err(|source| ServiceError::ConfigPath {
            path: cfg.state_dir.clone(),
            source,
        })?;
    let env = CARRIED_ENV
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| (k.to_string(), v))
        })
        .collect();
    Ok((
        ServiceSpec {
            exe,
            config,
            state_dir,
            env,
        },
        missing,
    ))
}

pub fn write_file(path: &Path, contents: &str) -> Result<(), ServiceError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServiceError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, contents).map_err(|source| ServiceError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs a step (with its retries); `Err` carries what it printed (or why it could not start).
pub fn run_step(step: &Step) -> Result<(), String> {
    let mut tries_left = step.retries;
    loop {
        match capture(&step.program, &step.args) {
            Ok(_) => return Ok(()),
            Err(why) if tries_left == 0 => return Err(why),
            Err(_) => {
                tries_left -= 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Runs a program to completion, keeping its output.
pub fn run_program<I, S>(program: &str, args: I) -> Result<std::process::Output, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))
}

/// Runs a program; `Ok(stdout)` when it exits 0.
pub fn capture<I, S>(program: &str, args: I) -> Result<String, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_program(program, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{} ({})",
            stderr.trim().lines().last().unwrap_or(stdout.trim()),
            out.status
        ))
    }
}

/// Runs a program that answers on stdout whatever its exit status (`systemctl is-active`);
/// `Err` only when it could not run or printed nothing.
pub fn capture_any<I, S>(program: &str, args: I) -> Result<String, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_program(program, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if stdout.is_empty() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("no answer")
            .to_string());
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_args_with_spaces_and_specials_are_quoted() {
        assert_eq!(systemd_exec_arg("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(systemd_exec_arg("/home/a b/c.toml"), "\"/home/a b/c.toml\"");
        assert_eq!(systemd_exec_arg("/x/100%"), "\"/x/100%%\"");
        assert_eq!(systemd_exec_arg("/x/$HOME"), "\"/x/$$HOME\"");
        assert_eq!(systemd_exec_arg("/x/a\"b"), "\"/x/a\\\"b\"");
    }

    #[test]
    fn shell_quote_quotes_only_when_needed() {
        assert_eq!(shell_quote("gui/501"), "gui/501");
        assert_eq!(
            shell_quote("/Users/a/Library/Application Support/x"),
            "'/Users/a/Library/Application Support/x'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
