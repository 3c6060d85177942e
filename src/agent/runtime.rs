//! The running agent: watcher → change tracker → store → pipeline, the start-up and periodic
//! reconcile, and an orderly stop. Generic over the stages, so tests and `run` share it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::changes::{ChangeTracker, ReconcileReport};
use super::pipeline::{self, FailPoint, Mode, Outcome, PipelineSettings};
use super::stages::{EmbedLoader, Extract, Sink};
use crate::api::QueuedPaths;
use crate::config::Config;
use crate::state::{FileStamp, JobKind, RetryPolicy, Store, StoreError};
use crate::supervisor::{Supervisor, TaskError};
use crate::telemetry::{Stage, TaskFailure, Telemetry};
use crate::watch::{Filter, FsEvent, FsWatcher, WatchError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("the start-up scan stopped: {0}")]
    Scan(String),
    #[error("the {} stage failed: {}", .0.task, .0.reason)]
    Task(TaskFailure),
}

/// The pipeline settings the configuration asks for.
pub fn pipeline_settings(cfg: &Config) -> PipelineSettings {
    PipelineSettings {
        agent_id: cfg.agent_id.clone(),
        settle: Duration::from_millis(cfg.watch.settle_ms),
        settle_check: Duration::from_millis(cfg.watch.settle_check_ms),
        retry: RetryPolicy {
            max_attempts: cfg.pipeline.max_attempts,
            base: Duration::from_secs(cfg.pipeline.retry_base_s.max(1)),
        },
        queue_pages: cfg.pipeline.queue_pages,
        batch_visual: cfg.model.batch_size_visual,
        batch_text: cfg.model.batch_size_text,
        idle_unload: (cfg.model.idle_unload_s > 0)
            .then(|| Duration::from_secs(cfg.model.idle_unload_s)),
        upsert_pages: 8,
        fail_point: FailPoint::from_env(),
        wait_when_unavailable: true,
    }
}

/// How long the watcher groups the events of one operation (a rename's two halves arrive
/// together; a save's bursts within milliseconds). Short, since every file waits for it.
fn debounce(settle_check: Duration) -> Duration {
    (settle_check / 2).clamp(Duration::from_millis(50), Duration::from_millis(250))
}

/// A running agent.
pub struct Agent {
    pub telemetry: Arc<Telemetry>,
    pub tracker: ChangeTracker,
    /// What the start-up reconcile found.
    pub startup: ReconcileReport,
    supervisor: Supervisor,
    watcher: Option<FsWatcher>,
}

impl Agent {
    /// Starts watching `folders`, reconciles them with the store, and starts the pipeline, as
    /// tasks of a supervisor of its own. A folder that is not there is watched once it is
    /// (and listed in [`Telemetry::missing_folders`] until then). Must be called inside a
    /// tokio runtime.
    pub async fn start<X: Extract, L: EmbedLoader, S: Sink>(
        cfg: &Config,
        folders: &[PathBuf],
        store: Store,
        extractor: X,
        loader: L,
        sink: S,
    ) -> Result<Agent, AgentError> {
        let supervisor = Supervisor::new(Arc::new(Telemetry::new(&loader.model_id())));
        Self::start_supervised(
            &supervisor,
            cfg,
            folders,
            store,
            extractor,
            loader,
            sink,
            None,
        )
        .await
    }

