//! The service files (launchd plist, systemd unit) and `service install/uninstall/status`
//! through the real binary, with HOME pointed at a temporary directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use docusearch_agent::service::{
    install_plan, launchd_plist, launchd_plist_xml, systemd_unit, uninstall_plan, Platform,
    ServiceSpec, LAUNCHD_LABEL, SERVICE_PATH, SYSTEMD_UNIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_docusearch-agent");

/// A spec with the real binary and paths that need quoting (macOS's "Application Support").
fn spec_in(dir: &Path) -> ServiceSpec {
    let state = dir.join("Application Support/docusearch agent");
    ServiceSpec {
        exe: PathBuf::from(BIN),
        config: state.join("config.toml"),
        state_dir: state,
        env: vec![("DEVICE".into(), "cpu".into())],
    }
}

#[test]
fn the_launchd_plist_has_every_key_and_absolute_paths() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path());
    let xml = launchd_plist_xml(&spec).expect("plist renders");
    let parsed = plist::Value::from_reader_xml(xml.as_bytes()).expect("the plist parses");
    let d = parsed.as_dictionary().expect("a dictionary at the top");

    let keys: BTreeSet<&str> = d.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "Label",
        "ProgramArguments",
        "RunAtLoad",
        "KeepAlive",
        "ProcessType",
        "LowPriorityIO",
        "Nice",
        "ThrottleInterval",
        "ExitTimeOut",
        "WorkingDirectory",
        "EnvironmentVariables",
        "StandardOutPath",
        "StandardErrorPath",
    ]
    .into();
    assert_eq!(keys, expected);

    assert_eq!(d["Label"].as_string(), Some(LAUNCHD_LABEL));
    let args: Vec<&str> = d["ProgramArguments"]
        .as_array()
        .expect("ProgramArguments is an array")
        .iter()
        .map(|v| v.as_string().expect("strings"))
        .collect();
    assert_eq!(args.len(), 4);
    assert_eq!(args[1..3], ["run", "--config"]);
    assert_eq!(Path::new(args[0]), Path::new(BIN));
    assert_eq!(Path::new(args[3]), spec.config);
    assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
    let keep_alive = d["KeepAlive"]
        .as_dictionary()
        .expect("KeepAlive is a dictionary");
    assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
    assert_eq!(d["ProcessType"].as_string(), Some("Background"));
    assert_eq!(d["LowPriorityIO"].as_boolean(), Some(true));
    let nice = d["Nice"].as_signed_integer().expect("Nice is an integer");
    assert!((1..=20).contains(&nice), "a lower priority: {nice}");
    assert!(d["ThrottleInterval"].as_signed_integer().expect("integer") >= 10);
    assert!(d["ExitTimeOut"].as_signed_integer().expect("integer") >= 10);
    let env = d["EnvironmentVariables"]
        .as_dictionary()
        .expect("a dictionary");
    let path = env["PATH"].as_string().expect("PATH");
    assert_eq!(path, SERVICE_PATH);
    for dir in ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin"] {
        assert!(path.split(':').any(|p| p == dir), "PATH finds {dir}");
    }
    assert_eq!(
        env["DEVICE"].as_string(),
        Some("cpu"),
        "carried environment"
    );
    let out = Path::new(d["StandardOutPath"].as_string().expect("string"));
    let err = Path::new(d["StandardErrorPath"].as_string().expect("string"));
    assert_ne!(out, err);
    for p in [
        out,
        err,
        Path::new(d["WorkingDirectory"].as_string().expect("string")),
    ] {
        assert!(p.is_absolute(), "{} is absolute", p.display());
        assert!(
            p.starts_with(&spec.state_dir),
            "{} is under the state dir",
            p.display()
        );
    }
    for p in [args[0], args[3]] {
        assert!(Path::new(p).is_absolute(), "{p} is absolute");
    }
}

