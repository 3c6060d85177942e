//! `status`: what is indexed, queued and failed, whether the agent runs, the model, Chroma.
//! Works whether or not the agent is running: a running agent holds the store's lock, so its
//! pid file (and, when issue 7's API is there, its HTTP status) answers instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::api::{CounterSnapshot, DocumentProgress, Health, ModelStatus};
use crate::config::{ChromaTarget, Config};
use crate::state::{FileCounts, QueueCounts, Store, StoreError};

/// `state_dir/agent.pid`: "PID API_PORT", written by `run` and removed when it stops.
pub fn pid_file(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("agent.pid")
}

/// Written at start; removed on drop.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn write(cfg: &Config) -> std::io::Result<PidFile> {
        let path = pid_file(cfg);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, format!("{} {}\n", std::process::id(), cfg.api.port))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pid of a running agent, from its pid file, if that process is alive.
pub fn running_agent(cfg: &Config) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file(cfg)).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    // Signal 0 checks that the process exists without touching it.
    let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    alive.then_some(pid as u32)
}

/// The state store, or the running agent that holds it (one process owns a store).
pub enum StoreAccess {
    Store(Store),
    /// A running agent holds the store; ask it (its status API) instead. `label` is
    /// " (pid N)" when its pid is known, for messages.
    HeldByAgent {
        label: String,
    },
}

/// Opens the store at `store_dir` (normally `cfg.store_dir()`), or says which running agent
/// holds it: the one place commands decide between "the store" and "ask the agent".
pub fn open_or_held(cfg: &Config, store_dir: &Path) -> Result<StoreAccess, StoreError> {
    match Store::open(store_dir) {
        Ok(s) => Ok(StoreAccess::Store(s)),
        Err(StoreError::Locked { .. }) => Ok(StoreAccess::HeldByAgent {
            label: running_agent_label(cfg),
        }),
        Err(e) => Err(e),
    }
}

/// " (pid N)" when the agent's pid is known, for messages about the running agent.
pub fn running_agent_label(cfg: &Config) -> String {
    running_agent(cfg)
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default()
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub agent_running: bool,
    pub agent_pid: Option<u32>,
    /// Set when the numbers below come from the store (the agent is not running).
    pub files: Option<FileCounts>,
    pub queue: Option<QueueCounts>,
    pub failures: Vec<Failure>,
    /// The running agent's model; `not_loaded` when no agent runs.
    pub model: ModelStatus,
    /// Documents the running agent is working on, with their stage.
    pub in_progress: Vec<DocumentProgress>,
    /// What the running agent counted since it started (the numbers of its `/metrics`).
    pub counters: Option<CounterSnapshot>,
    /// The running agent's `/health`.
    pub health: Option<Health>,
    pub chroma: ChromaStatus,
    /// Watched folders that are missing now (an unmounted disk): as the running agent says,
    /// which watches each again once it is there, or as found when no agent runs.
    pub missing_folders: Vec<PathBuf>,
    /// Why the running agent polls its folders instead of using the OS's file events.
    pub watch_polling: Option<String>,
    /// What could not be told, and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ChromaStatus {
    /// `managed` or the configured URL.
    pub target: String,
    pub url: Option<String>,
    pub reachable: bool,
}

async fn heartbeat(url: &str, chroma: &crate::config::ChromaConfig) -> bool {
    let token = chroma.auth_token.as_deref();
    crate::chroma::client::probe(url, token, Duration::from_secs(2))
        .await
        .is_ok()
}

async fn chroma_status(cfg: &Config) -> ChromaStatus {
    match cfg.chroma_target() {
        ChromaTarget::Remote { url } => ChromaStatus {
            target: url.clone(),
            reachable: heartbeat(&url, &cfg.chroma).await,
            url: Some(url),
        },
        ChromaTarget::Managed => {
            let url = crate::chroma::managed::running_server(&cfg.managed_chroma_dir());
            ChromaStatus {
                target: "managed".into(),
                reachable: url.is_some(),
                url,
            }
        }
    }
}

/// The running agent's own snapshot and health, through its status API.
/// The running agent's `/status` and `/health`, or why they could not be had.
async fn live_status(cfg: &Config) -> Result<(crate::api::AgentStatus, Option<Health>), String> {
    let client =
        crate::api::ApiClient::new(&cfg.api, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let status = match client.status().await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(format!(
                "nothing answers on its status API port {} (api.enabled = false, or another port?)",
                cfg.api.port
            ))
        }
        Err(e) => return Err(format!("its status API did not answer: {e}")),
    };
    let health = client.health().await.ok().flatten();
    Ok((status, health))
}

/// Gathers the status. `store_dir` is normally `cfg.store_dir()`.
pub async fn gather(cfg: &Config, store_dir: &Path) -> Result<Status, StoreError> {
    let chroma = chroma_status(cfg).await;
    let mut status = Status {
        agent_running: false,
        agent_pid: None,
        files: None,
        queue: None,
        failures: Vec::new(),
        model: ModelStatus {
            name: cfg.model.name.clone(),
            ..Default::default()
        },
        in_progress: Vec::new(),
        counters: None,
        health: None,
        chroma,
        missing_folders: cfg.watch.missing_folders(),
        watch_polling: None,
        notes: Vec::new(),
    };
    if !store_dir.exists() {
        status
            .notes
            .push("nothing indexed yet: the state store does not exist".into());
        status.files = Some(FileCounts::default());
        status.queue = Some(QueueCounts::default());
        return Ok(status);
    }
    match open_or_held(cfg, store_dir)? {
        StoreAccess::Store(store) => {
            status.files = Some(store.file_counts()?);
            status.queue = Some(store.queue_counts()?);
            status.failures = store
                .failures()?
                .into_iter()
                .map(|(path, reason)| Failure { path, reason })
                .collect();
            status.agent_pid = running_agent(cfg);
            status.agent_running = status.agent_pid.is_some();
        }
        StoreAccess::HeldByAgent { .. } => {
            status.agent_running = true;
            status.agent_pid = running_agent(cfg);
            match live_status(cfg).await {
                Ok((live, health)) => {
                    status.health = health;
                    status.agent_pid = Some(live.pid);
                    status.missing_folders = live.missing_folders.clone();
                    status.watch_polling = live.watch_polling.clone();
                    status.files = Some(FileCounts {
                        indexed: live.indexed.files as usize,
                        pages: live.indexed.pages,
                        chunks: live.indexed.chunks,
                        with_error: live.queue.failed as usize,
                    });
                    status.queue = Some(QueueCounts {
                        queued: live.queue.queued as usize,
                        in_progress: live.queue.in_progress as usize,
                        failed: live.queue.failed as usize,
                    });
                    status.failures = live
                        .failures
                        .iter()
                        .map(|f| Failure { path: f.path.clone(), reason: f.reason.clone() })
                        .collect();
                    status.model = live.model.clone();
                    status.in_progress = live.in_progress.clone();
                    status.counters = Some(live.counters.clone());
                    if !live.chroma.url.is_empty() {
                        status.chroma.url = Some(live.chroma.url.clone());
                    }
                    if let Some(r) = live.chroma.reachable {
                        status.chroma.reachable = r;
                    }
                }
                Err(why) => status.notes.push(format!(
                    "the agent is running{} and holds the state store, but {why}, so its counts cannot be shown",
                    status.agent_pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                )),
            }
        }
    }
    Ok(status)
}
