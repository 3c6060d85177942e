//! Finding a checkpoint's files: a local directory, or a Hugging Face repo through `hf-hub`
//! (the shared cache, a progress bar while downloading, only the cache when offline).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::config::ModelConfig;

use super::EmbedError;

/// The files of one checkpoint, on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `repo@revision` or the local directory: what Chroma's `model` metadata records.
    pub id: String,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    /// One file, or every shard named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
    /// `preprocessor_config.json`, when the checkpoint has one.
    pub preprocessor: Option<PathBuf>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const PREPROCESSOR: &str = "preprocessor_config.json";

/// Where a model comes from.
enum Source<'a> {
    Dir(&'a Path),
    Hub { repo: &'a str, revision: &'a str },
}

fn source(cfg: &ModelConfig) -> Source<'_> {
    let p = Path::new(&cfg.name);
    // A path that exists, or that looks like one, is a directory; otherwise a repo id.
    if p.is_dir()
        || cfg.name.starts_with('.')
        || cfg.name.starts_with('/')
        || cfg.name.starts_with('~')
    {
        Source::Dir(p)
    } else {
        Source::Hub {
            repo: &cfg.name,
            revision: &cfg.revision,
        }
    }
}

/// The shard files named in an index's `weight_map`, in first-seen order.
fn shards_of_index(index: &Path) -> Result<Vec<String>, EmbedError> {
    let bad = |message: String| EmbedError::Weights {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for f in map.values().filter_map(|f| f.as_str()) {
        if !files.iter().any(|g| g == f) {
            files.push(f.to_string());
        }
    }
    Ok(files)
}

/// Every file the model needs, downloading what is missing unless offline.
pub fn resolve(cfg: &ModelConfig) -> Result<ModelFiles, EmbedError> {
    match source(cfg) {
        Source::Dir(dir) => resolve_dir(dir),
        Source::Hub { repo, revision } => {
            let config = hub_file(cfg, repo, revision, "config.json")?;
            let tokenizer = hub_file(cfg, repo, revision, "tokenizer.json")?;
            let weights = match hub_file(cfg, repo, revision, INDEX) {
                Ok(index) => shards_of_index(&index)?
                    .iter()
                    .map(|f| hub_file(cfg, repo, revision, f))
                    .collect::<Result<Vec<_>, _>>()?,
                Err(EmbedError::NotOnHub { .. }) => vec![hub_file(cfg, repo, revision, SINGLE)?],
                Err(e @ EmbedError::NotInCache { .. }) => {
                    match hub_file(cfg, repo, revision, SINGLE) {
                        Ok(p) => vec![p],
                        Err(_) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            let preprocessor = match hub_file(cfg, repo, revision, PREPROCESSOR) {
                Ok(p) => Some(p),
                Err(EmbedError::NotOnHub { .. }) => None,
                // Offline, a checkpoint fetched before may lack it: the defaults are SigLIP's.
                Err(EmbedError::NotInCache { .. }) => None,
                Err(e) => return Err(e),
            };
            Ok(ModelFiles {
                id: format!("{repo}@{revision}"),
                config,
                tokenizer,
                weights,
                preprocessor,
            })
        }
    }
}

/// Only `config.json` (no weights): what extraction needs to know the image size.
pub fn resolve_config(cfg: &ModelConfig) -> Result<PathBuf, EmbedError> {
    match source(cfg) {
        Source::Dir(dir) if !dir.is_dir() => Err(EmbedError::LocalDirMissing(dir.to_path_buf())),
        Source::Dir(dir) => local_file(dir, "config.json"),
        Source::Hub { repo, revision } => hub_file(cfg, repo, revision, "config.json"),
    }
}

fn local_file(dir: &Path, name: &str) -> Result<PathBuf, EmbedError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(EmbedError::LocalFileMissing {
            dir: dir.to_path_buf(),
            file: name.to_string(),
        })
    }
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles, EmbedError> {
    if !dir.is_dir() {
        return Err(EmbedError::LocalDirMissing(dir.to_path_buf()));
    }
    let config = local_file(dir, "config.json")?;
    let tokenizer = local_file(dir, "tokenizer.json")?;
    let weights = if dir.join(INDEX).is_file() {
        shards_of_index(&dir.join(INDEX))?
            .iter()
            .map(|f| local_file(dir, f))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![local_file(dir, SINGLE)?]
    };
    let id = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    Ok(ModelFiles {
        id: id.display().to_string(),
        config,
        tokenizer,
        weights,
        preprocessor: Some(dir.join(PREPROCESSOR)).filter(|p| p.is_file()),
    })
}

fn repo(repo: &str, revision: &str) -> Repo {
    Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
}

/// One file of a hub repo: from the shared cache, or downloaded into it (with a progress bar).
fn hub_file(
    cfg: &ModelConfig,
    repo_id: &str,
    revision: &str,
    file: &str,
) -> Result<PathBuf, EmbedError> {
    let cache = Cache::from_env();
    if let Some(p) = cache.repo(repo(repo_id, revision)).get(file) {
        return Ok(p);
    }
    // HF_HUB_OFFLINE is the hub tools' own switch; honour it as well as `model.offline`.
    let env_offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if cfg.offline || env_offline {
        return Err(EmbedError::NotInCache {
            repo: repo_id.to_string(),
            revision: revision.to_string(),
            file: file.to_string(),
            cache: cache.path().clone(),
        });
    }
    download(repo_id, revision, file)
}

/// Downloads into the shared cache. hf-hub's client is async: it runs on a private runtime in
/// its own thread, so this works whether or not the caller is inside a tokio runtime.
fn download(repo_id: &str, revision: &str, file: &str) -> Result<PathBuf, EmbedError> {
    let (r, rev, f) = (repo_id.to_string(), revision.to_string(), file.to_string());
    let joined = std::thread::spawn(move || -> Result<PathBuf, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let api = hf_hub::api::tokio::ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| e.to_string())?;
            api.repo(repo(&r, &rev)).download(&f).await.map_err(|e| {
                // Keep the whole chain: the useful part (connection refused, 404) is a source.
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    let part = s.to_string();
                    if !msg.contains(&part) {
                        msg.push_str(": ");
                        msg.push_str(&part);
                    }
                    src = s.source();
                }
                msg
            })
        })
    })
    .join();
    let message = match joined {
        Ok(Ok(p)) => return Ok(p),
        Ok(Err(m)) => m,
        Err(_) => "the download thread panicked".to_string(),
    };
    if message.contains("404") {
        Err(EmbedError::NotOnHub {
            repo: repo_id.to_string(),
            revision: revision.to_string(),
            file: file.to_string(),
        })
    } else {
        Err(EmbedError::Download {
            repo: repo_id.to_string(),
            revision: revision.to_string(),
            file: file.to_string(),
            message,
        })
    }
}