#[test]
fn the_committed_template_is_what_the_generator_writes() {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("launchd/com.docusearch.agent.plist"),
    )
    .expect("launchd/com.docusearch.agent.plist exists");
    let dir = tempfile::tempdir().unwrap();
    let spec = ServiceSpec {
        env: vec![],
        ..spec_in(dir.path())
    };
    for placeholder in ["__DOCUSEARCH_AGENT__", "__CONFIG__", "__STATE_DIR__"] {
        assert!(
            template.contains(placeholder),
            "the template has {placeholder}"
        );
    }
    let filled = filled_template(&spec);
    let parsed = plist::Value::from_reader_xml(filled.as_bytes()).expect("the template parses");
    assert_eq!(
        parsed,
        launchd_plist(&spec),
        "template and generator agree key by key"
    );
    // Every top-level key is documented by a comment right above it.
    let lines: Vec<&str> = template.lines().map(str::trim).collect();
    for key in parsed.as_dictionary().unwrap().keys() {
        let at = lines
            .iter()
            .position(|l| *l == format!("<key>{key}</key>"))
            .unwrap_or_else(|| panic!("<key>{key}</key> on its own line"));
        let above = lines[..at]
            .iter()
            .rev()
            .find(|l| !l.is_empty())
            .copied()
            .unwrap_or_default();
        assert!(
            above.ends_with("-->"),
            "no comment right above <key>{key}</key>"
        );
    }
}

/// Reads `xml` strictly: quick-xml with its optional checks on (end tags match their start
/// tags, no `--` inside a comment), every escape and attribute resolved, only characters XML 1.0
/// allows, one root element closed at the end.
fn strict_xml(xml: &str) -> Result<(), String> {
    use quick_xml::events::Event;
    if let Some(c) = xml.chars().find(|c| {
        !matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    }) {
        return Err(format!("{c:?} is not an XML character"));
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    let config = reader.config_mut();
    config.check_comments = true;
    config.check_end_names = true;
    config.allow_unmatched_ends = false;
    let (mut depth, mut roots) = (0usize, 0usize);
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.error_position()))?;
        let attributes = match &event {
            Event::Start(e) | Event::Empty(e) => {
                roots += usize::from(depth == 0);
                Some(e.attributes())
            }
            _ => None,
        };
        for a in attributes.into_iter().flatten() {
            a.map_err(|e| e.to_string())?
                .unescape_value()
                .map_err(|e| e.to_string())?;
        }
        match event {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth -= 1,
            Event::Text(t) => {
                t.unescape().map_err(|e| format!("bad escape: {e}"))?;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    match (depth, roots) {
        (0, 1) => Ok(()),
        _ => Err(format!(
            "{roots} root element(s), {depth} left open at the end"
        )),
    }
}

/// What Python's plistlib (expat underneath: a strict XML parser) reads from `xml`, as JSON.
/// Python comes with scripts/setup's environment; without it the test fails with the fix.
fn plistlib_reads(xml: &str) -> Result<serde_json::Value, String> {
    use std::io::Write as _;
    let python = docusearch_agent::runtime_paths::find_setup_python()
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"));
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json, plistlib, sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read()), sort_keys=True))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(xml.as_bytes())
        .expect("write the plist to Python");
    let out = child.wait_with_output().expect("Python runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The template as the generator would write it for `spec` (placeholders filled).
fn filled_template(spec: &ServiceSpec) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("launchd/com.docusearch.agent.plist"),
    )
    .expect("launchd/com.docusearch.agent.plist exists")
    .replace("__DOCUSEARCH_AGENT__", &spec.exe.display().to_string())
    .replace("__CONFIG__", &spec.config.display().to_string())
    .replace("__STATE_DIR__", &spec.state_dir.display().to_string())
}