    /// [`Agent::start`] with the tasks under `supervisor` (whose telemetry the status API
    /// reads), sending every job's outcome to `outcomes`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_supervised<X: Extract, L: EmbedLoader, S: Sink>(
        supervisor: &Supervisor,
        cfg: &Config,
        folders: &[PathBuf],
        store: Store,
        extractor: X,
        loader: L,
        sink: S,
        outcomes: Option<tokio::sync::mpsc::UnboundedSender<Outcome>>,
    ) -> Result<Agent, AgentError> {
        let telemetry = supervisor.telemetry().clone();
        let filter = Filter::new(folders, &cfg.watch.include, &cfg.watch.exclude)?;
        let settings = pipeline_settings(cfg);
        let tracker = ChangeTracker {
            store: store.clone(),
            filter: filter.clone(),
            settle: settings.settle,
            check: settings.settle_check,
            model: loader.model_id(),
            telemetry: telemetry.clone(),
        };
        // Watch first, so that nothing happening during the scan is missed.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = FsWatcher::start(filter, debounce(settings.settle_check), tx)?;
        // Until each is there (then `RootBack` clears it), /health says so.
        for f in watcher.missing_at_start() {
            telemetry.folder_missing(f.clone());
        }
        if let Some(why) = watcher.polling_at_start() {
            telemetry.set_polling(Some(why.to_string()));
        }
        let t = tracker.clone();
        let startup = tokio::task::spawn_blocking(move || t.reconcile_all())
            .await
            .map_err(|e| AgentError::Scan(e.to_string()))??;
        tracing::info!(
            scanned = startup.scanned,
            unchanged = startup.unchanged,
            new = startup.new,
            changed = startup.changed,
            moved = startup.moved,
            deleted = startup.deleted,
            "start-up reconcile done"
        );

        let (t, tel, token) = (
            tracker.clone(),
            telemetry.clone(),
            supervisor.token().clone(),
        );
        supervisor.spawn("watch", async move {
            loop {
                let batch = tokio::select! {
                    b = rx.recv() => b,
                    _ = token.cancelled() => None,
                };
                let Some(batch) = batch else { return Ok(()) };
                let (t, tel2) = (t.clone(), tel.clone());
                tokio::task::spawn_blocking(move || record_changes(&t, &tel2, batch))
                    .await
                    .map_err(|e| {
                        TaskError::new(format!("the file change handler failed: {e}"))
                    })??;
                // The queue changed: the status snapshot shows it.
                tel.poke();
            }
        });
        if cfg.watch.rescan_interval_s > 0 {
            let (t, tel, token) = (
                tracker.clone(),
                telemetry.clone(),
                supervisor.token().clone(),
            );
            let every = Duration::from_secs(cfg.watch.rescan_interval_s);
            supervisor.spawn("rescan", async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = token.cancelled() => return Ok(()),
                    }
                    let t = t.clone();
                    match tokio::task::spawn_blocking(move || t.reconcile_all()).await {
                        Ok(Ok(r)) if r.new + r.changed + r.moved + r.deleted > 0 => {
                            let n = r.new + r.changed + r.moved + r.deleted;
                            tel.missed_changes.inc_by(n as u64);
                            tel.poke();
                            tracing::warn!(
                                ?r,
                                "the periodic rescan found changes the watcher missed"
                            )
                        }
                        Ok(Err(e)) => tracing::error!("periodic rescan failed: {e}"),
                        Err(e) => tracing::error!("periodic rescan failed: {e}"),
                        _ => {}
                    }
                }
            });
        }
        pipeline::start(
            supervisor,
            store,
            extractor,
            loader,
            sink,
            settings,
            Mode::Forever,
            outcomes,
        );
        Ok(Agent {
            telemetry,
            tracker,
            startup,
            supervisor: supervisor.clone(),
            watcher: Some(watcher),
        })
    }

    pub fn store(&self) -> &Store {
        &self.tracker.store
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Stops taking work, checkpoints what is in flight, waits for every task, and flushes
    /// the store.
    pub async fn shutdown(mut self) -> Result<(), StoreError> {
        self.watcher.take();
        self.supervisor.shutdown();
        self.supervisor.wait().await;
        self.tracker.store.flush()
    }
}

/// Records a batch of the watcher's events as jobs, durably: a store that cannot be written
/// (a full or read-only disk) stops the agent, whose service manager starts it again; the
/// start-up reconcile then finds what these events said. A file whose name the store cannot
/// hold is listed as refused instead.
fn record_changes(
    tracker: &ChangeTracker,
    telemetry: &Telemetry,
    batch: Vec<FsEvent>,
) -> Result<(), TaskError> {
    for e in batch {
        match &e {
            FsEvent::RootGone(root) => telemetry.folder_missing(root.clone()),
            FsEvent::RootBack(root) => telemetry.folder_back(root),
            FsEvent::Polling(why) => telemetry.set_polling(Some(why.clone())),
            _ => {}
        }
        if let Err(err) = tracker.apply(e) {
            telemetry.failures.inc(Stage::Store);
            return Err(TaskError::new(format!(
                "a file change could not be recorded: {err}"
            )));
        }
    }
    tracker
        .store
        .flush()
        .map_err(|err| TaskError::new(format!("file changes could not be recorded: {err}")))
}

