//! Configuration: parsed from TOML, overridden by the seed deployment's environment variables,
//! then validated once, so nothing downstream re-checks raw input.

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration was refused: always names the key (or variable), the value and what is
/// expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad value for `{key}`: {value:?} — expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
}

fn invalid(key: &str, value: impl std::fmt::Display, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// The whole configuration. Every key has a default; `config.example.toml` documents them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identifies this agent's documents in a shared Chroma. Default: the host name.
    pub agent_id: String,
    /// Where the sled store, the managed Chroma's data and logs live. Default: platform data dir.
    pub state_dir: PathBuf,
    pub watch: WatchConfig,
    pub chroma: ChromaConfig,
    pub model: ModelConfig,
    pub extract: ExtractConfig,
    pub pipeline: PipelineConfig,
    pub api: ApiConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Folders watched recursively.
    pub folders: Vec<PathBuf>,
    /// Glob patterns (relative to a watched folder) a file must match; empty = every supported type.
    pub include: Vec<String>,
    /// Glob patterns (relative to a watched folder) that are never indexed.
    pub exclude: Vec<String>,
    /// A file is processed once its size and mtime have not changed for this long, unless
    /// its writer was seen closing it (Linux) or it was moved in whole: then `settle_check_ms`.
    pub settle_ms: u64,
    /// How long a file closed by its writer (or renamed into a watched folder) must keep its
    /// size and mtime before it is read; doubled for each change seen meanwhile, up to
    /// `settle_ms`.
    pub settle_check_ms: u64,
    /// Safety-net full reconcile period, in seconds (0 = only at start and on overflow).
    pub rescan_interval_s: u64,
}

/// `chroma.multivector_encoding`: the record format's names (`f32-gzip-b64`, `f16-b64`).
pub use crate::types::MultivectorEncoding;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChromaConfig {
    /// Full base URL (`http://host:port` or `https://...`). Wins over host/port.
    pub url: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tenant: String,
    pub database: String,
    pub visual_collection: String,
    pub text_collection: String,
    /// Sent as `Authorization: Bearer` and `X-Chroma-Token`. Never logged.
    pub auth_token: Option<String>,
    pub multivector_encoding: MultivectorEncoding,
    /// Per-request timeout in seconds.
    pub timeout_s: u64,
    /// The `chroma` executable for the managed server (default: found by `scripts/setup`'s
    /// location, then PATH).
    pub command: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
    /// `mps` is accepted as a synonym, as the seed deployment used it.
    #[serde(alias = "mps")]
    Metal,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda),
            "metal" | "mps" => Some(Self::Metal),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// bf16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Hugging Face repo id, or a local directory with the merged layout.
    pub name: String,
    pub revision: String,
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub batch_size_visual: usize,
    pub batch_size_text: usize,
    /// Unload the model after this many idle seconds (0 = keep it loaded).
    pub idle_unload_s: u64,
    /// Never touch the network: use only what is in the Hugging Face cache.
    pub offline: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    pub render_dpi: u32,
    /// Words per text chunk.
    pub chunk_size: usize,
    /// Words shared by consecutive chunks.
    pub chunk_overlap: usize,
    pub max_file_mb: u64,
    pub max_pages: u32,
    /// Longest a single document may take to render, in seconds.
    pub render_timeout_s: u64,
    /// Longest text kept per chunk, in characters.
    pub max_chunk_chars: usize,
    /// Address-space bound for the isolated renderer, in MiB (0 = none).
    pub worker_memory_mb: u64,
    /// The PDFium shared library (default: `PDFIUM_DYNAMIC_LIB_PATH`, next to the executable,
    /// then `scripts/setup`'s location).
    pub pdfium_path: Option<PathBuf>,
    /// LibreOffice's `soffice` (default: PATH, then /Applications/LibreOffice.app).
    pub libreoffice: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Bounded queue lengths between stages (pages).
    pub queue_pages: usize,
    /// Attempts before a job is marked failed.
    pub max_attempts: u32,
    /// First retry delay in seconds; doubles each attempt.
    pub retry_base_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub bind: String,
    pub port: u16,
    /// Binding anything but loopback must be asked for explicitly.
    pub allow_non_loopback: bool,
    /// Off loopback, the web page (`/`, `/api/...`) answers only requests carrying this token
    /// (`?token=` or `Authorization: Bearer`); without one it is not served there. Never logged.
    pub token: Option<String>,
    /// The web page's thumbnail cache (under the state directory) is kept below this size.
    pub thumbnail_cache_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A `tracing` filter: `info`, `debug`, `docusearch_agent=debug,info`, ...
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_id: default_agent_id(),
            state_dir: default_state_dir(),
            watch: WatchConfig::default(),
            chroma: ChromaConfig::default(),
            model: ModelConfig::default(),
            extract: ExtractConfig::default(),
            pipeline: PipelineConfig::default(),
            api: ApiConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

