//! The pipeline: jobs from the store → extract → embed → sync, as concurrent stages joined by
//! bounded channels, so memory stays bounded however many files arrive and the model never
//! waits on rendering or on the network.
//!
//! - the dispatcher (async) takes due jobs, does deletions and moves itself, checks that a file
//!   has settled and really changed (size, mtime, blake3), and hands documents to extraction;
//! - extraction (one blocking thread) streams pages;
//! - the model (one blocking thread) batches pages across documents, loads the model on the
//!   first page and unloads it after an idle period;
//! - sync (async) upserts records, prunes stale ones, records the file and closes the job.
//!
//! Shutdown: the dispatcher stops taking jobs, extraction stops at the next page, and every
//! document not finished is put back in the queue (a checkpoint: the job runs again at the
//! next start, and a re-index overwrites the same record ids).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as smpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::stages::{
    ChunkVectors, DocInfo, DocumentMeta, Embed, EmbedLoader, Extract, Extracted, PageContent,
    PageRecord, Sink, StageError,
};
use crate::state::{now_ms, FileRecord, FileStamp, Job, JobKind, RetryPolicy, Store, StoreError};
use crate::types::{ContentHash, DocFormat, DocId, SCHEMA_VERSION};

/// What the pipeline needs to know, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub agent_id: String,
    /// How long a file must stay unchanged before it is processed.
    pub settle: Duration,
    pub retry: RetryPolicy,
    /// Pages held between stages (each channel).
    pub queue_pages: usize,
    pub batch_visual: usize,
    pub batch_text: usize,
    /// Unload the model after this long without work (`None`: keep it).
    pub idle_unload: Option<Duration>,
    /// Pages per upsert request.
    pub upsert_pages: usize,
}

/// Counters, readable while the pipeline runs (status, tests, benchmarks).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub documents_indexed: AtomicU64,
    pub documents_unchanged: AtomicU64,
    pub documents_moved: AtomicU64,
    pub documents_deleted: AtomicU64,
    pub documents_failed: AtomicU64,
    pub documents_extracted: AtomicU64,
    pub pages_embedded: AtomicU64,
    pub chunks_embedded: AtomicU64,
    /// Calls into the model (image batches and text batches).
    pub embed_calls: AtomicU64,
    /// Image batches (each may hold pages of several documents).
    pub image_batches: AtomicU64,
    /// Documents handed to extraction and not finished there yet.
    pub extracting: AtomicU64,
    pub model_loads: AtomicU64,
    pub model_loaded: AtomicBool,
    /// Jobs taken and not yet finished.
    pub in_flight: AtomicU64,
    pub device: Mutex<Option<String>>,
}

/// A snapshot of [`PipelineStats`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub documents_indexed: u64,
    pub documents_unchanged: u64,
    pub documents_moved: u64,
    pub documents_deleted: u64,
    pub documents_failed: u64,
    pub documents_extracted: u64,
    pub pages_embedded: u64,
    pub chunks_embedded: u64,
    pub embed_calls: u64,
    pub image_batches: u64,
    pub model_loads: u64,
    pub model_loaded: bool,
    pub in_flight: u64,
    pub device: Option<String>,
}

impl PipelineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        StatsSnapshot {
            documents_indexed: g(&self.documents_indexed),
            documents_unchanged: g(&self.documents_unchanged),
            documents_moved: g(&self.documents_moved),
            documents_deleted: g(&self.documents_deleted),
            documents_failed: g(&self.documents_failed),
            documents_extracted: g(&self.documents_extracted),
            pages_embedded: g(&self.pages_embedded),
            chunks_embedded: g(&self.chunks_embedded),
            embed_calls: g(&self.embed_calls),
            image_batches: g(&self.image_batches),
            model_loads: g(&self.model_loads),
            model_loaded: self.model_loaded.load(Ordering::SeqCst),
            in_flight: g(&self.in_flight),
            device: self.device.lock().ok().and_then(|d| d.clone()),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::SeqCst);
}