/// Files the jobs for an explicit request to index `dirs` (reconciled with the store) and
/// `files` (treated as changed); failed files among them are queued again, since they were asked
/// for. Paths must be absolute and canonical. Blocking: run it off the async threads.
pub fn queue_paths(
    tracker: &ChangeTracker,
    dirs: &[PathBuf],
    files: &[PathBuf],
) -> Result<QueuedPaths, StoreError> {
    let t = tracker;
    let mut out = QueuedPaths::default();
    for d in dirs {
        let r = t.reconcile(d)?;
        out.unchanged += r.unchanged + r.touched;
        out.queued += r.new + r.changed + r.moved + r.deleted + r.busy;
    }
    for (p, _) in t.store.failures()? {
        let wanted = dirs.iter().any(|d| p.starts_with(d)) || files.contains(&p);
        if let (true, Some(stamp)) = (wanted, FileStamp::of_path(&p)) {
            t.store.enqueue(
                JobKind::Index { path: p.clone() },
                Some(stamp),
                Duration::ZERO,
            )?;
            out.unchanged = out.unchanged.saturating_sub(1);
            out.queued += 1;
        }
    }
    for f in files {
        if !t.filter.accepts_file(f) {
            continue;
        }
        let before = t.store.job(f)?.is_some();
        // Asked for by name: the user says it is complete.
        t.apply(crate::watch::FsEvent::Written(f.clone()))?;
        match (before, t.store.job(f)?.is_some()) {
            (false, false) => out.unchanged += 1,
            (false, true) => out.queued += 1,
            _ => {}
        }
    }
    Ok(out)
}

/// `index PATH...` sent to the running agent (`POST /index`): its paths must lie in the
/// watched folders, since the agent's store and watcher cover only those. Blocking.
///
/// Whoever reaches the API may send any path, so a refusal tells nothing about the file system
/// outside the watched folders: a path is first checked as written (absolute, no `..`, under a
/// watched folder) without looking at the disk; then resolved, and refused in the same words
/// when it does not exist or leads outside through a symbolic link, without saying where.
pub fn queue_paths_in_agent(
    tracker: &ChangeTracker,
    paths: &[PathBuf],
) -> Result<QueuedPaths, String> {
    let roots: Vec<String> = tracker
        .filter
        .roots()
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    let roots = roots.join(", ");
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for p in paths {
        if !p.is_absolute() {
            return Err(format!(
                "{:?} is a relative path, and the agent does not know your working directory. Fix: send an absolute path (`docusearch-agent index` does)",
                p.display().to_string()
            ));
        }
        if p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(format!(
                "{} contains `..`. Fix: send the path without it (`realpath` prints it)",
                p.display()
            ));
        }
        if tracker.filter.root_of(p).is_none() {
            return Err(format!(
                "{} is not in a folder the running agent watches ({roots}). Fix: add its folder to watch.folders and restart the agent, or stop the agent and run `index` again",
                p.display()
            ));
        }
        let resolved = std::fs::canonicalize(p)
            .ok()
            .filter(|c| tracker.filter.root_of(c).is_some());
        let Some(c) = resolved else {
            return Err(format!(
                "{} does not exist in the folders the running agent watches ({roots}), or leads outside them through a symbolic link. Fix: check the path; a file outside them is indexed once its own folder is added to watch.folders",
                p.display()
            ));
        };
        if c.is_dir() {
            dirs.push(c);
        } else {
            files.push(c);
        }
    }
    queue_paths(tracker, &dirs, &files).map_err(|e| e.to_string())
}

/// What `index` did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IndexSummary {
    pub indexed: Vec<(PathBuf, u32)>,
    pub unchanged: usize,
    pub moved: usize,
    pub deleted: usize,
    pub failed: Vec<(PathBuf, String)>,
    pub pages: u64,
}

/// A path given to `index`, resolved.
enum Requested {
    Folder(PathBuf),
    File(PathBuf),
}