impl WatchConfig {
    /// The configured folders that do not exist now (or are not folders): an unmounted disk,
    /// a folder removed since. Checked when asked, not at load time.
    pub fn missing_folders(&self) -> Vec<PathBuf> {
        self.folders
            .iter()
            .filter(|f| !f.is_dir())
            .cloned()
            .collect()
    }
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            folders: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
            settle_ms: 2000,
            settle_check_ms: 200,
            rescan_interval_s: 3600,
        }
    }
}

impl Default for ChromaConfig {
    fn default() -> Self {
        ChromaConfig {
            url: None,
            host: None,
            port: None,
            tenant: "default_tenant".into(),
            database: "default_database".into(),
            visual_collection: "visual_collection".into(),
            text_collection: "text_collection".into(),
            auth_token: None,
            multivector_encoding: MultivectorEncoding::F32GzipB64,
            timeout_s: 60,
            command: None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "vidore/colpali-v1.2-merged".into(),
            revision: "main".into(),
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            batch_size_visual: 4,
            batch_size_text: 8,
            idle_unload_s: 600,
            offline: false,
        }
    }
}

impl Default for ExtractConfig {
    fn default() -> Self {
        ExtractConfig {
            render_dpi: 150,
            chunk_size: 250,
            chunk_overlap: 50,
            max_file_mb: 100,
            max_pages: 2000,
            render_timeout_s: 300,
            max_chunk_chars: 20_000,
            worker_memory_mb: 4096,
            pdfium_path: None,
            libreoffice: None,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            queue_pages: 32,
            max_attempts: 5,
            retry_base_s: 10,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            bind: "127.0.0.1".into(),
            port: 8002,
            allow_non_loopback: false,
            token: None,
            thumbnail_cache_mb: 256,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

fn default_agent_id() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The platform's per-user data directory for the agent (`~/.local/share/docusearch-agent`,
/// `~/Library/Application Support/com.docusearch.agent`).
pub fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("com", "docusearch", "docusearch-agent")
}

fn default_state_dir() -> PathBuf {
    project_dirs()
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".docusearch-agent"))
}

/// The default config file: `~/.config/docusearch-agent/config.toml` on Linux,
/// `~/Library/Application Support/com.docusearch.agent/config.toml` on macOS.
pub fn default_config_path() -> Option<PathBuf> {
    project_dirs().map(|d| d.config_dir().join("config.toml"))
}

/// Where Chroma lives, once resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChromaTarget {
    /// A server someone else runs.
    Remote { url: String },
    /// No URL and no host/port: the agent runs `chroma run` itself under its state directory.
    Managed,
}

