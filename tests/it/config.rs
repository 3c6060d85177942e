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
