//! The pipeline: jobs from the store → extract → embed → sync, as concurrent stages joined by
//! bounded channels, so memory stays bounded however many files arrive and the model never
//! waits on rendering or on the network. One file per stage:
//!
//! - [`dispatch`] (async) takes due jobs, does deletions and moves itself, checks that a file
//!   has settled and really changed (size, mtime, blake3), and hands documents to extraction;
//! - [`extract`] (one blocking thread) streams pages;
//! - [`embed`] (one blocking thread) batches pages across documents, loads the model on the
//!   first page and unloads it after an idle period;
//! - [`sync`] (async) upserts records, prunes stale ones, records the file and closes the job.
//!
//! Every stage is a task of the [`Supervisor`]: it records what it does in the shared
//! [`Telemetry`], and returns an error only when it cannot go on (the state store cannot be
//! written); that makes the agent degraded and `run` exit non-zero.
//!
//! Shutdown (the supervisor's token): the dispatcher stops taking jobs, extraction stops at
//! the next page, and every document not finished is put back in the queue (a checkpoint: the
//! job runs again at the next start, and a re-index overwrites the same record ids).

mod dispatch;
mod embed;
mod extract;
mod sync;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use super::stages::{
    ChunkRecord, DocumentInfo, DocumentMeta, EmbedLoader, Extract, Page, PageRecord, Sink,
    StageError,
};
use crate::state::{FileStamp, Job, JobState, RetryPolicy, Store, StoreError};
use crate::supervisor::{Supervisor, TaskError};
use crate::telemetry::Stage;
use crate::telemetry::Telemetry;
use crate::types::{ContentHash, DocFormat, DocId};

/// What the pipeline needs to know, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub agent_id: String,
    /// How long a file must stay unchanged before it is processed, unless its writer closed
    /// it (see [`PipelineSettings::settle_check`]).
    pub settle: Duration,
    /// How long a file its writer closed (or that was moved in whole) must stay unchanged;
    /// doubled for each change seen while it waited, up to `settle`.
    pub settle_check: Duration,
    pub retry: RetryPolicy,
    /// Pages held between stages (each channel).
    pub queue_pages: usize,
    pub batch_visual: usize,
    pub batch_text: usize,
    /// Unload the model after this long without work (`None`: keep it).
    pub idle_unload: Option<Duration>,
    /// A document with this many pages waiting is written without waiting for its end (the
    /// sync stage gathers records across documents into larger writes).
    pub upsert_pages: usize,
    /// A stage made to fail on purpose (tests; see [`FailPoint`]).
    pub fail_point: Option<FailPoint>,
    /// A job whose stage cannot work yet (the model's files cannot be fetched now) waits with
    /// back-off instead of failing (`run`; a one-shot `index` reports it instead).
    pub wait_when_unavailable: bool,
}

/// First and longest wait of a job whose model is not available yet.
const UNAVAILABLE_FIRST_WAIT: Duration = Duration::from_secs(5);
const UNAVAILABLE_LONGEST_WAIT: Duration = Duration::from_secs(300);

/// A named point where a stage can be made to fail fatally, to test what the agent does when
/// a stage dies: `DOCUSEARCH_FAILPOINT=extract` (an error) or `extract:panic` (a panic), also
/// `dispatch`, `embed`, `sync`. It fires on the first document that reaches that stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailPoint {
    pub stage: FailStage,
    pub panic: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailStage {
    Dispatch,
    Extract,
    Embed,
    Sync,
}

/// The environment variable [`FailPoint::from_env`] reads.
pub const FAILPOINT_ENV: &str = "DOCUSEARCH_FAILPOINT";

impl FailPoint {
    pub fn parse(s: &str) -> Option<FailPoint> {
        let (stage, panic) = match s.trim().split_once(':') {
            Some((stage, "panic")) => (stage, true),
            Some(_) => return None,
            None => (s.trim(), false),
        };
        let stage = match stage {
            "dispatch" => FailStage::Dispatch,
            "extract" => FailStage::Extract,
            "embed" => FailStage::Embed,
            "sync" => FailStage::Sync,
            _ => return None,
        };
        Some(FailPoint { stage, panic })
    }

