//! What `GET /status` returns: a snapshot of the agent the pipeline keeps up to date. The same
//! types are read back by `docusearch-agent status` when an agent is running.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::telemetry::{
    CounterSnapshot, DocStage, DocumentProgress, ModelState, ModelStatus, TaskFailure,
};
use crate::types::DocId;

/// How many recent documents `/status` lists.
pub const RECENT_DOCUMENTS: usize = 50;
/// How many failures `/status` lists (the newest).
pub const LISTED_FAILURES: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub agent_id: String,
    pub version: String,
    pub pid: u32,
    /// ISO 8601 UTC.
    pub started_at: String,
    pub uptime_s: u64,
    pub watched_folders: Vec<PathBuf>,
    /// Watched folders that are not there now (an unmounted disk, a folder deleted): each is
    /// watched again once it is there. Makes `/health` degraded.
    #[serde(default)]
    pub missing_folders: Vec<PathBuf>,
    pub queue: QueueCounts,
    pub indexed: IndexedCounts,
    /// Documents in the pipeline now, with their stage, oldest first.
    #[serde(default)]
    pub in_progress: Vec<DocumentProgress>,
    /// What the agent counted since it started (the same numbers as `/metrics`).
    #[serde(default)]
    pub counters: CounterSnapshot,
    /// Newest first.
    pub recent: Vec<RecentDocument>,
    /// Documents marked failed, with why. Newest first.
    pub failures: Vec<FailedDocument>,
    pub model: ModelStatus,
    pub chroma: ChromaStatus,
    pub store: StoreStatus,
    /// When the last full reconcile finished (ISO 8601 UTC).
    pub last_reconcile: Option<String>,
    /// A reconcile was asked for (`POST /rescan`) and has not started yet.
    pub rescan_pending: bool,
    /// `POST /index` requests whose jobs are counted in `queue` (see `QueuedPaths::request`).
    #[serde(default)]
    pub index_requests_done: u64,
    /// Tasks of the agent that stopped with an error or panicked: the agent is degraded and
    /// exits, for its service manager to start it again.
    #[serde(default)]
    pub task_failures: Vec<TaskFailure>,
    /// Why the records embedded so far wait for Chroma (it is away or answers errors), while
    /// they do; they are written when it takes them again. Makes `/health` degraded.
    #[serde(default)]
    pub sync_waiting: Option<String>,
    /// Why the watcher polls the folders instead of using the OS's file events (the inotify
    /// limits are used up, for one), while it does: changes are then seen within seconds.
    #[serde(default)]
    pub watch_polling: Option<String>,
}

/// What the agent did with a `POST /index` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedPaths {
    /// Files with a job: given one now (new, changed, moved, gone, or failed before and tried
    /// again) or already queued.
    pub queued: usize,
    /// Files already indexed as they are.
    pub unchanged: usize,
    /// This request's number: a `/status` whose `index_requests_done` has reached it counts
    /// its jobs in `queue`.
    #[serde(default)]
    pub request: u64,
}

/// Jobs in the durable queue, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    pub queued: u64,
    pub in_progress: u64,
    /// Documents marked failed (retried when they change or on `repair`).
    pub failed: u64,
}

/// What the index holds for this agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedCounts {
    pub files: u64,
    pub pages: u64,
    pub chunks: u64,
}

/// What last happened to a document (those in the pipeline now are in `in_progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocState {
    /// Back in the queue: to be retried after a failure, or after a shutdown interrupted it.
    Queued,
    Indexed,
    Unchanged,
    Moved,
    Removed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentDocument {
    pub path: PathBuf,
    pub doc_id: Option<DocId>,
    pub state: DocState,
    pub pages: Option<u32>,
    pub chunks: Option<u32>,
    /// When it reached this state (ISO 8601 UTC).
    pub at: String,
    /// Why it failed, for `DocState::Failed`.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedDocument {
    pub path: PathBuf,
    pub reason: String,
    pub attempts: u32,
    /// When it last failed (ISO 8601 UTC).
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChromaStatus {
    /// Base URL; empty until the managed server has started.
    pub url: String,
    /// The agent runs this server itself.
    pub managed: bool,
    pub visual_collection: String,
    pub text_collection: String,
    /// The last heartbeat's answer; `None` before the first one.
    pub reachable: Option<bool>,
    pub error: Option<String>,
    /// When the last heartbeat was sent (ISO 8601 UTC).
    pub last_checked: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub path: PathBuf,
    /// The last store error, until the store works again. Makes `/health` degraded.
    pub error: Option<String>,
}

/// `GET /health`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `healthy` or `degraded`.
    pub status: HealthState,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Degraded,
}

impl Health {
    pub fn from_reasons(reasons: Vec<String>) -> Health {
        let status = if reasons.is_empty() {
            HealthState::Healthy
        } else {
            HealthState::Degraded
        };
        Health { status, reasons }
    }

    pub fn is_healthy(&self) -> bool {
        self.status == HealthState::Healthy
    }
}

impl AgentStatus {
    /// Why the agent is degraded, from what the pipeline reported (Chroma's own check is live,
    /// see `ApiState::check_health`).
    pub fn degraded_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        for f in &self.missing_folders {
            reasons.push(format!(
                "watched folder {} is missing (an unmounted disk?): it is watched once it is there",
                f.display()
            ));
        }
        // Until a load works: a failed load is retried with the next document.
        if self.model.state == ModelState::Failed
            || (self.model.state == ModelState::Loading && self.model.error.is_some())
        {
            reasons.push(format!(
                "model {} failed to load: {}",
                self.model.name,
                self.model.error.as_deref().unwrap_or("no reason given")
            ));
        }
        if let Some(why) = &self.sync_waiting {
            reasons.push(format!(
                "writes to Chroma are waiting ({why}); the records embedded so far are kept and written when it answers"
            ));
        }
        for f in &self.task_failures {
            reasons.push(format!(
                "the {} task stopped: {} (the agent exits; its service manager restarts it)",
                f.task, f.reason
            ));
        }
        if let Some(e) = &self.store.error {
            reasons.push(format!(
                "state store {} error: {e}",
                self.store.path.display()
            ));
        }
        reasons
    }
}
