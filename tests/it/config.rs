//! Configuration: parsing, defaults, environment overrides, and messages for bad input.

use std::collections::HashMap;

use docusearch_agent::config::{ChromaTarget, Config, DeviceChoice, MultivectorEncoding};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(Some(&path), &env_of(env)).map_err(|e| e.to_string())
}

#[test]
fn the_example_config_parses_to_the_defaults() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let parsed = Config::from_toml(&example).expect("config.example.toml parses");
    let mut defaults = Config::default();
    // The example leaves these two to their computed defaults, which depend on the machine.
    defaults.agent_id = parsed.agent_id.clone();
    defaults.state_dir = parsed.state_dir.clone();
    assert_eq!(
        parsed, defaults,
        "config.example.toml documents exactly the defaults"
    );
}

#[test]
fn defaults_match_the_seed_deployment() {
    let c = load_text("", &[]).unwrap();
    assert_eq!(c.model.name, "vidore/colpali-v1.2-merged");
    assert_eq!(c.model.batch_size_visual, 4);
    assert_eq!(c.model.batch_size_text, 8);
    assert_eq!(c.extract.chunk_size, 250);
    assert_eq!(c.extract.chunk_overlap, 50);
    assert_eq!(c.extract.render_dpi, 150);
    assert_eq!(c.chroma.visual_collection, "visual_collection");
    assert_eq!(c.chroma.text_collection, "text_collection");
    assert_eq!(
        c.chroma.multivector_encoding,
        MultivectorEncoding::F32GzipB64
    );
    assert_eq!(c.api.port, 8002);
    assert!(!c.agent_id.is_empty());
    assert_eq!(c.chroma_target(), ChromaTarget::Managed);
}

#[test]
fn environment_overrides_the_file() {
    let text = r#"
[chroma]
url = "http://files-server:9000"
[model]
name = "from-file"
device = "cpu"
batch_size_visual = 2
[extract]
render_dpi = 100
"#;
    let c = load_text(
        text,
        &[
            ("CHROMA_HOST", "chroma.example"),
            ("CHROMA_PORT", "8123"),
            ("DEVICE", "mps"),
            ("MODEL_NAME", "/models/colpali"),
            ("BATCH_SIZE_VISUAL", "16"),
            ("BATCH_SIZE_TEXT", "32"),
            ("TEXT_CHUNK_SIZE", "300"),
            ("TEXT_CHUNK_OVERLAP", "20"),
            ("PAGE_RENDER_DPI", "200"),
        ],
    )
    .unwrap();
    assert_eq!(
        c.chroma_target(),
        ChromaTarget::Remote {
            url: "http://chroma.example:8123".into()
        }
    );
    assert_eq!(c.model.device, DeviceChoice::Metal);
    assert_eq!(c.model.name, "/models/colpali");
    assert_eq!(c.model.batch_size_visual, 16);
    assert_eq!(c.model.batch_size_text, 32);
    assert_eq!(c.extract.chunk_size, 300);
    assert_eq!(c.extract.chunk_overlap, 20);
    assert_eq!(c.extract.render_dpi, 200);
}