    /// From `DOCUSEARCH_FAILPOINT`; an unknown value is ignored with a warning.
    pub fn from_env() -> Option<FailPoint> {
        let v = std::env::var(FAILPOINT_ENV).ok()?;
        let fp = FailPoint::parse(&v);
        match fp {
            Some(fp) => tracing::warn!("{FAILPOINT_ENV}={v}: the {fp:?} stage will fail on purpose"),
            None => tracing::warn!("{FAILPOINT_ENV}={v} is not a failure point (dispatch, extract, embed, sync, with :panic); ignored"),
        }
        fp
    }
}

/// Fails on purpose when `settings.fail_point` names `stage`.
fn fail_point(settings: &PipelineSettings, stage: FailStage) -> Result<(), TaskError> {
    match settings.fail_point {
        Some(fp) if fp.stage == stage && fp.panic => {
            panic!("failure point {stage:?} ({FAILPOINT_ENV})")
        }
        Some(fp) if fp.stage == stage => Err(TaskError::new(format!(
            "failure point {stage:?} ({FAILPOINT_ENV})"
        ))),
        _ => Ok(()),
    }
}

/// How one job ended, for `index`'s summary and the status snapshot.
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
    info: OnceLock<DocumentInfo>,
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

/// How extraction of a document ended.
enum Ending {
    /// It read the whole document (or failed reading it).
    Finished(Result<DocumentInfo, StageError>),
    /// It stopped early for a shutdown: the job goes back in the queue.
    Interrupted,
}

/// What passes from one stage to the next: a document's pages, in order, then its end.
enum StageMsg<P> {
    Page(Arc<Doc>, P),
    End(Arc<Doc>, Ending),
}

/// A page after the model: its record (`None` for documents without images) and its chunks.
struct EmbeddedPage {
    record: Option<PageRecord>,
    chunks: Vec<ChunkRecord>,
}

/// Everything the stages share.
struct Shared<S> {
    store: Store,
    sink: S,
    settings: PipelineSettings,
    model_id: String,
    telemetry: Arc<Telemetry>,
    outcomes: Option<mpsc::UnboundedSender<Outcome>>,
    /// The next wait of a job whose model is not available; reset when the model loads.
    unavailable_wait: Mutex<Duration>,
}

