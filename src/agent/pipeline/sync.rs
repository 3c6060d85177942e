//! The sync stage: upserts each document's records as its pages arrive, prunes what no longer
//! exists when it ends, records the file in the store and closes its job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{fail_point, fatal, Doc, EmbeddedPage, Ending, FailStage, Outcome, Shared, StageMsg};
use crate::agent::stages::{ChunkRecord, DocumentMeta, PageRecord, Sink, Stage, StageError};
use crate::state::{FileRecord, StoreError};
use crate::supervisor::{CancellationToken, TaskError};
use crate::telemetry::DocStage;
use crate::types::SCHEMA_VERSION;

/// A document's records not yet written, and what writing them took so far.
#[derive(Default)]
struct DocBuffer {
    pages: Vec<PageRecord>,
    chunks: Vec<ChunkRecord>,
    num_chunks: u32,
    sync_time: Duration,
    /// The agent stopped while these records waited for Chroma.
    stopped: bool,
}

pub(super) async fn run<S: Sink>(
    shared: Arc<Shared<S>>,
    mut vec_rx: mpsc::Receiver<StageMsg<EmbeddedPage>>,
    token: CancellationToken,
) -> Result<(), TaskError> {
    let mut buffers: HashMap<u64, DocBuffer> = HashMap::new();
    while let Some(msg) = vec_rx.recv().await {
        fail_point(&shared.settings, FailStage::Sync)?;
        match msg {
            StageMsg::Page(doc, page) => {
                let buf = buffers.entry(doc.job.seq).or_default();
                buf.num_chunks += page.chunks.len() as u32;
                buf.pages.extend(page.record);
                buf.chunks.extend(page.chunks);
                if buf.pages.len() >= shared.settings.upsert_pages.max(1) {
                    upsert(&shared, &token, &doc, buf).await;
                }
            }
            StageMsg::End(doc, ending) => {
                let mut buf = buffers.remove(&doc.job.seq).unwrap_or_default();
                let seq = doc.job.seq;
                let r = finish(&shared, &token, &doc, &mut buf, ending).await;
                shared.telemetry.document_finished(seq);
                r.map_err(|e| fatal("the job queue cannot be written", e))?;
            }
        }
    }
    Ok(())
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

/// Longest wait between two tries of a write while Chroma is away.
const MAX_CHROMA_WAIT: Duration = Duration::from_secs(30);

/// One write of a document's records.
enum Write<'a> {
    Pages(&'a [PageRecord]),
    Chunks(&'a [ChunkRecord]),
    /// Prunes the records the document no longer has.
    Finish {
        pages: u32,
        chunks: u32,
    },
}

/// Why a write did not happen.
enum Halt {
    /// The write failed for good (the document fails).
    Failed(StageError),
    /// The agent is stopping while Chroma is away: the document goes back in the queue.
    Stopped,
}

/// Writes to Chroma until the write succeeds, fails for good, or the agent stops. A Chroma
/// that is away or answers 5xx is not the document's fault: the records already embedded are
/// kept (the stages before this one wait, so memory stays bounded), tried again with back-off
/// up to [`MAX_CHROMA_WAIT`], no attempt of the job is used up, and `/health` says why.
async fn write<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    doc: &Doc,
    meta: &DocumentMeta,
    w: Write<'_>,
) -> Result<(), Halt> {
    let t = &shared.telemetry;
    let mut delay = Duration::from_secs(1);
    let mut waited = false;
    loop {
        let result = match &w {
            Write::Pages(p) => shared.sink.upsert_pages(meta, p).await,
            Write::Chunks(c) => shared.sink.upsert_chunks(meta, c).await,
            Write::Finish { pages, chunks } => {
                shared.sink.finish_document(meta, *pages, *chunks).await
            }
        };
        let e = match result {
            Ok(()) => {
                // Chroma answers (also after a deletion or move had to wait).
                t.chroma_waiting(None);
                if waited {
                    tracing::info!(path = %doc.path.display(), "Chroma takes records again; writing on");
                }
                return Ok(());
            }
            Err(e) => e,
        };
        if e.stage == Stage::Sync {
            t.chroma_errors.inc();
        }
        if e.stage != Stage::Sync || e.permanent {
            return Err(Halt::Failed(e));
        }
        t.failures.inc(Stage::Sync);
        if !waited {
            tracing::warn!(path = %doc.path.display(), "{e}; the records embedded so far are kept and written when Chroma takes them again");
        }
        waited = true;
        t.chroma_waiting(Some(e.reason.clone()));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = token.cancelled() => {
                t.chroma_waiting(None);
                return Err(Halt::Stopped);
            }
        }
        delay = (delay * 2).min(MAX_CHROMA_WAIT);
    }
}

async fn upsert<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    doc: &Doc,
    buf: &mut DocBuffer,
) {
    if doc.failure().is_some() || buf.stopped || (buf.pages.is_empty() && buf.chunks.is_empty()) {
        return;
    }
    let started = Instant::now();
    let meta = doc_meta(shared, doc);
    let mut halted = None;
    if !buf.pages.is_empty() {
        halted = write(shared, token, doc, &meta, Write::Pages(&buf.pages))
            .await
            .err();
    }
    if halted.is_none() && !buf.chunks.is_empty() {
        halted = write(shared, token, doc, &meta, Write::Chunks(&buf.chunks))
            .await
            .err();
    }
    buf.sync_time += started.elapsed();
    match halted {
        None => {
            buf.pages.clear();
            buf.chunks.clear();
        }
        Some(Halt::Failed(e)) => doc.fail(e),
        Some(Halt::Stopped) => buf.stopped = true,
    }
}

async fn finish<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    doc: &Doc,
    buf: &mut DocBuffer,
    ending: Ending,
) -> Result<(), StoreError> {
    let res = match ending {
        // Checkpoint: the job runs again at the next start.
        Ending::Interrupted => return shared.job_interrupted(&doc.job, &doc.path, doc.stamp),
        Ending::Finished(res) => res,
    };
    if let Err(e) = res {
        doc.fail(e);
    }
    shared
        .telemetry
        .document_stage(doc.job.seq, DocStage::Syncing);
    upsert(shared, token, doc, buf).await;
    let meta = doc_meta(shared, doc);
    let num_pages = meta.num_pages;
    if doc.failure().is_none() && !buf.stopped {
        let started = Instant::now();
        let w = Write::Finish {
            pages: num_pages,
            chunks: buf.num_chunks,
        };
        match write(shared, token, doc, &meta, w).await {
            Ok(()) => {}
            Err(Halt::Failed(e)) => doc.fail(e),
            Err(Halt::Stopped) => buf.stopped = true,
        }
        buf.sync_time += started.elapsed();
    }
    if buf.stopped {
        // Not written completely: the job runs again at the next start (a re-index
        // overwrites the same record ids).
        return shared.job_interrupted(&doc.job, &doc.path, doc.stamp);
    }
    if let Some(e) = doc.failure() {
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
    let t = &shared.telemetry;
    t.sync_latency.observe(buf.sync_time.as_secs_f64());
    t.files_indexed.inc();
    t.pages_indexed.inc_by(num_pages as u64);
    t.chunks_indexed.inc_by(buf.num_chunks as u64);
    tracing::info!(path = %doc.path.display(), pages = num_pages, chunks = buf.num_chunks, seconds = doc.started.elapsed().as_secs_f32(), "indexed");
    shared.report(Outcome::Indexed {
        path: doc.path.clone(),
        pages: num_pages,
        chunks: buf.num_chunks,
    });
    shared.job_done(&doc.job)
}