impl Config {
    /// Read `path` (or the default location when it exists), apply the environment, validate.
    /// `env` is the environment lookup (tests pass their own).
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => Self::from_file(p)?,
            None => match default_config_path().filter(|p| p.is_file()) {
                Some(p) => Self::from_file(&p)?,
                None => Config::default(),
            },
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parse TOML text. Unknown keys are refused (the message names them).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// The seed deployment's environment variables win over the file.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(
            var: &str,
            value: &str,
            expected: &str,
        ) -> Result<T, ConfigError> {
            value
                .trim()
                .parse::<T>()
                .map_err(|_| invalid(&format!("environment variable {var}"), value, expected))
        }
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let env_port = match get("CHROMA_PORT") {
            Some(v) => Some(
                num::<u16>("CHROMA_PORT", &v, "a TCP port number (1-65535)").and_then(
                    |p| match p {
                        0 => Err(invalid(
                            "environment variable CHROMA_PORT",
                            &v,
                            "a TCP port number (1-65535)",
                        )),
                        p => Ok(p),
                    },
                )?,
            ),
            None => None,
        };
        // Either variable replaces a URL from the file.
        match get("CHROMA_HOST") {
            Some(v) => match parse_chroma_host(&v, env_port)? {
                ChromaHost::Url(url) => {
                    self.chroma.url = Some(url);
                    self.chroma.host = None;
                    self.chroma.port = None;
                }
                ChromaHost::Host { host, port } => {
                    self.chroma.url = None;
                    self.chroma.host = Some(host);
                    if port.is_some() {
                        self.chroma.port = port;
                    }
                }
            },
            None => {
                if env_port.is_some() {
                    self.chroma.url = None;
                    self.chroma.port = env_port;
                }
            }
        }
        if let Some(v) = get("DEVICE") {
            self.model.device = DeviceChoice::parse(v.trim()).ok_or_else(|| {
                invalid(
                    "environment variable DEVICE",
                    &v,
                    "one of auto, metal, mps, cuda, cpu",
                )
            })?;
        }
        if let Some(v) = get("MODEL_NAME") {
            self.model.name = v.trim().to_string();
        }
        if let Some(v) = get("BATCH_SIZE_VISUAL") {
            self.model.batch_size_visual = num("BATCH_SIZE_VISUAL", &v, "a positive integer")?;
        }
        if let Some(v) = get("BATCH_SIZE_TEXT") {
            self.model.batch_size_text = num("BATCH_SIZE_TEXT", &v, "a positive integer")?;
        }
        if let Some(v) = get("TEXT_CHUNK_SIZE") {
            self.extract.chunk_size = num("TEXT_CHUNK_SIZE", &v, "a positive number of words")?;
        }
        if let Some(v) = get("TEXT_CHUNK_OVERLAP") {
            self.extract.chunk_overlap = num(
                "TEXT_CHUNK_OVERLAP",
                &v,
                "a number of words below TEXT_CHUNK_SIZE",
            )?;
        }
        if let Some(v) = get("PAGE_RENDER_DPI") {
            self.extract.render_dpi = num("PAGE_RENDER_DPI", &v, "dots per inch, 36 to 600")?;
        }
        Ok(())
    }

    /// Checks that serde cannot express. Each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.agent_id.trim().is_empty() {
            return Err(invalid("agent_id", &self.agent_id, "a non-empty name"));
        }
        if self.agent_id.contains('\0') {
            return Err(invalid(
                "agent_id",
                &self.agent_id,
                "a name without NUL bytes",
            ));
        }
        // Relative, it would follow the working directory of whoever starts the agent.
        if !self.state_dir.is_absolute() {
            let example = default_state_dir();
            let expected = if example.is_absolute() {
                format!("an absolute path, such as {}", example.display())
            } else {
                "an absolute path".to_string()
            };
            return Err(invalid(
                "state_dir",
                self.state_dir.display(),
                &format!("{expected} (`~` is not expanded)"),
            ));
        }
        // A watched folder that is missing is not refused: it may be on a disk that is not
        // mounted yet. `run` skips it with a warning, `doctor` and `status` report it.
        for (key, globs) in [
            ("watch.include", &self.watch.include),
            ("watch.exclude", &self.watch.exclude),
        ] {
            for g in globs {
                globset::Glob::new(g)
                    .map_err(|e| invalid(key, g, &format!("a glob pattern ({e})")))?;
            }
        }
        if let Some(url) = &self.chroma.url {
            parse_http_url(url).map_err(|expected| invalid("chroma.url", url, &expected))?;
        }
        if let Some(host) = &self.chroma.host {
            if !is_host(host) {
                return Err(invalid(
                    "chroma.host",
                    host,
                    "a host name or IP address without scheme or port (a URL goes in chroma.url, a port in chroma.port)",
                ));
            }
        }
        if self.chroma.port == Some(0) {
            return Err(invalid("chroma.port", 0, "a TCP port number (1-65535)"));
        }
        for (key, v) in [
            ("chroma.tenant", &self.chroma.tenant),
            ("chroma.database", &self.chroma.database),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, v, "a non-empty name"));
            }
        }
        for (key, v) in [
            ("chroma.visual_collection", &self.chroma.visual_collection),
            ("chroma.text_collection", &self.chroma.text_collection),
        ] {
            // Chroma's own rule for collection names.
            let valid = (3..=512).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
            if !valid {
                return Err(invalid(
                    key,
                    v,
                    "3-512 characters of [a-zA-Z0-9._-], starting and ending with a letter or digit",
                ));
            }
        }
        if self.chroma.visual_collection == self.chroma.text_collection {
            return Err(invalid(
                "chroma.text_collection",
                &self.chroma.text_collection,
                "a name different from chroma.visual_collection",
            ));
        }
        if self.chroma.timeout_s == 0 {
            return Err(invalid(
                "chroma.timeout_s",
                0,
                "a positive number of seconds",
            ));
        }
        if self.model.name.trim().is_empty() {
            return Err(invalid(
                "model.name",
                &self.model.name,
                "a Hugging Face repo id or a local directory",
            ));
        }
        if self.model.batch_size_visual == 0 {
            return Err(invalid(
                "model.batch_size_visual (BATCH_SIZE_VISUAL)",
                0,
                "a positive integer",
            ));
        }
        if self.model.batch_size_text == 0 {
            return Err(invalid(
                "model.batch_size_text (BATCH_SIZE_TEXT)",
                0,
                "a positive integer",
            ));
        }
        if !(36..=600).contains(&self.extract.render_dpi) {
            return Err(invalid(
                "extract.render_dpi (PAGE_RENDER_DPI)",
                self.extract.render_dpi,
                "dots per inch, 36 to 600",
            ));
        }
        if self.extract.chunk_size == 0 {
            return Err(invalid(
                "extract.chunk_size (TEXT_CHUNK_SIZE)",
                0,
                "a positive number of words",
            ));
        }
        if self.extract.chunk_overlap >= self.extract.chunk_size {
            return Err(invalid(
                "extract.chunk_overlap (TEXT_CHUNK_OVERLAP)",
                self.extract.chunk_overlap,
                &format!(
                    "fewer words than extract.chunk_size ({})",
                    self.extract.chunk_size
                ),
            ));
        }
        if self.extract.max_file_mb == 0 {
            return Err(invalid("extract.max_file_mb", 0, "a positive number of MB"));
        }
        if self.extract.max_pages == 0 {
            return Err(invalid(
                "extract.max_pages",
                0,
                "a positive number of pages",
            ));
        }
        if self.extract.render_timeout_s == 0 {
            return Err(invalid(
                "extract.render_timeout_s",
                0,
                "a positive number of seconds",
            ));
        }
        if self.pipeline.queue_pages == 0 {
            return Err(invalid(
                "pipeline.queue_pages",
                0,
                "a positive number of pages",
            ));
        }
        if self.pipeline.max_attempts == 0 {
            return Err(invalid("pipeline.max_attempts", 0, "at least 1"));
        }
        let bind: std::net::IpAddr = self.api.bind.parse().map_err(|_| {
            invalid(
                "api.bind",
                &self.api.bind,
                "an IP address such as 127.0.0.1",
            )
        })?;
        if !bind.is_loopback() && !self.api.allow_non_loopback {
            return Err(invalid(
                "api.bind",
                &self.api.bind,
                "a loopback address (127.0.0.1 or ::1); set api.allow_non_loopback = true to expose the status API",
            ));
        }
        if self
            .api
            .token
            .as_deref()
            .is_some_and(|t| t.trim().len() < 16)
        {
            return Err(invalid(
                "api.token",
                "(hidden)",
                "at least 16 characters (`openssl rand -hex 16` makes one)",
            ));
        }
        if self.api.thumbnail_cache_mb == 0 {
            return Err(invalid("api.thumbnail_cache_mb", 0, "at least 1"));
        }
        if !["text", "json"].contains(&self.logging.format.as_str()) {
            return Err(invalid(
                "logging.format",
                &self.logging.format,
                "`text` or `json`",
            ));
        }
        check_log_filter(&self.logging.level)
            .map_err(|expected| invalid("logging.level", &self.logging.level, &expected))?;
        Ok(())
    }

    /// Remote server from url or host/port; managed otherwise.
    pub fn chroma_target(&self) -> ChromaTarget {
        if let Some(url) = &self.chroma.url {
            return ChromaTarget::Remote {
                url: url.trim_end_matches('/').to_string(),
            };
        }
        match (&self.chroma.host, self.chroma.port) {
            (None, None) => ChromaTarget::Managed,
            (host, port) => {
                let host = match host.as_deref().unwrap_or("localhost") {
                    h if h.parse::<Ipv6Addr>().is_ok() => format!("[{h}]"),
                    h => h.to_string(),
                };
                let port = port.unwrap_or(DEFAULT_CHROMA_PORT);
                ChromaTarget::Remote {
                    url: format!("http://{host}:{port}"),
                }
            }
        }
    }

    /// The sled store's directory.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("state.sled")
    }

    /// The web page's thumbnail cache.
    pub fn thumbnail_dir(&self) -> PathBuf {
        self.state_dir.join("thumbnails")
    }

    /// The managed Chroma server's data directory.
    pub fn managed_chroma_dir(&self) -> PathBuf {
        self.state_dir.join("chroma")
    }
}

