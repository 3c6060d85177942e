//! The checks of `doctor`: each says ✔ or ✘, what it found, and for a ✘ the fix. Every check
//! does the real thing (binds PDFium, asks Chroma for its version, starts a throw-away managed
//! server) rather than guessing from the configuration.

use std::path::{Path, PathBuf};

use crate::config::{ChromaTarget, Config, DeviceChoice, DtypeChoice};
use crate::embed::device;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found (✔) or what is wrong (✘).
    pub detail: String,
    /// What to do about a ✘.
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }
    pub fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check after the configuration, in the order a user fixes them.
pub fn run_checks(config: &Config) -> Vec<Check> {
    let chroma = check_chroma(config);
    // The recall check needs the server; a ✘ Chroma line already says why it is missing.
    let recall = chroma.ok.then(|| check_recall(config));
    let mut checks = vec![
        check_watched_folders(&config.watch),
        check_state_dir(&config.state_dir),
        check_pdfium(config.extract.pdfium_path.as_deref()),
        chroma,
    ];
    checks.extend(recall);
    checks.push(check_model(config));
    checks.push(check_device(config.model.device, config.model.dtype));
    checks
}

/// Records sampled per collection by the recall check.
const RECALL_SAMPLE: usize = 200;

/// Queries a sample of each collection's records with their own embedding: a record the server
/// does not return is unreachable by search (chroma-core/chroma#7758), which `repair` fixes.
fn check_recall(config: &Config) -> Check {
    const NAME: &str = "recall";
    if let ChromaTarget::Managed = config.chroma_target() {
        let dir = config.managed_chroma_dir();
        if crate::chroma::managed::running_server(&dir).is_none() && !dir.exists() {
            return Check::pass(NAME, "nothing indexed yet (no managed Chroma data)");
        }
    }
    let result = (|| -> anyhow::Result<(Vec<String>, bool)> {
        // The configured server, the agent's managed one, or one started on its data for now.
        let conn = crate::search::connect_for_reading(config)?;
        let client = conn
            .client
            .clone()
            .with_retry(crate::chroma::client::RetryPolicy::no_retry());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut parts = Vec::new();
        let mut bad = Vec::new();
        for name in [
            &config.chroma.visual_collection,
            &config.chroma.text_collection,
        ] {
            let Some(c) = rt.block_on(client.get_collection(name))? else {
                parts.push(format!("{name}: absent"));
                continue;
            };
            if rt.block_on(c.count())? == 0 {
                parts.push(format!("{name}: empty"));
                continue;
            }
            let r = rt.block_on(crate::search::repair::recall_check(
                &client,
                name,
                RECALL_SAMPLE,
            ))?;
            let returned = r.checked - r.unreachable.len();
            parts.push(format!(
                "{name}: {returned} of {} sampled records returned",
                r.checked
            ));
            if !r.is_complete() {
                bad.push(name.clone());
            }
        }
        Ok((parts, bad.is_empty()))
    })();
    match result {
        Ok((parts, true)) => Check::pass(NAME, parts.join("; ")),
        Ok((parts, false)) => Check::fail(
            NAME,
            format!("{} (records the server no longer finds: chroma-core/chroma#7758)", parts.join("; ")),
            "run `docusearch-agent repair` (stop the agent first so nothing writes during the rebuild)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!(
                "the recall check could not run: {}",
                crate::errors::describe(e.as_ref())
            ),
            "check the Chroma server's log, then run `docusearch-agent doctor` again",
        ),
    }
}

/// A missing folder is not a configuration error (a disk may be mounted later), but the agent
/// skips it, so it is a ✘ here.
fn check_watched_folders(watch: &crate::config::WatchConfig) -> Check {
    const NAME: &str = "watched folders";
    if watch.folders.is_empty() {
        return Check::pass(
            NAME,
            "none configured (watch.folders): `run` needs them on its command line",
        );
    }
    let missing = watch.missing_folders();
    if missing.is_empty() {
        let all: Vec<String> = watch
            .folders
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        return Check::pass(NAME, all.join(", "));
    }
    let names: Vec<String> = missing.iter().map(|f| f.display().to_string()).collect();
    Check::fail(
        NAME,
        format!(
            "{} of {} missing or not a folder (an unmounted disk?): {}; the agent watches the others, and each of these once it is there",
            missing.len(),
            watch.folders.len(),
            names.join(", ")
        ),
        "mount the disk or create the folder (a running agent picks it up within 30 s); or remove it from watch.folders in the config file",
    )
}

fn check_state_dir(dir: &Path) -> Check {
    const NAME: &str = "state directory";
    let probe = dir.join(".doctor-write-test");
    let result = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b"ok"))
        .and_then(|_| std::fs::remove_file(&probe));
    match result {
        Ok(()) => Check::pass(NAME, format!("{} is writable", dir.display())),
        Err(e) => Check::fail(
            NAME,
            format!("{} is not writable: {e}", dir.display()),
            "fix its permissions, or set `state_dir` in the config to a folder you own",
        ),
    }
}

fn check_pdfium(configured: Option<&Path>) -> Check {
    const NAME: &str = "PDFium";
    match crate::extract::pdfium::load(configured) {
        Ok((_lib, path)) => Check::pass(
            NAME,
            format!("{} loads ({})", path.display(), pdfium_version(&path)),
        ),
        Err(e) => {
            let text = e.to_string();
            let (detail, fix) = text
                .split_once("\nfix: ")
                .map(|(d, f)| (d.to_string(), f.to_string()))
                .unwrap_or((text.clone(), "run `scripts/setup`".into()));
            Check::fail(NAME, detail, fix)
        }
    }
}