#[test]
fn the_template_and_the_generated_plist_are_well_formed_xml() {
    // The checks are strict: the template's old comments (`--` in them) fail both.
    let old = "<?xml version=\"1.0\"?>\n<plist version=\"1.0\"><!-- `service install --dry-run` --><dict/></plist>\n";
    let err = strict_xml(old).expect_err("quick-xml refuses `--` in a comment");
    assert!(err.contains("`--` was found in a comment"), "{err}");
    let err = plistlib_reads(old).expect_err("plistlib refuses `--` in a comment");
    assert!(err.contains("not well-formed"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    // Values that need escaping, or look like XML, or like a comment's end.
    let state = dir
        .path()
        .join("Jörg & Co/<Application Support>/--dry-run --> \"x\" 'y'");
    let spec = ServiceSpec {
        exe: PathBuf::from(BIN),
        config: state.join("config ]]> --.toml"),
        state_dir: state,
        env: vec![
            ("RUST_LOG".into(), "docusearch_agent=debug,--info".into()),
            ("MODEL_NAME".into(), "<a href=\"x\">&amp;</a>".into()),
        ],
    };
    // The template is filled in by hand with plain paths (its placeholders are text, unescaped).
    let plain = ServiceSpec {
        env: vec![],
        ..spec_in(dir.path())
    };
    let template = filled_template(&plain);
    strict_xml(&template).unwrap_or_else(|e| panic!("the template is not well-formed XML: {e}"));
    let generated = launchd_plist_xml(&spec).expect("plist renders");
    strict_xml(&generated)
        .unwrap_or_else(|e| panic!("the generated plist is not well-formed XML: {e}\n{generated}"));
    assert_eq!(
        Platform::Launchd.render(&spec).expect("renders"),
        generated,
        "what `service install` writes on macOS"
    );

    let from_template =
        plistlib_reads(&template).unwrap_or_else(|e| panic!("plistlib refuses the template: {e}"));
    let from_generator = plistlib_reads(&generated)
        .unwrap_or_else(|e| panic!("plistlib refuses the generated plist: {e}"));
    let args: Vec<&str> = from_generator["ProgramArguments"]
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let config = spec.config.display().to_string();
    assert_eq!(
        args,
        [BIN, "run", "--config", config.as_str()],
        "exactly, after unescaping"
    );
    assert_eq!(
        from_generator["WorkingDirectory"],
        spec.state_dir.display().to_string()
    );
    let env = &from_generator["EnvironmentVariables"];
    assert_eq!(env["RUST_LOG"], "docusearch_agent=debug,--info");
    assert_eq!(env["MODEL_NAME"], "<a href=\"x\">&amp;</a>");
    // Python reads the template and the generated file alike.
    let generated_plain = launchd_plist_xml(&plain).expect("plist renders");
    assert_eq!(
        from_template,
        plistlib_reads(&generated_plain).expect("plistlib reads it")
    );
}

#[test]
fn a_value_xml_cannot_carry_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ServiceSpec {
        env: vec![("RUST_LOG".into(), "info\u{1b}[0m".into())],
        ..spec_in(dir.path())
    };
    let err = launchd_plist_xml(&spec).expect_err("an escape character has no XML form");
    let msg = err.to_string();
    assert!(
        msg.contains("RUST_LOG") && msg.contains("unset the variable"),
        "{msg}"
    );
    let spec = ServiceSpec {
        state_dir: dir.path().join("bell\u{7}"),
        ..spec_in(dir.path())
    };
    let msg = launchd_plist_xml(&spec).expect_err("refused").to_string();
    assert!(msg.contains("the state directory"), "{msg}");
    // The systemd unit is text, not XML: unaffected.
    assert!(systemd_unit(&spec).contains("bell"));
}

fn unit_lines(unit: &str) -> Vec<&str> {
    unit.lines().map(str::trim).collect()
}

#[test]
fn the_systemd_unit_has_what_the_service_needs_and_passes_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path());
    let unit = systemd_unit(&spec);
    let lines = unit_lines(&unit);
    let exec = format!("ExecStart={BIN} run --config \"{}\"", spec.config.display());
    for required in [
        exec.as_str(),
        "Restart=on-failure",
        "Nice=10",
        "IOSchedulingClass=idle",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=15",
        "WantedBy=default.target",
        "[Unit]",
        "[Service]",
        "[Install]",
        "Environment=\"DEVICE=cpu\"",
    ] {
        assert!(
            lines.contains(&required),
            "unit lacks `{required}`:\n{unit}"
        );
    }
    assert!(
        lines.contains(&format!("WorkingDirectory={}", spec.state_dir.display()).as_str()),
        "{unit}"
    );

    let available = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !available {
        eprintln!("NOTE: systemd-analyze is not installed: the unit was checked line by line only");
        return;
    }
    let verify = |unit_text: &str| -> Output {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join(SYSTEMD_UNIT);
        std::fs::write(&file, unit_text).unwrap();
        let runtime = d.path().join("runtime");
        std::fs::create_dir(&runtime).unwrap();
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        Command::new("systemd-analyze")
            .args(["--user", "verify"])
            .arg(&file)
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .expect("systemd-analyze runs")
    };
    let out = verify(&unit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}\n{unit}"
    );
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze warned:\n{stderr}\n{unit}"
    );

    // The check can fail: a unit whose program does not exist is refused.
    let broken = unit.replace(BIN, "/nonexistent/docusearch-agent");
    let out = verify(&broken);
    assert!(
        !out.status.success(),
        "verify must refuse a missing ExecStart program"
    );
}