/// Chroma's own port, for a host given without one (as the seed deployment's client did).
pub const DEFAULT_CHROMA_PORT: u16 = 8000;

const CHROMA_HOST_EXPECTED: &str =
    "a host name or IP address, host:port, or an http:// or https:// URL";

/// What `CHROMA_HOST` says.
enum ChromaHost {
    /// It was a URL: the whole address, its port resolved.
    Url(String),
    Host {
        host: String,
        port: Option<u16>,
    },
}

/// `CHROMA_HOST` as the seed deployment's client took it: `chroma.lan`, `10.0.0.5:8001`,
/// `[::1]:8001`, or `http(s)://host[:port]`. A URL without a port gets `CHROMA_PORT`, else
/// [`DEFAULT_CHROMA_PORT`]. A port given in both variables must be the same.
fn parse_chroma_host(value: &str, env_port: Option<u16>) -> Result<ChromaHost, ConfigError> {
    let bad = |expected: &str| invalid("environment variable CHROMA_HOST", value, expected);
    let port_of = |given: Option<u16>| match (given, env_port) {
        (Some(a), Some(b)) if a != b => Err(bad(&format!(
            "the same port as CHROMA_PORT ({b}), or none: set the port in one of them"
        ))),
        (given, env) => Ok(given.or(env)),
    };
    let v = value.trim();
    if v.contains("://") {
        let (mut url, explicit_port) = parse_http_url(v).map_err(|expected| bad(&expected))?;
        if !explicit_port {
            let port = port_of(None)?.unwrap_or(DEFAULT_CHROMA_PORT);
            url.set_port(Some(port))
                .map_err(|()| bad(CHROMA_HOST_EXPECTED))?;
        } else {
            port_of(url.port_or_known_default())?;
        }
        return Ok(ChromaHost::Url(
            url.as_str().trim_end_matches('/').to_string(),
        ));
    }
    let (host, port) = split_host_port(v).ok_or_else(|| bad(CHROMA_HOST_EXPECTED))?;
    if !is_host(host) {
        return Err(bad(CHROMA_HOST_EXPECTED));
    }
    let port = match port {
        Some(p) => Some(parse_port(p).ok_or_else(|| {
            bad(&format!(
                "a port from 1 to 65535 after the host ({p:?} is not one)"
            ))
        })?),
        None => None,
    };
    Ok(ChromaHost::Host {
        host: host.to_string(),
        port: port_of(port)?,
    })
}