/// The pypdfium2 wheel ships `version.json` beside the library; other builds say nothing.
fn pdfium_version(lib: &Path) -> String {
    let real = std::fs::canonicalize(lib).unwrap_or_else(|_| lib.to_path_buf());
    let json = real
        .parent()
        .map(|d| d.join("version.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    match json {
        Some(v) => format!("PDFium {}.{}.{}", v["major"], v["minor"], v["build"]),
        None => "version not recorded by this build".into(),
    }
}

fn check_chroma(config: &Config) -> Check {
    const NAME: &str = "Chroma";
    match config.chroma_target() {
        ChromaTarget::Remote { url } => match chroma_version(&url, &config.chroma) {
            Ok(v) => Check::pass(NAME, format!("{url} answers (Chroma API {v})")),
            Err(e) => Check::fail(
                NAME,
                format!("{url} is not reachable: {e}"),
                "start the server (`chroma run --path DIR --port PORT`), check chroma.url / CHROMA_HOST / CHROMA_PORT, or remove them to let the agent run its own",
            ),
        },
        ChromaTarget::Managed => {
            let data = config.managed_chroma_dir();
            if let Some(url) = crate::chroma::managed::running_server(&data) {
                return Check::pass(NAME, format!("the agent's managed server answers at {url}"));
            }
            let command = match crate::runtime_paths::find_chroma(config.chroma.command.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    return Check::fail(NAME, e.to_string().lines().next().unwrap_or("").to_string(), "run `scripts/setup`, or set chroma.url to a server of your own")
                }
            };
            // Proves the managed default works without touching the real data.
            let scratch = match tempfile_dir() {
                Ok(d) => d,
                Err(e) => return Check::fail(NAME, format!("no temporary directory: {e}"), "check TMPDIR"),
            };
            let result = crate::chroma::managed::ManagedChroma::start(&command, &scratch)
                .map_err(|e| e.to_string())
                .and_then(|server| chroma_version(&server.url(), &config.chroma));
            let _ = std::fs::remove_dir_all(&scratch);
            match result {
                Ok(v) => Check::pass(
                    NAME,
                    format!("no server configured; the managed one starts ({}, Chroma API {v})", command.display()),
                ),
                Err(e) => Check::fail(
                    NAME,
                    format!("the managed server ({}) does not start: {e}", command.display()),
                    "run `scripts/setup` again, or set chroma.url to a server of your own",
                ),
            }
        }
    }
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("docusearch-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Asks the server for its version once, without retries (doctor reports, it does not wait).
fn chroma_version(url: &str, config: &crate::config::ChromaConfig) -> Result<String, String> {
    use crate::chroma::client::{ChromaClient, RetryPolicy};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = ChromaClient::new(url, config)
        .map_err(|e| e.to_string())?
        .with_retry(RetryPolicy::no_retry());
    rt.block_on(client.version()).map_err(|e| e.to_string())
}

/// Resolves the model exactly as loading would, but offline: doctor reports, it never downloads.
fn check_model(config: &Config) -> Check {
    const NAME: &str = "model";
    let offline = crate::config::ModelConfig {
        offline: true,
        ..config.model.clone()
    };
    match crate::embed::loader::resolve(&offline) {
        Ok(files) => Check::pass(
            NAME,
            format!(
                "{} has its config, tokenizer and {} weight file(s)",
                files.id,
                files.weights.len()
            ),
        ),
        Err(crate::embed::EmbedError::NotInCache { repo, revision, cache, .. }) => Check::fail(
            NAME,
            format!(
                "{repo}@{revision} is not in the Hugging Face cache ({}); it would be downloaded (~6 GB) on the first job",
                cache.display()
            ),
            "run `docusearch-agent model fetch` once while online, or set model.name to a local checkpoint directory",
        ),
        Err(e) => Check::fail(
            NAME,
            e.to_string(),
            "point model.name / MODEL_NAME at a complete ColPali checkpoint directory, or a Hugging Face repo id",
        ),
    }
}

/// Selects the device exactly as loading the model does (a CUDA device is opened, not only
/// compiled in), and says which device and dtype, and why.
fn check_device(choice: DeviceChoice, dtype: DtypeChoice) -> Check {
    const NAME: &str = "device";
    match device::select(choice, dtype) {
        Ok(sel) => {
            let place = format!(
                "{}, {} ({})",
                device::device_name(&sel.device),
                device::dtype_name(sel.dtype),
                sel.reason
            );
            if sel.fell_back_to_cpu {
                Check::pass(
                    NAME,
                    format!("{place}: embedding will be slow (the agent logs a warning)"),
                )
            } else {
                Check::pass(NAME, place)
            }
        }
        Err(e) => {
            let feature = if choice == DeviceChoice::Cuda {
                "cuda"
            } else {
                "metal"
            };
            Check::fail(
                NAME,
                format!("{feature} was asked for (model.device / DEVICE) but cannot be used: {e}"),
                format!("build with `cargo build --release --features {feature}` (CUDA: `make cuda-build`) on a machine with that GPU and its driver, or set DEVICE=auto"),
            )
        }
    }
}