/// Resolves a path given to `index`, or says why it cannot be indexed.
fn requested_path(p: &Path) -> Result<Requested, String> {
    let c = std::fs::canonicalize(p).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => {
            "is a loop of symbolic links that leads to no file. Fix: remove or correct the link"
                .to_string()
        }
        _ if e.kind() == std::io::ErrorKind::NotFound => {
            "does not exist (or is a symbolic link to nothing)".to_string()
        }
        _ => format!("cannot be read: {e}"),
    })?;
    if c.to_str().is_none() {
        return Err(crate::watch::NOT_UTF8.to_string());
    }
    let md = std::fs::metadata(&c).map_err(|e| format!("cannot be read: {e}"))?;
    if md.is_dir() {
        Ok(Requested::Folder(c))
    } else if md.is_file() {
        Ok(Requested::File(c))
    } else {
        Err("is not a regular file (a FIFO, socket or device): only files are indexed".into())
    }
}

/// `index PATH...` without the terminal: files the jobs for `paths` (files or folders), runs
/// the pipeline until the queue is empty, and reports every outcome to `progress`.
#[allow(clippy::too_many_arguments)]
pub async fn index_paths<X: Extract, L: EmbedLoader, S: Sink>(
    cfg: &Config,
    paths: &[PathBuf],
    store: Store,
    extractor: X,
    loader: L,
    sink: S,
    telemetry: Arc<Telemetry>,
    mut progress: impl FnMut(&Outcome, &Telemetry),
) -> Result<IndexSummary, AgentError> {
    let mut roots = Vec::new();
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut summary = IndexSummary::default();
    for p in paths {
        match requested_path(p) {
            Ok(Requested::Folder(c)) => {
                roots.push(c.clone());
                dirs.push(c);
            }
            Ok(Requested::File(c)) => {
                roots.push(
                    c.parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| c.clone()),
                );
                files.push(c);
            }
            Err(reason) => summary.failed.push((p.clone(), reason)),
        }
    }
    let filter = Filter::new(&roots, &cfg.watch.include, &cfg.watch.exclude)?;
    let mut settings = pipeline_settings(cfg);
    // A one-shot run does not wait for files to settle or for retries.
    settings.settle = Duration::ZERO;
    settings.settle_check = Duration::ZERO;
    settings.retry.max_attempts = 1;
    settings.wait_when_unavailable = false;
    let tracker = ChangeTracker {
        store: store.clone(),
        filter: filter.clone(),
        settle: Duration::ZERO,
        check: Duration::ZERO,
        model: loader.model_id(),
        telemetry: telemetry.clone(),
    };
    for f in &files {
        if !filter.accepts_file(f) {
            summary.failed.push((
                f.clone(),
                "is not indexed: hidden or temporary, not a format the agent reads (PDF, images, Office, text), or excluded by watch.include / watch.exclude or a .docusearchignore".into(),
            ));
        }
    }
    let t = tracker.clone();
    let queued = tokio::task::spawn_blocking(move || queue_paths(&t, &dirs, &files))
        .await
        .map_err(|e| AgentError::Scan(e.to_string()))??;
    summary.unchanged = queued.unchanged;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let supervisor = Supervisor::new(telemetry.clone());
    pipeline::start(
        &supervisor,
        store,
        extractor,
        loader,
        sink,
        settings,
        Mode::UntilIdle,
        Some(tx),
    );
    let collector = async {
        while let Some(o) = rx.recv().await {
            progress(&o, &telemetry);
            match o {
                Outcome::Indexed { path, pages, .. } => {
                    summary.pages += pages as u64;
                    summary.indexed.push((path, pages));
                }
                Outcome::Unchanged { .. } => summary.unchanged += 1,
                Outcome::Moved { .. } => summary.moved += 1,
                Outcome::Deleted { .. } => summary.deleted += 1,
                Outcome::Failed { path, reason } | Outcome::Retrying { path, reason } => {
                    summary.failed.push((path, reason))
                }
                Outcome::Interrupted { path } => summary.failed.push((path, "interrupted".into())),
            }
        }
    };
    // The pipeline holds the sender until its stages end. A stage that fails ends the run.
    let ended = async {
        tokio::select! {
            _ = supervisor.wait() => {}
            _ = supervisor.failed() => supervisor.shutdown(),
        }
        supervisor.wait().await;
    };
    let ((), ()) = tokio::join!(ended, collector);
    tracker.store.flush()?;
    if let Some(f) = supervisor.first_failure() {
        return Err(AgentError::Task(f));
    }
    Ok(summary)
}
