//! Finding the programs and libraries the agent runs with but does not link: the PDFium shared
//! library and the `chroma` executable. `scripts/setup` installs both into a project-local Python
//! virtual environment and records where in `runtime.toml` under the data directory, so neither
//! the user nor the tests export anything.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What `scripts/setup` recorded (`<data dir>/runtime.toml`).
#[derive(Debug, Default, Deserialize)]
pub struct SetupRecord {
    pub chroma: Option<PathBuf>,
    pub pdfium: Option<PathBuf>,
    pub python: Option<PathBuf>,
}

/// `<data dir>/runtime.toml`, written by `scripts/setup`.
pub fn setup_record_path() -> Option<PathBuf> {
    crate::config::project_dirs().map(|d| d.data_dir().join("runtime.toml"))
}

pub fn setup_record() -> SetupRecord {
    setup_record_path()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| toml::from_str(&t).ok())
        .unwrap_or_default()
}

/// The virtual environment `scripts/setup` makes in a source checkout, known when this binary
/// was built from one (tests, `cargo run`).
fn checkout_venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv")
}

/// A search that found nothing: every place looked at, in order, for the error message.
#[derive(Debug, Clone)]
pub struct NotFound {
    pub what: &'static str,
    pub looked: Vec<(String, PathBuf)>,
}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} not found; looked in:", self.what)?;
        for (why, path) in &self.looked {
            writeln!(f, "  - {} ({why})", path.display())?;
        }
        write!(
            f,
            "fix: run `scripts/setup`, or set the path in the config file"
        )
    }
}

impl std::error::Error for NotFound {}

/// Walks candidates in order and returns the first that exists. The first `explicit` candidates
/// are settings the user made (config key, environment variable): when one is given but
/// missing, the search stops there rather than quietly using something else.
pub fn first_existing(
    what: &'static str,
    explicit: usize,
    candidates: Vec<(String, Option<PathBuf>)>,
) -> Result<PathBuf, NotFound> {
    let mut looked = Vec::new();
    for (i, (why, path)) in candidates.into_iter().enumerate() {
        let Some(path) = path else { continue };
        if path.is_file() {
            return Ok(path);
        }
        looked.push((why, path));
        if i < explicit {
            break;
        }
    }
    Err(NotFound { what, looked })
}

/// How many of the candidate lists' first entries are the user's own settings.
const EXPLICIT_SETTINGS: usize = 2;

/// The PDFium library's file name on this platform.
pub fn pdfium_library_name() -> &'static str {
    if cfg!(target_os = "macos") {
        "libpdfium.dylib"
    } else if cfg!(windows) {
        "pdfium.dll"
    } else {
        "libpdfium.so"
    }
}

/// PDFium: configured path, `PDFIUM_DYNAMIC_LIB_PATH` (a file or its folder), next to the
/// executable, then where `scripts/setup` put it.
pub fn find_pdfium(configured: Option<&Path>) -> Result<PathBuf, NotFound> {
    first_existing(
        "the PDFium library",
        EXPLICIT_SETTINGS,
        pdfium_candidates(configured),
    )
}

/// Where PDFium is looked for, in order, each with why.
pub fn pdfium_candidates(configured: Option<&Path>) -> Vec<(String, Option<PathBuf>)> {
    let name = pdfium_library_name();
    let as_file = |p: PathBuf| if p.is_dir() { p.join(name) } else { p };
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    vec![
        (
            "extract.pdfium_path in the config".into(),
            configured.map(Path::to_path_buf),
        ),
        (
            "PDFIUM_DYNAMIC_LIB_PATH".into(),
            std::env::var_os("PDFIUM_DYNAMIC_LIB_PATH").map(|v| as_file(PathBuf::from(v))),
        ),
        (
            "next to the executable".into(),
            exe_dir.map(|d| d.join(name)),
        ),
        ("recorded by scripts/setup".into(), setup_record().pdfium),
        (
            "scripts/setup's location in this checkout".into(),
            Some(checkout_venv().join("pdfium").join(name)),
        ),
    ]
}

/// The `chroma` executable for the managed server: configured, `CHROMA_BIN`, recorded by
/// `scripts/setup`, the checkout's virtual environment, then PATH.
pub fn find_chroma(configured: Option<&Path>) -> Result<PathBuf, NotFound> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chroma"))
            .find(|p| p.is_file())
    });
    first_existing(
        "the `chroma` server program",
        EXPLICIT_SETTINGS,
        vec![
            (
                "chroma.command in the config".into(),
                configured.map(Path::to_path_buf),
            ),
            (
                "CHROMA_BIN".into(),
                std::env::var_os("CHROMA_BIN").map(PathBuf::from),
            ),
            ("recorded by scripts/setup".into(), setup_record().chroma),
            (
                "scripts/setup's location in this checkout".into(),
                Some(checkout_venv().join("bin").join("chroma")),
            ),
            (
                "PATH".into(),
                on_path.or_else(|| Some(PathBuf::from("chroma (on PATH)"))),
            ),
        ],
    )
}

/// The Python of `scripts/setup`'s environment (for the checks that use the official client).
pub fn find_setup_python() -> Result<PathBuf, NotFound> {
    first_existing(
        "the Python of scripts/setup's environment",
        0,
        vec![
            ("recorded by scripts/setup".into(), setup_record().python),
            (
                "scripts/setup's location in this checkout".into(),
                Some(checkout_venv().join("bin").join("python")),
            ),
        ],
    )
}
