//! What the agent is doing, recorded once, where it happens: the pipeline counts files, pages,
//! chunks and failures, times its stages, and says which document is in which stage and what
//! the model is doing. `/status`, `/metrics`, `status` and `status --json` all read this one
//! record (through the status API's snapshot), so they cannot disagree.
//!
//! One [`Telemetry`] per agent (or per `index` run), shared as an `Arc` by every stage. Every
//! change that a reader would want to see wakes [`Telemetry::changed`], so the status snapshot
//! is refreshed while work happens and sleeps while none does.

mod rate;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The instruments are Prometheus' own (the official client), so `/metrics` is encoded by it.
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
pub use rate::{RateCounter, RATE_WINDOW_S};

/// Latency bucket upper bounds in seconds: from a fast Chroma upsert (~5 ms) to a CPU batch
/// of real ColPali pages (~30 s per page, see BENCHMARKS.md).
pub const LATENCY_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_S.iter().copied())
}

/// Where in the data flow something happened (failures are counted by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Reading the file (hashing it).
    Read,
    /// Rendering pages and reading their text.
    Extract,
    /// Loading the model.
    Model,
    /// A model forward pass.
    Embed,
    /// Writing records to Chroma.
    Sync,
    /// The state store.
    Store,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Read,
        Stage::Extract,
        Stage::Model,
        Stage::Embed,
        Stage::Sync,
        Stage::Store,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Extract => "extract",
            Stage::Model => "model",
            Stage::Embed => "embed",
            Stage::Sync => "sync",
            Stage::Store => "store",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per [`Stage`].
#[derive(Debug, Default)]
pub struct StageCounters([Counter; Stage::ALL.len()]);

impl StageCounters {
    pub fn inc(&self, stage: Stage) {
        self.0[stage as usize].inc();
    }
    pub fn get(&self, stage: Stage) -> u64 {
        self.0[stage as usize].get()
    }
}

/// What the model is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Not loaded yet (it loads when the first page needs it).
    #[default]
    NotLoaded,
    Loading,
    Loaded,
    /// Unloaded after the idle period; loads again on the next page.
    Unloaded,
    /// The last load failed; `ModelStatus::error` says why. Makes `/health` degraded.
    Failed,
}

/// Where a loaded model runs, as the embed stage reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPlacement {
    pub device: String,
    pub dtype: String,
    pub fell_back_to_cpu: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub name: String,
    pub state: ModelState,
    /// `cpu`, `cuda:0`, `metal`: where it runs (known once loaded).
    pub device: Option<String>,
    /// `f32`, `bf16`, `f16` (known once loaded).
    pub dtype: Option<String>,
    /// A GPU was asked for (`auto`) and none was usable: the model runs on the CPU.
    pub fell_back_to_cpu: bool,
    /// Why that device and dtype ("device = auto and no GPU: ...; dtype = auto: f32 on the CPU").
    pub placement_reason: Option<String>,
    /// Why the last load failed; cleared by the next load that works.
    pub error: Option<String>,
    /// Seconds the last successful load took.
    pub load_seconds: Option<f64>,
    /// Successful loads since the agent started.
    pub loads: u64,
}

/// Where a document being worked on is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocStage {
    /// Rendering pages and reading text (in the isolated worker).
    Extracting,
    /// Its pages are with the model.
    Embedding,
    /// Its last records are being written to Chroma.
    Syncing,
}

/// A document in the pipeline now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentProgress {
    pub path: PathBuf,
    pub stage: DocStage,
    /// Pages through the model so far.
    pub pages_embedded: u32,
    /// Known once extraction has opened the document.
    pub num_pages: Option<u32>,
    /// When it entered the pipeline (ISO 8601 UTC).
    pub started_at: String,
}