#[test]
fn file_values_are_used_without_environment() {
    let c = load_text(
        "agent_id = \"laptop\"\n[chroma]\nhost = \"10.0.0.5\"\nport = 8001\nmultivector_encoding = \"f16-b64\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.agent_id, "laptop");
    assert_eq!(c.chroma.multivector_encoding, MultivectorEncoding::F16B64);
    assert_eq!(
        c.chroma_target(),
        ChromaTarget::Remote {
            url: "http://10.0.0.5:8001".into()
        }
    );
}

#[test]
fn unknown_key_is_named() {
    let err = load_text("[model]\nbatch_size_visuals = 4\n", &[]).unwrap_err();
    assert!(err.contains("batch_size_visuals"), "{err}");
    let err = load_text("colour = 1\n", &[]).unwrap_err();
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn bad_values_name_key_value_and_expectation() {
    let err = load_text("[model]\ndevice = \"tpu\"\n", &[]).unwrap_err();
    assert!(err.contains("device") && err.contains("tpu"), "{err}");

    let err = load_text("[extract]\nchunk_size = 100\nchunk_overlap = 100\n", &[]).unwrap_err();
    assert!(
        err.contains("extract.chunk_overlap") && err.contains("100") && err.contains("fewer words"),
        "{err}"
    );

    let err = load_text("[chroma]\nurl = \"localhost:8000\"\n", &[]).unwrap_err();
    assert!(
        err.contains("chroma.url") && err.contains("localhost:8000") && err.contains("http"),
        "{err}"
    );

    let err = load_text("[api]\nbind = \"0.0.0.0\"\n", &[]).unwrap_err();
    assert!(
        err.contains("api.bind") && err.contains("allow_non_loopback"),
        "{err}"
    );

    let err = load_text("[chroma]\nvisual_collection = \"a\"\n", &[]).unwrap_err();
    assert!(err.contains("chroma.visual_collection"), "{err}");

    let err = load_text("[model]\nbatch_size_text = \"eight\"\n", &[]).unwrap_err();
    assert!(
        err.contains("batch_size_text") && err.contains("eight"),
        "{err}"
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    let err = load_text("", &[("CHROMA_PORT", "eighty")]).unwrap_err();
    assert!(
        err.contains("CHROMA_PORT") && err.contains("eighty"),
        "{err}"
    );
    let err = load_text("", &[("DEVICE", "gpu")]).unwrap_err();
    assert!(
        err.contains("DEVICE") && err.contains("gpu") && err.contains("cuda"),
        "{err}"
    );
    let err = load_text("", &[("PAGE_RENDER_DPI", "5")]).unwrap_err();
    assert!(
        err.contains("PAGE_RENDER_DPI") && err.contains('5'),
        "{err}"
    );
    let err = load_text("", &[("BATCH_SIZE_VISUAL", "0")]).unwrap_err();
    assert!(err.contains("BATCH_SIZE_VISUAL"), "{err}");
}

/// A watched folder on a disk that is not mounted is not a configuration error: every command
/// still runs (`run` skips it, `doctor` and `status` report it).
#[test]
fn a_missing_watched_folder_is_accepted_and_reported() {
    let here = tempfile::tempdir().unwrap();
    let text = format!(
        "state_dir = {:?}\n[watch]\nfolders = [{:?}, \"/definitely/not/here\"]\n",
        here.path().join("state"),
        here.path()
    );
    let cfg = load_text(&text, &[]).expect("a missing folder is accepted");
    assert_eq!(
        cfg.watch.missing_folders(),
        vec![std::path::PathBuf::from("/definitely/not/here")]
    );

    // The real binary: `status` answers (it used to exit 78) and warns.
    let config = here.path().join("config.toml");
    std::fs::write(&config, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("runs the binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("warning: watched folder /definitely/not/here is missing")),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&format!("watched folder {} ", here.path().display())),
        "the folder that exists is not reported: {stdout}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let err = Config::load(
        Some(std::path::Path::new("/nope/config.toml")),
        &env_of(&[]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nope/config.toml"), "{err}");
}

#[test]
fn a_log_level_that_is_no_level_is_refused() {
    // `verbose` is a valid tracing filter (a target of that name at every level) that silences
    // every other line: refused, with the levels.
    for bad in ["verbose", "", "info,verbose", "docusearch_agent"] {
        let err = load_text(&format!("[logging]\nlevel = {bad:?}\n"), &[]).unwrap_err();
        assert!(
            err.contains("logging.level") && err.contains(&format!("{bad:?}")),
            "{err}"
        );
        assert!(
            err.contains("error, warn, info, debug, trace"),
            "the valid values: {err}"
        );
    }
    let err = load_text("[logging]\nlevel = \"verbose\"\n", &[]).unwrap_err();
    assert!(err.contains("`verbose` is not a level"), "{err}");
    let err = load_text("[logging]\nlevel = \"docusearch_agent=loud\"\n", &[]).unwrap_err();
    assert!(err.contains("logging.level"), "{err}");
    for good in [
        "info",
        "DEBUG",
        "off",
        "docusearch_agent=debug,info",
        "warn,docusearch_agent::embed=trace",
        "docusearch_agent=trace",
    ] {
        let c = load_text(&format!("[logging]\nlevel = {good:?}\n"), &[])
            .unwrap_or_else(|e| panic!("{good:?} is accepted: {e}"));
        assert_eq!(c.logging.level, good);
    }
}

#[test]
fn a_state_dir_that_is_empty_or_relative_is_refused() {
    for bad in ["", "state", "./state", "~/docusearch"] {
        let err = load_text(&format!("state_dir = {bad:?}\n"), &[]).unwrap_err();
        assert!(
            err.contains("`state_dir`") && err.contains("an absolute path"),
            "{bad:?}: {err}"
        );
    }
    let c = load_text("state_dir = \"/var/tmp/docusearch\"\n", &[]).unwrap();
    assert_eq!(c.state_dir, std::path::PathBuf::from("/var/tmp/docusearch"));
}

#[test]
fn chroma_host_takes_a_host_a_host_and_port_or_a_url() {
    let url_of = |env: &[(&str, &str)]| match load_text("", env)
        .unwrap_or_else(|e| panic!("{env:?} is accepted: {e}"))
        .chroma_target()
    {
        ChromaTarget::Remote { url } => url,
        ChromaTarget::Managed => panic!("{env:?}: a remote server"),
    };
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("CHROMA_HOST", "chroma.lan")], "http://chroma.lan:8000"),
        (
            &[("CHROMA_HOST", "chroma.lan"), ("CHROMA_PORT", "8123")],
            "http://chroma.lan:8123",
        ),
        (
            &[("CHROMA_HOST", "127.0.0.1:19003")],
            "http://127.0.0.1:19003",
        ),
        (
            &[("CHROMA_HOST", "127.0.0.1:19003"), ("CHROMA_PORT", "19003")],
            "http://127.0.0.1:19003",
        ),
        (
            &[("CHROMA_HOST", "http://127.0.0.1")],
            "http://127.0.0.1:8000",
        ),
        (
            &[
                ("CHROMA_HOST", "http://127.0.0.1/"),
                ("CHROMA_PORT", "9000"),
            ],
            "http://127.0.0.1:9000",
        ),
        (
            &[("CHROMA_HOST", "https://chroma.example:8443")],
            "https://chroma.example:8443",
        ),
        (
            &[("CHROMA_HOST", "http://chroma.lan:80")],
            "http://chroma.lan",
        ),
        (&[("CHROMA_HOST", "::1")], "http://[::1]:8000"),
        (&[("CHROMA_HOST", "[::1]:8001")], "http://[::1]:8001"),
        (&[("CHROMA_HOST", "http://[::1]")], "http://[::1]:8000"),
        (&[("CHROMA_PORT", "8124")], "http://localhost:8124"),
    ];
    for (env, want) in cases {
        assert_eq!(url_of(env), *want, "{env:?}");
    }
}

#[test]
fn a_chroma_host_that_is_no_host_is_refused_naming_the_variable() {
    for bad in [
        "not a host!",
        "ftp://chroma.lan",
        "http://",
        "chroma.lan:port",
        "chroma.lan:99999",
        "chroma.lan:0",
        "a:b:c",
        "http://chroma.lan:99999",
        "chroma.lan/path",
    ] {
        let err = load_text("", &[("CHROMA_HOST", bad)]).unwrap_err();
        assert!(
            err.contains("environment variable CHROMA_HOST") && err.contains(&format!("{bad:?}")),
            "{bad:?}: {err}"
        );
    }
    let err = load_text(
        "",
        &[("CHROMA_HOST", "127.0.0.1:19003"), ("CHROMA_PORT", "8000")],
    )
    .unwrap_err();
    assert!(
        err.contains("CHROMA_HOST") && err.contains("CHROMA_PORT (8000)"),
        "{err}"
    );
    let err = load_text("", &[("CHROMA_PORT", "0")]).unwrap_err();
    assert!(err.contains("environment variable CHROMA_PORT"), "{err}");
    // The file's host is a host too.
    let err = load_text("[chroma]\nhost = \"http://10.0.0.5\"\n", &[]).unwrap_err();
    assert!(
        err.contains("`chroma.host`") && err.contains("chroma.url"),
        "{err}"
    );
}

#[test]
fn a_chroma_url_with_a_port_out_of_range_says_so() {
    let err = load_text("[chroma]\nurl = \"http://127.0.0.1:99999\"\n", &[]).unwrap_err();
    assert!(
        err.contains("`chroma.url`") && err.contains("a port from 1 to 65535"),
        "{err}"
    );
    let err = load_text("[chroma]\nurl = \"http://127.0.0.1:0\"\n", &[]).unwrap_err();
    assert!(err.contains("a port from 1 to 65535"), "{err}");
    let err = load_text("[chroma]\nurl = \"http://\"\n", &[]).unwrap_err();
    assert!(
        err.contains("`chroma.url`") && err.contains("no host"),
        "{err}"
    );
    let c = load_text("[chroma]\nurl = \"https://chroma.example/\"\n", &[]).unwrap();
    assert_eq!(
        c.chroma_target(),
        ChromaTarget::Remote {
            url: "https://chroma.example".into()
        }
    );
}

/// Runs the binary with `config` (and `env`), returns (exit code, stderr).
fn run_binary(config: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_docusearch-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("runs the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_refused_configuration_exits_78_and_says_so_once() {
    let here = tempfile::tempdir().unwrap();
    let config = here.path().join("config.toml");
    let state = format!("state_dir = {:?}\n", here.path().join("state"));
    std::fs::write(&config, format!("{state}[logging]\nlevel = \"verbose\"\n")).unwrap();
    let (code, stderr) = run_binary(&config, &[], &["status"]);
    assert_eq!(code, 78, "{stderr}");
    assert_eq!(
        stderr.matches("bad value for `logging.level`").count(),
        1,
        "{stderr}"
    );

    // A Chroma host the client cannot use is a configuration error too (it was exit 1, which
    // makes systemd restart the agent in a loop), naming the variable.
    std::fs::write(&config, &state).unwrap();
    for bad in ["http://", "127.0.0.1:19003:8000"] {
        let (code, stderr) = run_binary(&config, &[("CHROMA_HOST", bad)], &["status"]);
        assert_eq!(code, 78, "{bad}: {stderr}");
        assert_eq!(
            stderr.matches("environment variable CHROMA_HOST").count(),
            1,
            "{stderr}"
        );
    }
}

/// An error with a cause (the state store cannot be opened) is printed once, its cause once: not
/// logged and printed, not "X: X".
#[test]
fn an_error_and_its_cause_are_printed_once() {
    let here = tempfile::tempdir().unwrap();
    let state = here.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // A file where the store's folder should be.
    std::fs::write(state.join("state.sled"), b"not a folder").unwrap();
    let config = here.path().join("config.toml");
    std::fs::write(&config, format!("state_dir = {state:?}\n")).unwrap();
    let (code, stderr) = run_binary(&config, &[], &["status"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.matches("cannot open the state store").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}