/// An `http(s)://` URL with a host, and whether it names its port. The error is what was
/// expected instead, with the reason.
fn parse_http_url(v: &str) -> Result<(reqwest::Url, bool), String> {
    const EXPECTED: &str = "an http:// or https:// URL, such as http://127.0.0.1:8000";
    let Some((scheme, rest)) = v.split_once("://") else {
        return Err(EXPECTED.into());
    };
    if !["http", "https"]
        .iter()
        .any(|s| scheme.eq_ignore_ascii_case(s))
    {
        return Err(EXPECTED.into());
    }
    // The URL parser only says "invalid port number", and drops a port that is the scheme's
    // default: read the authority first.
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = split_host_port(host_port).ok_or_else(|| {
        format!("{EXPECTED} (its host {host_port:?} is not a host name, IP address or host:port)")
    })?;
    if host.is_empty() {
        return Err(format!("{EXPECTED} (it has no host)"));
    }
    if let Some(p) = port {
        parse_port(p).ok_or_else(|| {
            format!("a port from 1 to 65535 in the URL ({p:?} is out of range or not a number)")
        })?;
    }
    let url = reqwest::Url::parse(v).map_err(|e| format!("{EXPECTED} ({e})"))?;
    Ok((url, port.is_some()))
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address → host (without brackets)
/// and port text. `None` when it is none of these.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<Ipv6Addr>().ok()?;
        return match after {
            "" => Some((host, None)),
            a => a.strip_prefix(':').map(|p| (host, Some(p))),
        };
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Some((s, None));
    }
    match s.split_once(':') {
        None => Some((s, None)),
        Some((_, p)) if p.contains(':') => None,
        Some((h, p)) => Some((h, Some(p))),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|p| *p != 0)
}

/// A host name or an IP address, nothing around it.
fn is_host(h: &str) -> bool {
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    // One trailing dot is a fully qualified name.
    let name = h.strip_suffix('.').unwrap_or(h);
    name.len() <= 253 && name.split('.').all(label_ok)
}

/// `logging.level`: a level, or a `tracing` filter whose every directive sets a level. A bare
/// word that is not a level (`verbose`) is a valid filter all the same, selecting a target of
/// that name, so every other line would be silenced.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const EXPECTED: &str = "a level (off, error, warn, info, debug, trace) or a tracing filter such as `docusearch_agent=debug,info`";
    if filter.trim().is_empty() {
        return Err(EXPECTED.into());
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
        return Err(format!("{EXPECTED} ({e})"));
    }
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && d.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return Err(format!(
                "{EXPECTED}; `{d}` is not a level (a target on its own would hide every other line: write `{d}=trace` if that is meant)"
            ));
        }
    }
    Ok(())
}