/// The counters, as `/status` shows them and `/metrics` exposes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    /// Documents whose records reached Chroma (each re-index counts).
    pub files_indexed: u64,
    pub pages_indexed: u64,
    pub chunks_indexed: u64,
    pub files_unchanged: u64,
    pub files_moved: u64,
    pub files_removed: u64,
    pub files_failed: u64,
    pub pages_embedded: u64,
    pub chunks_embedded: u64,
    /// Pages embedded per second over the last minute.
    pub pages_per_second: f64,
    /// Failed attempts, by stage.
    pub failures: BTreeMap<String, u64>,
    /// Chroma operations that failed (after the client's own retries).
    pub chroma_errors: u64,
    /// Changes the periodic rescan found that no file-system event reported.
    pub missed_changes: u64,
    pub rescans_requested: u64,
}

/// A task of the agent that stopped with an error or panicked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub task: String,
    pub reason: String,
}

/// The one record of what the agent is doing. See the module documentation.
#[derive(Debug)]
pub struct Telemetry {
    pub files_indexed: Counter,
    pub pages_indexed: Counter,
    pub chunks_indexed: Counter,
    pub files_unchanged: Counter,
    pub files_moved: Counter,
    pub files_removed: Counter,
    /// Documents marked failed for good (after their last attempt).
    pub files_failed: Counter,
    /// Documents extraction finished.
    pub files_extracted: Counter,
    pub pages_embedded: RateCounter,
    pub chunks_embedded: Counter,
    /// Calls into the model (image batches and text batches).
    pub embed_calls: Counter,
    /// Image batches (each may hold pages of several documents).
    pub image_batches: Counter,
    pub failures: StageCounters,
    pub chroma_errors: Counter,
    pub missed_changes: Counter,
    pub rescans_requested: Counter,
    /// Seconds to render and read one document.
    pub extract_latency: Histogram,
    /// Seconds per model call (one batch).
    pub embed_latency: Histogram,
    /// Seconds to write one document's records to Chroma (upserts and prune).
    pub sync_latency: Histogram,
    /// Jobs taken from the queue and not finished.
    pub in_flight: Gauge,
    /// Documents handed to extraction and not finished there.
    pub extracting: Gauge,
    model: Mutex<ModelStatus>,
    /// By job sequence number.
    documents: Mutex<BTreeMap<u64, DocumentProgress>>,
    task_failures: Mutex<Vec<TaskFailure>>,
    /// Why writes to Chroma are waiting (it is away), while they are.
    chroma_waiting: Mutex<Option<String>>,
    /// Watched folders that are not there now (an unmounted disk, a folder deleted): the
    /// watcher watches each again once it is back.
    missing_folders: Mutex<BTreeSet<PathBuf>>,
    /// Files and folders the agent cannot index whatever they hold (a name that is not UTF-8,
    /// no permission to read), with why. Found again by every scan, so kept in memory only.
    refused: Mutex<BTreeMap<PathBuf, String>>,
    /// Why the watcher polls instead of using the OS's events, while it does.
    polling: Mutex<Option<String>>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Telemetry {
    pub fn new(model_name: &str) -> Telemetry {
        Telemetry {
            files_indexed: Counter::default(),
            pages_indexed: Counter::default(),
            chunks_indexed: Counter::default(),
            files_unchanged: Counter::default(),
            files_moved: Counter::default(),
            files_removed: Counter::default(),
            files_failed: Counter::default(),
            files_extracted: Counter::default(),
            pages_embedded: RateCounter::default(),
            chunks_embedded: Counter::default(),
            embed_calls: Counter::default(),
            image_batches: Counter::default(),
            failures: StageCounters::default(),
            chroma_errors: Counter::default(),
            missed_changes: Counter::default(),
            rescans_requested: Counter::default(),
            extract_latency: latency_histogram(),
            embed_latency: latency_histogram(),
            sync_latency: latency_histogram(),
            in_flight: Gauge::default(),
            extracting: Gauge::default(),
            model: Mutex::new(ModelStatus {
                name: model_name.to_string(),
                ..Default::default()
            }),
            documents: Mutex::new(BTreeMap::new()),
            task_failures: Mutex::new(Vec::new()),
            chroma_waiting: Mutex::new(None),
            missing_folders: Mutex::new(BTreeSet::new()),
            refused: Mutex::new(BTreeMap::new()),
            polling: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// Resolves after something a reader would want to see changed (one waiter: the status
    /// snapshot's refresh loop). A change made while nobody waits is kept for the next wait.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Says that something changed that is not recorded here (the job queue, say).
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    pub fn counters(&self) -> CounterSnapshot {
        CounterSnapshot {
            files_indexed: self.files_indexed.get(),
            pages_indexed: self.pages_indexed.get(),
            chunks_indexed: self.chunks_indexed.get(),
            files_unchanged: self.files_unchanged.get(),
            files_moved: self.files_moved.get(),
            files_removed: self.files_removed.get(),
            files_failed: self.files_failed.get(),
            pages_embedded: self.pages_embedded.total(),
            chunks_embedded: self.chunks_embedded.get(),
            pages_per_second: self.pages_embedded.per_second(),
            failures: Stage::ALL
                .iter()
                .map(|s| (s.as_str().to_string(), self.failures.get(*s)))
                .collect(),
            chroma_errors: self.chroma_errors.get(),
            missed_changes: self.missed_changes.get(),
            rescans_requested: self.rescans_requested.get(),
        }
    }

    pub fn model(&self) -> ModelStatus {
        lock(&self.model).clone()
    }

    pub fn model_loading(&self) {
        lock(&self.model).state = ModelState::Loading;
        self.poke();
    }

    /// A load that worked: where it runs, in what, after how long.
    pub fn model_loaded(&self, placed: ModelPlacement, secs: f64) {
        {
            let mut m = lock(&self.model);
            m.state = ModelState::Loaded;
            m.device = Some(placed.device);
            m.dtype = Some(placed.dtype);
            m.fell_back_to_cpu = placed.fell_back_to_cpu;
            m.placement_reason = Some(placed.reason);
            m.error = None;
            m.load_seconds = Some(secs);
            m.loads += 1;
        }
        self.poke();
    }

    pub fn model_failed(&self, reason: String) {
        {
            let mut m = lock(&self.model);
            m.state = ModelState::Failed;
            m.error = Some(reason);
        }
        self.poke();
    }

    pub fn model_unloaded(&self) {
        {
            let mut m = lock(&self.model);
            if m.state == ModelState::Loaded {
                m.state = ModelState::Unloaded;
            }
        }
        self.poke();
    }

    /// A document entered the pipeline (extraction is next).
    pub fn document_started(&self, seq: u64, path: PathBuf) {
        lock(&self.documents).insert(
            seq,
            DocumentProgress {
                path,
                stage: DocStage::Extracting,
                pages_embedded: 0,
                num_pages: None,
                started_at: now_iso(),
            },
        );
        self.poke();
    }

    pub fn document_pages(&self, seq: u64, num_pages: u32) {
        if let Some(d) = lock(&self.documents).get_mut(&seq) {
            d.num_pages = Some(num_pages);
        }
        self.poke();
    }

    pub fn document_stage(&self, seq: u64, stage: DocStage) {
        if let Some(d) = lock(&self.documents).get_mut(&seq) {
            d.stage = stage;
        }
        self.poke();
    }

    /// `pages` more of its pages went through the model.
    pub fn document_embedded(&self, seq: u64, pages: u32) {
        if let Some(d) = lock(&self.documents).get_mut(&seq) {
            d.pages_embedded += pages;
            d.stage = DocStage::Embedding;
        }
        self.poke();
    }

    /// It left the pipeline (done, failed, or put back in the queue).
    pub fn document_finished(&self, seq: u64) {
        lock(&self.documents).remove(&seq);
        self.poke();
    }

    /// The documents in the pipeline now, oldest first.
    pub fn documents(&self) -> Vec<DocumentProgress> {
        lock(&self.documents).values().cloned().collect()
    }

    /// A task stopped with an error or panicked: the agent is degraded from now on.
    pub fn task_failed(&self, task: &str, reason: String) {
        lock(&self.task_failures).push(TaskFailure {
            task: task.to_string(),
            reason,
        });
        self.poke();
    }

    pub fn task_failures(&self) -> Vec<TaskFailure> {
        lock(&self.task_failures).clone()
    }

    /// Writes to Chroma wait for it (`Some(why)`), or go through again (`None`).
    pub fn chroma_waiting(&self, why: Option<String>) {
        let changed = {
            let mut w = lock(&self.chroma_waiting);
            let changed = w.is_some() != why.is_some();
            *w = why;
            changed
        };
        if changed {
            self.poke();
        }
    }

    /// A watched folder is not there (at start, or gone since): the agent is degraded until
    /// it is back.
    pub fn folder_missing(&self, folder: PathBuf) {
        if lock(&self.missing_folders).insert(folder) {
            self.poke();
        }
    }

    /// Why writes to Chroma are waiting, while they are.
    pub fn chroma_waiting_reason(&self) -> Option<String> {
        lock(&self.chroma_waiting).clone()
    }

    /// A watched folder that was missing is there and watched again.
    pub fn folder_back(&self, folder: &Path) {
        if lock(&self.missing_folders).remove(folder) {
            self.poke();
        }
    }

    /// The watched folders missing now, in path order.
    pub fn missing_folders(&self) -> Vec<PathBuf> {
        lock(&self.missing_folders).iter().cloned().collect()
    }

    /// `path` cannot be indexed, for `reason`, until it is renamed or made readable.
    pub fn refuse(&self, path: PathBuf, reason: String) {
        let mut refused = lock(&self.refused);
        if refused.get(&path) != Some(&reason) {
            tracing::warn!(path = %path.display(), "{reason}");
            refused.insert(path, reason);
            drop(refused);
            self.poke();
        }
    }

    /// Makes `found` the refusals at or under `dir` (what a scan of it just found), saying only
    /// what is new.
    pub fn refused_under(&self, dir: &Path, found: Vec<(PathBuf, String)>) {
        let mut refused = lock(&self.refused);
        let before = refused.clone();
        refused.retain(|p, _| !p.starts_with(dir));
        for (path, reason) in found {
            if before.get(&path) != Some(&reason) {
                tracing::warn!(path = %path.display(), "{reason}");
            }
            refused.insert(path, reason);
        }
        let changed = *refused != before;
        drop(refused);
        if changed {
            self.poke();
        }
    }

    /// Forgets the refusals at or under `path` (it is gone, or about to be looked at again).
    pub fn clear_refused(&self, path: &Path) {
        let mut refused = lock(&self.refused);
        let before = refused.len();
        refused.retain(|p, _| !p.starts_with(path));
        if refused.len() != before {
            drop(refused);
            self.poke();
        }
    }

    /// What cannot be indexed now, in path order; names that are not UTF-8 made readable
    /// (with U+FFFD), since they are shown and sent as JSON.
    pub fn refused(&self) -> Vec<(PathBuf, String)> {
        lock(&self.refused)
            .iter()
            .map(|(p, r)| (PathBuf::from(p.to_string_lossy().into_owned()), r.clone()))
            .collect()
    }

    /// The watcher polls the folders (`Some(why)`) or uses the OS's events (`None`).
    pub fn set_polling(&self, why: Option<String>) {
        *lock(&self.polling) = why;
        self.poke();
    }

    pub fn polling(&self) -> Option<String> {
        lock(&self.polling).clone()
    }
}

/// Now, as ISO 8601 UTC with seconds (`2026-01-02T03:04:05Z`).
pub fn now_iso() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}