impl<S> Shared<S> {
    fn report(&self, o: Outcome) {
        if let Some(tx) = &self.outcomes {
            let _ = tx.send(o);
        }
        self.telemetry.poke();
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
            agent_id: self.settings.agent_id.clone(),
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
        self.telemetry.in_flight.dec();
        let reason = e.to_string();
        self.telemetry.failures.inc(e.stage);
        if e.stage == Stage::Model {
            // Extraction needs the model's configuration too: the model is what failed.
            self.telemetry.model_failed(e.reason.clone());
        }
        if e.waits && self.settings.wait_when_unavailable {
            let wait = {
                let mut w = self
                    .unavailable_wait
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let now = *w;
                *w = (now * 2).min(UNAVAILABLE_LONGEST_WAIT);
                now
            };
            tracing::warn!(path = %path.display(), "{reason}; it waits in the queue and is tried again in {wait:?}");
            self.report(Outcome::Retrying {
                path: path.to_path_buf(),
                reason,
            });
            return self.store.defer(job, job.seen, wait);
        }
        tracing::warn!(path = %path.display(), "{reason}");
        let state = self
            .store
            .fail(job, &reason, e.permanent, self.settings.retry)?;
        if state == JobState::Failed {
            self.telemetry.files_failed.inc();
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

    /// A deletion or a move that Chroma did not take: while Chroma is away the job waits (no
    /// attempt used up); anything else fails it as usual.
    fn sync_failed(&self, job: &Job, path: &Path, e: &StageError) -> Result<(), StoreError> {
        if e.stage != Stage::Sync {
            return self.job_failed(job, path, e);
        }
        self.telemetry.chroma_errors.inc();
        if e.permanent {
            return self.job_failed(job, path, e);
        }
        self.telemetry.failures.inc(Stage::Sync);
        self.telemetry.chroma_waiting(Some(e.reason.clone()));
        self.telemetry.in_flight.dec();
        tracing::warn!(path = %path.display(), "{e}; tried again in {CHROMA_AWAY_RETRY:?}");
        self.store.defer(job, job.seen, CHROMA_AWAY_RETRY)
    }

    fn job_done(&self, job: &Job) -> Result<(), StoreError> {
        self.telemetry.in_flight.dec();
        self.store.complete(job)
    }

    /// Puts a job back in the queue to run again at once (a shutdown interrupted it).
    fn job_interrupted(&self, job: &Job, path: &Path, stamp: FileStamp) -> Result<(), StoreError> {
        self.telemetry.in_flight.dec();
        self.report(Outcome::Interrupted {
            path: path.to_path_buf(),
        });
        self.store.defer(job, Some(stamp), Duration::ZERO)
    }
}

/// How long a deletion or move waits before it is tried again while Chroma is away.
const CHROMA_AWAY_RETRY: Duration = Duration::from_secs(10);

/// A store error a stage cannot go on after.
fn fatal(what: &str, e: StoreError) -> TaskError {
    TaskError::new(format!("{what}: {e}"))
}

/// When the dispatcher stops taking jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Until shutdown (`run`).
    Forever,
    /// Once the queue holds nothing due or running (`index`).
    UntilIdle,
}

/// Starts the stages as tasks of `supervisor`; they end when its token is cancelled (or, in
/// [`Mode::UntilIdle`], when the queue is empty), which [`Supervisor::wait`] waits for. Must be
/// called inside a tokio runtime.
#[allow(clippy::too_many_arguments)]
pub fn start<X: Extract, L: EmbedLoader, S: Sink>(
    supervisor: &Supervisor,
    store: Store,
    extractor: X,
    loader: L,
    sink: S,
    settings: PipelineSettings,
    mode: Mode,
    outcomes: Option<mpsc::UnboundedSender<Outcome>>,
) {
    let queue = settings.queue_pages.max(1);
    let shared = Arc::new(Shared {
        store,
        sink,
        model_id: loader.model_id(),
        settings,
        telemetry: supervisor.telemetry().clone(),
        outcomes,
        unavailable_wait: Mutex::new(UNAVAILABLE_FIRST_WAIT),
    });
    let token = supervisor.token().clone();

    let (doc_tx, doc_rx) = mpsc::channel::<Arc<Doc>>(1);
    let (page_tx, page_rx) = std::sync::mpsc::sync_channel::<StageMsg<Page>>(queue);
    let (vec_tx, vec_rx) = mpsc::channel::<StageMsg<EmbeddedPage>>(queue);

    let (sh, tk) = (shared.clone(), token.clone());
    supervisor.spawn_blocking("extract", move || {
        extract::run(extractor, doc_rx, page_tx, tk, sh)
    });
    let sh = shared.clone();
    supervisor.spawn_blocking("embed", move || {
        // The model is bulk work: it runs on threads that yield the CPU (crate::priority).
        match crate::priority::bulk_pool("ds-embed") {
            Ok(pool) => pool.install(|| {
                // candle's element-wise helper threads start with the first thread that needs
                // them, at its priority: start them here, below the agent, not in a search.
                candle_core::utils::barrier_pool();
                embed::run(loader, page_rx, vec_tx, sh)
            }),
            Err(e) => {
                tracing::warn!("the model runs at the agent's priority: no thread pool: {e}");
                embed::run(loader, page_rx, vec_tx, sh)
            }
        }
    });
    supervisor.spawn(
        "dispatch",
        dispatch::run(shared.clone(), doc_tx, token, mode),
    );
    supervisor.spawn(
        "sync",
        sync::run(shared, vec_rx, supervisor.token().clone()),
    );
}