/// How one job ended, for `index`'s summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Indexed {
        path: PathBuf,
        pages: u32,
        chunks: u32,
    },
    Unchanged {
        path: PathBuf,
    },
    Moved {
        from: PathBuf,
        to: PathBuf,
    },
    Deleted {
        path: PathBuf,
    },
    /// Will be tried again later (back-off).
    Retrying {
        path: PathBuf,
        reason: String,
    },
    Failed {
        path: PathBuf,
        reason: String,
    },
    /// Put back in the queue by a shutdown.
    Interrupted {
        path: PathBuf,
    },
}

/// A document on its way through the stages.
struct Doc {
    job: Job,
    path: PathBuf,
    doc_id: DocId,
    hash: ContentHash,
    stamp: FileStamp,
    format: DocFormat,
    info: OnceLock<DocInfo>,
    /// The first failure of any stage; the document's remaining pages are dropped.
    failed: Mutex<Option<StageError>>,
    started: std::time::Instant,
}

impl Doc {
    fn fail(&self, e: StageError) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }
    fn failure(&self) -> Option<StageError> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

enum ExtractMsg {
    Page(Arc<Doc>, PageContent),
    /// Extraction finished (or stopped: `interrupted`).
    End(Arc<Doc>, Result<DocInfo, StageError>, bool),
}

enum EmbedMsg {
    Page(Arc<Doc>, Option<PageRecord>, Vec<ChunkVectors>),
    End(Arc<Doc>, Result<DocInfo, StageError>, bool),
}

/// Everything the stages share.
struct Shared<S> {
    store: Store,
    sink: S,
    settings: PipelineSettings,
    model_id: String,
    stats: Arc<PipelineStats>,
    outcomes: Option<mpsc::UnboundedSender<Outcome>>,
}

impl<S> Shared<S> {
    fn report(&self, o: Outcome) {
        if let Some(tx) = &self.outcomes {
            let _ = tx.send(o);
        }
    }

    fn doc_id(&self, path: &Path) -> DocId {
        DocId::new(&self.settings.agent_id, path)
    }