#[test]
fn plans_name_the_exact_commands() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path());
    let plist_file = dir
        .path()
        .join("Library/LaunchAgents/com.docusearch.agent.plist");
    let plan = install_plan(Platform::Launchd, &spec, &plist_file, true, 501).expect("plan");
    let steps: Vec<String> = plan
        .steps
        .iter()
        .map(|s| format!("{} {}", s.program, s.args.join(" ")))
        .collect();
    assert_eq!(
        steps,
        [
            "launchctl bootout gui/501/com.docusearch.agent".to_string(),
            "launchctl enable gui/501/com.docusearch.agent".to_string(),
            format!("launchctl bootstrap gui/501 {}", plist_file.display()),
        ]
    );
    assert!(plan.steps[0].may_fail && !plan.steps[2].may_fail);
    assert!(
        plan.steps[2].retries > 0,
        "bootstrap right after bootout is retried"
    );
    assert_eq!(plan.fallback[0].program, "launchctl");
    assert_eq!(
        plan.fallback[0].args,
        [
            "load".to_string(),
            "-w".into(),
            plist_file.display().to_string()
        ]
    );
    assert_eq!(
        plan.write_default_config.as_deref(),
        Some(spec.config.as_path())
    );
    assert!(plan.create_dirs.contains(&spec.log_dir()));
    assert_eq!(
        plist::Value::from_reader_xml(plan.contents.as_bytes()).expect("plist"),
        launchd_plist(&spec)
    );

    let unit_file = dir.path().join(".config/systemd/user").join(SYSTEMD_UNIT);
    let plan = install_plan(Platform::Systemd, &spec, &unit_file, false, 1000).expect("plan");
    let steps: Vec<String> = plan
        .steps
        .iter()
        .map(|s| format!("{} {}", s.program, s.args.join(" ")))
        .collect();
    assert_eq!(
        steps,
        [
            "systemctl --user daemon-reload",
            "systemctl --user enable docusearch-agent.service",
            "systemctl --user restart docusearch-agent.service",
        ]
    );
    assert_eq!(plan.write_default_config, None);
    assert_eq!(plan.contents, systemd_unit(&spec));

    let un = uninstall_plan(Platform::Launchd, &plist_file, 501);
    assert_eq!(
        un.stop_steps[0].args,
        ["bootout", "gui/501/com.docusearch.agent"]
    );
    let un = uninstall_plan(Platform::Systemd, &unit_file, 1000);
    assert_eq!(
        un.stop_steps[0].args,
        ["--user", "disable", "--now", SYSTEMD_UNIT]
    );
    assert_eq!(un.after_steps[0].args, ["--user", "daemon-reload"]);
}

/// The binary with HOME and the XDG folders in `home`, and no user service manager reachable
/// (so nothing on the machine running the tests is ever touched).
fn agent(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    let runtime = home.join("run");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            format!("unix:path={}/no-bus", runtime.display()),
        );
    cmd
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn install_dry_run_prints_the_file_and_commands_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let out = agent(home.path())
        .env("BATCH_SIZE_VISUAL", "2")
        .args(["service", "install", "--dry-run"])
        .output()
        .expect("the binary runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let config = home.path().join(".config/docusearch-agent/config.toml");
    if cfg!(target_os = "linux") {
        let unit_file = home.path().join(".config/systemd/user").join(SYSTEMD_UNIT);
        for expected in [
            format!("Would write {}:", unit_file.display()),
            format!("ExecStart={BIN} run --config {}", config.display()),
            format!(
                "Would write the default configuration (config.example.toml) to {}",
                config.display()
            ),
            "Environment=\"BATCH_SIZE_VISUAL=2\"".into(),
            "  systemctl --user daemon-reload".into(),
            "  systemctl --user enable docusearch-agent.service".into(),
            "  systemctl --user restart docusearch-agent.service".into(),
        ] {
            assert!(
                stdout.lines().any(|l| l == expected),
                "missing line `{expected}` in:\n{stdout}"
            );
        }
    } else {
        let plist_file = home
            .path()
            .join("Library/LaunchAgents/com.docusearch.agent.plist");
        assert!(
            stdout.contains(&format!("Would write {}:", plist_file.display())),
            "{stdout}"
        );
        assert!(stdout.contains("launchctl bootstrap gui/"), "{stdout}");
        assert!(stdout.contains("<key>ProgramArguments</key>"), "{stdout}");
    }
    assert_eq!(
        files_under(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run writes nothing"
    );

    let out = agent(home.path())
        .args(["service", "uninstall", "--dry-run"])
        .output()
        .expect("the binary runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    if cfg!(target_os = "linux") {
        assert!(
            stdout.contains("systemctl --user disable --now docusearch-agent.service"),
            "{stdout}"
        );
    } else {
        assert!(stdout.contains("launchctl bootout gui/"), "{stdout}");
    }
    assert_eq!(
        files_under(home.path()),
        Vec::<PathBuf>::new(),
        "a dry run removes nothing"
    );
}

/// A real install where no user systemd answers (as in a container): the unit and the default
/// configuration are written, the failure is explained, uninstall removes the unit again.
#[cfg(target_os = "linux")]
#[test]
fn install_without_a_user_systemd_writes_the_unit_explains_and_uninstalls() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("run")).unwrap();
    let dry = agent(home.path())
        .args(["service", "install", "--dry-run"])
        .output()
        .expect("runs");
    assert!(dry.status.success());

    let out = agent(home.path())
        .args(["service", "install"])
        .output()
        .expect("the binary runs");
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "install cannot start the unit here:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("$ systemctl --user daemon-reload"),
        "{stdout}"
    );
    assert!(
        stderr.contains("systemctl --user is not usable here"),
        "{stderr}"
    );
    assert!(
        stderr.contains("systemctl --user enable --now docusearch-agent.service"),
        "{stderr}"
    );

    let unit_file = home.path().join(".config/systemd/user").join(SYSTEMD_UNIT);
    let config = home.path().join(".config/docusearch-agent/config.toml");
    let unit = std::fs::read_to_string(&unit_file).expect("the unit is written");
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains(unit.trim_end()),
        "the dry run printed exactly this unit"
    );
    let written = std::fs::read_to_string(&config).expect("the default config is written");
    assert_eq!(written, docusearch_agent::service::DEFAULT_CONFIG_TOML);
    docusearch_agent::config::Config::from_file(&config).expect("the default config loads");
    let state_dir = home.path().join(".local/share/docusearch-agent");
    assert!(state_dir.is_dir(), "the working directory exists");

    // Installing again keeps the user's config as it is.
    let port = crate::common::free_port();
    let mine = format!("# mine\n[api]\nport = {port}\n");
    std::fs::write(&config, &mine).unwrap();
    let again = agent(home.path())
        .args(["service", "install"])
        .output()
        .expect("runs");
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), mine);

    // Not running: exit 3, and it says why.
    let out = agent(home.path())
        .args(["service", "status"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "service file: {} (installed)",
            unit_file.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("systemd: cannot ask systemctl --user"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "status API: no agent answers at http://127.0.0.1:{port}"
        )),
        "{stdout}"
    );

    // With an agent's API up on the configured port, status reports what it says.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api_cfg = docusearch_agent::config::ApiConfig {
        port,
        ..Default::default()
    };
    let server = rt
        .block_on(docusearch_agent::api::ApiServer::bind(&api_cfg))
        .expect("binds the configured port");
    let state = docusearch_agent::api::ApiState::new(
        Default::default(),
        docusearch_agent::api::ChromaProbe::new(None, std::time::Duration::from_secs(1)).unwrap(),
    );
    rt.spawn(server.run(state, std::future::pending()));
    let out = agent(home.path())
        .args(["service", "status"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("status API: degraded: chroma unreachable: the managed Chroma server has not started yet"),
        "{stdout}"
    );
    drop(rt);

    let out = agent(home.path())
        .args(["service", "uninstall"])
        .output()
        .expect("runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!unit_file.exists(), "the unit is removed");
    assert!(config.exists(), "the configuration is kept");

    let out = agent(home.path())
        .args(["service", "status"])
        .output()
        .expect("runs");
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout.contains("(not installed)"), "{stdout}");
}