    fn meta(
        &self,
        path: &Path,
        doc_id: DocId,
        format: DocFormat,
        num_pages: u32,
        hash: ContentHash,
    ) -> DocumentMeta {
        DocumentMeta {
            doc_id,
            source_path: path.to_path_buf(),
            filename: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format,
            num_pages,
            content_hash: hash,
            model: self.model_id.clone(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// Closes a job that failed, with back-off for what may pass.
    fn job_failed(&self, job: &Job, path: &Path, e: &StageError) -> Result<(), StoreError> {
        let reason = e.to_string();
        tracing::warn!(path = %path.display(), "{reason}");
        let state = self
            .store
            .fail(job, &reason, e.permanent, self.settings.retry)?;
        if state == crate::state::JobState::Failed {
            bump(&self.stats.documents_failed);
            self.report(Outcome::Failed {
                path: path.to_path_buf(),
                reason,
            });
        } else {
            self.report(Outcome::Retrying {
                path: path.to_path_buf(),
                reason,
            });
        }
        Ok(())
    }

    fn job_done(&self, job: &Job) -> Result<(), StoreError> {
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.store.complete(job)
    }
}

/// The running pipeline's handle.
pub struct Pipeline {
    pub stats: Arc<PipelineStats>,
    stopping: Arc<AtomicBool>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// When the dispatcher stops taking jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Until shutdown (`run`).
    Forever,
    /// Once the queue holds nothing due or running (`index`).
    UntilIdle,
}

impl Pipeline {
    /// Starts the stages. Must be called inside a tokio runtime.
    pub fn start<X: Extract, L: EmbedLoader, S: Sink>(
        store: Store,
        extractor: X,
        loader: L,
        sink: S,
        settings: PipelineSettings,
        mode: Mode,
        outcomes: Option<mpsc::UnboundedSender<Outcome>>,
    ) -> Pipeline {
        let stats = Arc::new(PipelineStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let queue = settings.queue_pages.max(1);
        let shared = Arc::new(Shared {
            store,
            sink,
            model_id: loader.model_id(),
            settings,
            stats: stats.clone(),
            outcomes,
        });

        let (doc_tx, doc_rx) = mpsc::channel::<Arc<Doc>>(1);
        let (page_tx, page_rx) = smpsc::sync_channel::<ExtractMsg>(queue);
        let (vec_tx, vec_rx) = mpsc::channel::<EmbedMsg>(queue);

        let mut threads = Vec::new();
        let st = stopping.clone();
        let ex_stats = stats.clone();
        threads.push(
            std::thread::Builder::new()
                .name("extract".into())
                .spawn(move || extract_stage(extractor, doc_rx, page_tx, st, ex_stats))
                .expect("spawning the extraction thread"),
        );
        let em_shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("embed".into())
                .spawn(move || embed_stage(loader, page_rx, vec_tx, em_shared))
                .expect("spawning the model thread"),
        );
        let tasks = vec![
            tokio::spawn(dispatch_stage(shared.clone(), doc_tx, shutdown_rx, mode)),
            tokio::spawn(sync_stage(shared, vec_rx)),
        ];
        Pipeline {
            stats,
            stopping,
            shutdown,
            tasks,
            threads,
        }
    }

    /// Stops taking work, puts unfinished documents back in the queue, and waits for the
    /// stages to end.
    pub async fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        self.join().await;
    }

    /// Waits for the stages to end by themselves (after [`Mode::UntilIdle`]).
    pub async fn join(&mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let threads: Vec<_> = self.threads.drain(..).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------- dispatcher

async fn dispatch_stage<S: Sink>(
    shared: Arc<Shared<S>>,
    doc_tx: mpsc::Sender<Arc<Doc>>,
    mut shutdown: watch::Receiver<bool>,
    mode: Mode,
) {
    let queued = shared.store.queued_signal();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let job = match shared.store.take_due(now_ms()) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!("job queue unreadable, stopping: {e}");
                break;
            }
        };
        match job {
            Some(job) => {
                bump(&shared.stats.in_flight);
                if let Err(e) = dispatch(&shared, job, &doc_tx).await {
                    tracing::error!("job queue unwritable, stopping: {e}");
                    break;
                }
            }
            None => {
                let next = shared.store.next_due_ms();
                if mode == Mode::UntilIdle
                    && next.is_none()
                    && shared.stats.in_flight.load(Ordering::SeqCst) == 0
                {
                    break;
                }
                let wait = match next {
                    Some(d) => Duration::from_millis(d.saturating_sub(now_ms()).max(1)),
                    // Nothing queued: sleep until something is (or, for `index`, re-check
                    // when a document in flight completes).
                    None if mode == Mode::UntilIdle => Duration::from_millis(200),
                    None => Duration::from_secs(24 * 3600),
                };
                tokio::select! {
                    _ = queued.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    // Dropping doc_tx lets the stages drain and end.
}

/// Handles one job: deletions and moves here; documents to index go on to extraction.
async fn dispatch<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: Job,
    doc_tx: &mpsc::Sender<Arc<Doc>>,
) -> Result<(), StoreError> {
    match job.kind.clone() {
        JobKind::Delete { path } => {
            if FileStamp::of_path(&path).is_some() {
                // It came back before the deletion ran.
                return index(shared, job, &path, doc_tx).await;
            }
            delete(shared, &job, &path).await
        }
        JobKind::Move { from, to } => {
            if FileStamp::of_path(&to).is_none() {
                return delete(shared, &job, &from).await;
            }
            let rec = shared.store.file(&from)?;
            let from_still_there = FileStamp::of_path(&from).is_some();
            if let (Some(rec), false) = (rec, from_still_there) {
                let meta = shared.meta(
                    &to,
                    shared.doc_id(&to),
                    rec_format(&to),
                    rec.num_pages,
                    rec.content_hash.clone(),
                );
                match shared.sink.move_document(&rec.doc_id, &meta).await {
                    Ok(moved) => {
                        shared.store.remove_file(&from)?;
                        if moved {
                            let mut new = rec.clone();
                            new.doc_id = meta.doc_id.clone();
                            // The content check below decides whether the bytes changed too.
                            shared.store.put_file(&to, &new)?;
                            bump(&shared.stats.documents_moved);
                            shared.report(Outcome::Moved {
                                from: from.clone(),
                                to: to.clone(),
                            });
                        }
                    }
                    Err(e) => {
                        shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
                        return shared.job_failed(&job, &to, &e);
                    }
                }
            }
            index(shared, job, &to, doc_tx).await
        }
        JobKind::Index { path } => index(shared, job, &path, doc_tx).await,
    }
}

fn rec_format(path: &Path) -> DocFormat {
    DocFormat::from_path(path).unwrap_or(DocFormat::Pdf)
}

async fn delete<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: &Job,
    path: &Path,
) -> Result<(), StoreError> {
    let rec = shared.store.file(path)?;
    let doc_id = rec
        .as_ref()
        .map(|r| r.doc_id.clone())
        .unwrap_or_else(|| shared.doc_id(path));
    match shared.sink.delete_document(&doc_id).await {
        Ok(()) => {
            shared.store.remove_file(path)?;
            if rec.is_some() {
                bump(&shared.stats.documents_deleted);
            }
            shared.report(Outcome::Deleted {
                path: path.to_path_buf(),
            });
            shared.job_done(job)
        }
        Err(e) => {
            shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            shared.job_failed(job, path, &e)
        }
    }
}

/// Checks that the file settled and changed, tries a re-key by content, else sends it on.
async fn index<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: Job,
    path: &Path,
    doc_tx: &mpsc::Sender<Arc<Doc>>,
) -> Result<(), StoreError> {
    let Some(stamp) = FileStamp::of_path(path) else {
        return delete(shared, &job, path).await;
    };
    // Stable: the same size and mtime as when last looked at, and not written for the
    // settle period (a file still being copied in keeps changing both).
    let settle = shared.settings.settle;
    let still =
        stamp.age(SystemTime::now()) >= settle || stamp.mtime_ns > now_ms() as i128 * 1_000_000;
    if job.seen != Some(stamp) || !still {
        shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        return shared
            .store
            .defer(&job, Some(stamp), settle.max(Duration::from_millis(50)));
    }
    let p = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || ContentHash::of_file(&p)).await;
    let hash = match hashed {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            let err = StageError::permanent("read", format!("cannot read {}: {e}", path.display()));
            return shared.job_failed(&job, path, &err);
        }
        Err(e) => {
            shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
            return shared.job_failed(&job, path, &StageError::transient("read", e.to_string()));
        }
    };
    let rec = shared.store.file(path)?;
    if let Some(rec) = &rec {
        if rec.content_hash == hash && rec.last_error.is_none() && rec.model == shared.model_id {
            let mut rec = rec.clone();
            rec.stamp = stamp;
            shared.store.put_file(path, &rec)?;
            bump(&shared.stats.documents_unchanged);
            shared.report(Outcome::Unchanged {
                path: path.to_path_buf(),
            });
            return shared.job_done(&job);
        }
    }
    // The same content under a path that vanished: a move reported as two unrelated events.
    if rec.is_none() {
        for old in shared.store.paths_with_hash(&hash)? {
            if old == path || FileStamp::of_path(&old).is_some() {
                continue;
            }
            let Some(old_rec) = shared.store.file(&old)? else {
                continue;
            };
            if old_rec.last_error.is_some() || old_rec.model != shared.model_id {
                continue;
            }
            let meta = shared.meta(
                path,
                shared.doc_id(path),
                rec_format(path),
                old_rec.num_pages,
                hash.clone(),
            );
            if let Ok(true) = shared.sink.move_document(&old_rec.doc_id, &meta).await {
                shared.store.remove_file(&old)?;
                let mut new = old_rec.clone();
                new.doc_id = meta.doc_id;
                new.stamp = stamp;
                shared.store.put_file(path, &new)?;
                bump(&shared.stats.documents_moved);
                shared.report(Outcome::Moved {
                    from: old,
                    to: path.to_path_buf(),
                });
                return shared.job_done(&job);
            }
        }
    }
    let doc = Arc::new(Doc {
        path: path.to_path_buf(),
        doc_id: shared.doc_id(path),
        hash,
        stamp,
        format: rec_format(path),
        job,
        info: OnceLock::new(),
        failed: Mutex::new(None),
        started: std::time::Instant::now(),
    });
    bump(&shared.stats.extracting);
    if let Err(mpsc::error::SendError(doc)) = doc_tx.send(doc).await {
        shared.stats.extracting.fetch_sub(1, Ordering::SeqCst);
        // The stages are gone (shutdown): back in the queue.
        shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        shared
            .store
            .defer(&doc.job, Some(doc.stamp), Duration::ZERO)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- extraction

fn extract_stage<X: Extract>(
    extractor: X,
    mut doc_rx: mpsc::Receiver<Arc<Doc>>,
    page_tx: smpsc::SyncSender<ExtractMsg>,
    stopping: Arc<AtomicBool>,
    stats: Arc<PipelineStats>,
) {
    while let Some(doc) = doc_rx.blocking_recv() {
        if stopping.load(Ordering::SeqCst) {
            stats.extracting.fetch_sub(1, Ordering::SeqCst);
            let _ = page_tx.send(ExtractMsg::End(
                doc,
                Err(StageError::transient("extract", "stopped")),
                true,
            ));
            continue;
        }
        let mut interrupted = false;
        let d = doc.clone();
        let result = extractor.extract(&doc.path, &mut |item| {
            if stopping.load(Ordering::SeqCst) {
                interrupted = true;
                return ControlFlow::Break(());
            }
            match item {
                Extracted::Info(info) => {
                    let _ = d.info.set(info);
                    ControlFlow::Continue(())
                }
                Extracted::Page(page) => {
                    if d.failure().is_some() {
                        // A later stage failed: the rest is wasted work.
                        return ControlFlow::Break(());
                    }
                    match page_tx.send(ExtractMsg::Page(d.clone(), page)) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => {
                            interrupted = true;
                            ControlFlow::Break(())
                        }
                    }
                }
            }
        });
        if let Ok(info) = &result {
            let _ = doc.info.set(info.clone());
            bump(&stats.documents_extracted);
        }
        // Before the end is sent, so the model thread never waits for a document that is done.
        stats.extracting.fetch_sub(1, Ordering::SeqCst);
        if page_tx
            .send(ExtractMsg::End(doc, result, interrupted))
            .is_err()
        {
            break;
        }
    }
}

// ---------------------------------------------------------------- model

enum Pending {
    Page(Arc<Doc>, PageContent),
    End(Arc<Doc>, Result<DocInfo, StageError>, bool),
}

/// Longest a part-filled batch waits for pages that extraction is still rendering.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(2);

fn embed_stage<L: EmbedLoader, S: Sink>(
    loader: L,
    page_rx: smpsc::Receiver<ExtractMsg>,
    vec_tx: mpsc::Sender<EmbedMsg>,
    shared: Arc<Shared<S>>,
) {
    let batch_visual = shared.settings.batch_visual.max(1);
    let idle = shared.settings.idle_unload;
    let mut model: Option<L::Model> = None;
    let mut batch: Vec<Pending> = Vec::new();
    let mut pages_in_batch = 0usize;
    loop {
        let msg = if !batch.is_empty() {
            match page_rx.try_recv() {
                Ok(m) => Some(m),
                // Nothing more ready right now. While extraction has documents in hand, their
                // pages join this batch (pages of several documents share a model call);
                // otherwise embed what we have rather than wait.
                Err(smpsc::TryRecvError::Empty) => {
                    let more_coming =
                        pages_in_batch > 0 && shared.stats.extracting.load(Ordering::SeqCst) > 0;
                    let next = if more_coming {
                        page_rx.recv_timeout(MAX_BATCH_WAIT).ok()
                    } else {
                        None
                    };
                    match next {
                        Some(m) => Some(m),
                        None => {
                            flush(&loader, &mut model, &mut batch, &vec_tx, &shared);
                            pages_in_batch = 0;
                            continue;
                        }
                    }
                }
                Err(smpsc::TryRecvError::Disconnected) => None,
            }
        } else {
            match (idle, model.is_some()) {
                (Some(idle), true) => match page_rx.recv_timeout(idle) {
                    Ok(m) => Some(m),
                    Err(smpsc::RecvTimeoutError::Timeout) => {
                        tracing::info!("model idle for {idle:?}: unloading it");
                        model = None;
                        shared.stats.model_loaded.store(false, Ordering::SeqCst);
                        continue;
                    }
                    Err(smpsc::RecvTimeoutError::Disconnected) => None,
                },
                _ => page_rx.recv().ok(),
            }
        };
        let Some(msg) = msg else {
            flush(&loader, &mut model, &mut batch, &vec_tx, &shared);
            break;
        };
        match msg {
            ExtractMsg::Page(doc, page) => {
                if doc.failure().is_none() {
                    if page.image.is_some() {
                        pages_in_batch += 1;
                    }
                    batch.push(Pending::Page(doc, page));
                }
            }
            ExtractMsg::End(doc, res, interrupted) => {
                batch.push(Pending::End(doc, res, interrupted))
            }
        }
        if pages_in_batch >= batch_visual {
            flush(&loader, &mut model, &mut batch, &vec_tx, &shared);
            pages_in_batch = 0;
        }
    }
    shared.stats.model_loaded.store(false, Ordering::SeqCst);
}

/// Embeds the batch's pages (several documents may share it) and their chunks, then passes
/// everything on in order.
fn flush<L: EmbedLoader, S: Sink>(
    loader: &L,
    model: &mut Option<L::Model>,
    batch: &mut Vec<Pending>,
    vec_tx: &mpsc::Sender<EmbedMsg>,
    shared: &Arc<Shared<S>>,
) {
    if batch.is_empty() {
        return;
    }
    let mut items: Vec<Pending> = std::mem::take(batch);
    let needs_model = items
        .iter()
        .any(|p| matches!(p, Pending::Page(d, _) if d.failure().is_none()));
    let mut page_vecs: HashMap<usize, PageRecord> = HashMap::new();
    let mut chunk_vecs: HashMap<usize, Vec<ChunkVectors>> = HashMap::new();
    if needs_model {
        let result = (|| -> Result<(), StageError> {
            if model.is_none() {
                let m = loader.load()?;
                bump(&shared.stats.model_loads);
                shared.stats.model_loaded.store(true, Ordering::SeqCst);
                if let Ok(mut d) = shared.stats.device.lock() {
                    *d = Some(m.device());
                }
                *model = Some(m);
            }
            let Some(m) = model.as_ref() else {
                return Ok(());
            };
            let mut idx = Vec::new();
            let mut images = Vec::new();
            for (i, it) in items.iter_mut().enumerate() {
                if let Pending::Page(d, p) = it {
                    if d.failure().is_none() {
                        // The image is not needed after this: move it, do not copy it.
                        if let Some(img) = p.image.take() {
                            idx.push(i);
                            images.push(img);
                        }
                    }
                }
            }
            if !images.is_empty() {
                bump(&shared.stats.embed_calls);
                bump(&shared.stats.image_batches);
                let vecs = m.embed_images(&images)?;
                if vecs.len() != images.len() {
                    return Err(StageError::transient(
                        "embed",
                        format!(
                            "the model returned {} vectors for {} pages",
                            vecs.len(),
                            images.len()
                        ),
                    ));
                }
                for (i, v) in idx.into_iter().zip(vecs) {
                    if let Pending::Page(_, p) = &items[i] {
                        page_vecs.insert(
                            i,
                            PageRecord {
                                page: p.number,
                                text: p.text.clone(),
                                embedding: v,
                            },
                        );
                    }
                }
                shared
                    .stats
                    .pages_embedded
                    .fetch_add(images.len() as u64, Ordering::SeqCst);
            }
            let mut chunks: Vec<(usize, &super::stages::Chunk)> = Vec::new();
            for (i, it) in items.iter().enumerate() {
                if let Pending::Page(d, p) = it {
                    if d.failure().is_none() {
                        chunks.extend(p.chunks.iter().map(|c| (i, c)));
                    }
                }
            }
            for group in chunks.chunks(shared.settings.batch_text.max(1)) {
                let texts: Vec<&str> = group.iter().map(|(_, c)| c.text.as_str()).collect();
                bump(&shared.stats.embed_calls);
                let vecs = m.embed_texts(&texts)?;
                if vecs.len() != texts.len() {
                    return Err(StageError::transient(
                        "embed",
                        format!(
                            "the model returned {} vectors for {} chunks",
                            vecs.len(),
                            texts.len()
                        ),
                    ));
                }
                for ((i, c), v) in group.iter().zip(vecs) {
                    chunk_vecs.entry(*i).or_default().push(ChunkVectors {
                        chunk: (*c).clone(),
                        embedding: v,
                    });
                }
                shared
                    .stats
                    .chunks_embedded
                    .fetch_add(texts.len() as u64, Ordering::SeqCst);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for it in &items {
                if let Pending::Page(d, _) = it {
                    d.fail(e.clone());
                }
            }
        }
    }
    for (i, it) in items.into_iter().enumerate() {
        let msg = match it {
            Pending::Page(d, _) => {
                if d.failure().is_some() {
                    continue;
                }
                EmbedMsg::Page(
                    d,
                    page_vecs.remove(&i),
                    chunk_vecs.remove(&i).unwrap_or_default(),
                )
            }
            Pending::End(d, res, interrupted) => EmbedMsg::End(d, res, interrupted),
        };
        if vec_tx.blocking_send(msg).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- sync

#[derive(Default)]
struct DocBuffer {
    pages: Vec<PageRecord>,
    chunks: Vec<ChunkVectors>,
    num_chunks: u32,
}

async fn sync_stage<S: Sink>(shared: Arc<Shared<S>>, mut vec_rx: mpsc::Receiver<EmbedMsg>) {
    let mut buffers: HashMap<u64, DocBuffer> = HashMap::new();
    while let Some(msg) = vec_rx.recv().await {
        let r = match msg {
            EmbedMsg::Page(doc, page, chunks) => {
                let buf = buffers.entry(doc.job.seq).or_default();
                buf.num_chunks += chunks.len() as u32;
                buf.pages.extend(page);
                buf.chunks.extend(chunks);
                if buf.pages.len() >= shared.settings.upsert_pages.max(1) {
                    upsert(&shared, &doc, buf).await;
                }
                Ok(())
            }
            EmbedMsg::End(doc, res, interrupted) => {
                let mut buf = buffers.remove(&doc.job.seq).unwrap_or_default();
                finish(&shared, &doc, &mut buf, res, interrupted).await
            }
        };
        if let Err(e) = r {
            tracing::error!("job queue unwritable: {e}");
        }
    }
}

fn doc_meta<S>(shared: &Shared<S>, doc: &Doc) -> DocumentMeta {
    let num_pages = doc.info.get().map(|i| i.num_pages).unwrap_or(0);
    let format = doc.info.get().map(|i| i.format).unwrap_or(doc.format);
    shared.meta(
        &doc.path,
        doc.doc_id.clone(),
        format,
        num_pages,
        doc.hash.clone(),
    )
}

async fn upsert<S: Sink>(shared: &Shared<S>, doc: &Doc, buf: &mut DocBuffer) {
    if doc.failure().is_some() || (buf.pages.is_empty() && buf.chunks.is_empty()) {
        return;
    }
    let meta = doc_meta(shared, doc);
    if !buf.pages.is_empty() {
        if let Err(e) = shared.sink.upsert_pages(&meta, &buf.pages).await {
            doc.fail(e);
            return;
        }
    }
    if !buf.chunks.is_empty() {
        if let Err(e) = shared.sink.upsert_chunks(&meta, &buf.chunks).await {
            doc.fail(e);
        }
    }
    buf.pages.clear();
    buf.chunks.clear();
}

async fn finish<S: Sink>(
    shared: &Shared<S>,
    doc: &Doc,
    buf: &mut DocBuffer,
    res: Result<DocInfo, StageError>,
    interrupted: bool,
) -> Result<(), StoreError> {
    if interrupted {
        // Checkpoint: the job runs again at the next start.
        shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        shared.report(Outcome::Interrupted {
            path: doc.path.clone(),
        });
        return shared
            .store
            .defer(&doc.job, Some(doc.stamp), Duration::ZERO);
    }
    if let Err(e) = res {
        doc.fail(e);
    }
    upsert(shared, doc, buf).await;
    let meta = doc_meta(shared, doc);
    let num_pages = meta.num_pages;
    if doc.failure().is_none() {
        if let Err(e) = shared
            .sink
            .finish_document(&meta, num_pages, buf.num_chunks)
            .await
        {
            doc.fail(e);
        }
    }
    if let Some(e) = doc.failure() {
        shared.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Remember the failure with the file, so an unchanged file is not retried at start.
        let prev = shared.store.file(&doc.path)?;
        let rec = FileRecord {
            stamp: doc.stamp,
            content_hash: doc.hash.clone(),
            doc_id: doc.doc_id.clone(),
            num_pages: prev.as_ref().map(|p| p.num_pages).unwrap_or(0),
            num_chunks: prev.as_ref().map(|p| p.num_chunks).unwrap_or(0),
            model: shared.model_id.clone(),
            schema_version: SCHEMA_VERSION,
            indexed_at: prev.and_then(|p| p.indexed_at),
            last_error: Some(e.to_string()),
        };
        shared.store.put_file(&doc.path, &rec)?;
        return shared.job_failed(&doc.job, &doc.path, &e);
    }
    let rec = FileRecord {
        stamp: doc.stamp,
        content_hash: doc.hash.clone(),
        doc_id: doc.doc_id.clone(),
        num_pages,
        num_chunks: buf.num_chunks,
        model: shared.model_id.clone(),
        schema_version: SCHEMA_VERSION,
        indexed_at: Some(meta.timestamp.clone()),
        last_error: None,
    };
    shared.store.put_file(&doc.path, &rec)?;
    bump(&shared.stats.documents_indexed);
    tracing::info!(path = %doc.path.display(), pages = num_pages, chunks = buf.num_chunks, seconds = doc.started.elapsed().as_secs_f32(), "indexed");
    shared.report(Outcome::Indexed {
        path: doc.path.clone(),
        pages: num_pages,
        chunks: buf.num_chunks,
    });
    shared.job_done(&doc.job)
}
