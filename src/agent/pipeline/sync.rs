//! The sync stage: upserts the records of the pages as they arrive, gathered across documents
//! into few large writes, prunes what no longer exists when a document ends, records the file
//! in the store and closes its job.

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

/// Embedding bytes (f32) gathered for one write: about one request's worth once encoded
/// (base64 adds a third; a local Chroma takes 40 MiB a request).
const WRITE_BYTES: usize = 24 << 20;

/// A document's records not yet written, and what writing them took so far.
struct DocBuffer {
    doc: Arc<Doc>,
    pages: Vec<PageRecord>,
    chunks: Vec<ChunkRecord>,
    num_chunks: u32,
    sync_time: Duration,
    /// The agent stopped while these records waited for Chroma.
    stopped: bool,
}

impl DocBuffer {
    fn new(doc: Arc<Doc>) -> DocBuffer {
        DocBuffer {
            doc,
            pages: Vec::new(),
            chunks: Vec::new(),
            num_chunks: 0,
            sync_time: Duration::ZERO,
            stopped: false,
        }
    }

    /// Records to write: none once the document failed or the agent stopped.
    fn has_writes(&self) -> bool {
        !(self.pages.is_empty() && self.chunks.is_empty())
            && self.doc.failure().is_none()
            && !self.stopped
    }
}

/// The documents the stage holds: their records not yet written, and those whose last page
/// came (finished after their records are written).
struct Held {
    buffers: HashMap<u64, DocBuffer>,
    ended: Vec<(Arc<Doc>, Ending)>,
    /// Embedding bytes not yet written.
    bytes: usize,
}

impl Held {
    fn take(&mut self, msg: StageMsg<EmbeddedPage>) {
        match msg {
            StageMsg::Page(doc, page) => {
                let buf = self
                    .buffers
                    .entry(doc.job.seq)
                    .or_insert_with(|| DocBuffer::new(doc.clone()));
                buf.num_chunks += page.chunks.len() as u32;
                self.bytes += page
                    .record
                    .iter()
                    .map(|p| p.embedding.data.len() * 4)
                    .sum::<usize>()
                    + page
                        .chunks
                        .iter()
                        .map(|c| c.embedding.data.len() * 4)
                        .sum::<usize>();
                buf.pages.extend(page.record);
                buf.chunks.extend(page.chunks);
            }
            StageMsg::End(doc, ending) => {
                let buf = self
                    .buffers
                    .entry(doc.job.seq)
                    .or_insert_with(|| DocBuffer::new(doc.clone()));
                match &ending {
                    // Checkpoint: the job runs again, and writes these records then.
                    Ending::Interrupted => {
                        buf.pages.clear();
                        buf.chunks.clear();
                    }
                    // A failed document's records are not written.
                    Ending::Finished(Err(e)) => doc.fail(e.clone()),
                    Ending::Finished(Ok(_)) => {}
                }
                self.ended.push((doc, ending));
            }
        }
    }

    /// Whether to write now, with nothing more ready: a document ended (its job closes once its
    /// records are in), or a document has `upsert_pages` pages waiting (search sees a long
    /// document grow), or a request's worth is held.
    fn due(&self, upsert_pages: usize) -> bool {
        !self.ended.is_empty()
            || self.bytes >= WRITE_BYTES
            || self
                .buffers
                .values()
                .any(|b| b.pages.len() >= upsert_pages.max(1))
    }
}

pub(super) async fn run<S: Sink>(
    shared: Arc<Shared<S>>,
    mut vec_rx: mpsc::Receiver<StageMsg<EmbeddedPage>>,
    token: CancellationToken,
) -> Result<(), TaskError> {
    let mut held = Held {
        buffers: HashMap::new(),
        ended: Vec::new(),
        bytes: 0,
    };
    while let Some(msg) = vec_rx.recv().await {
        fail_point(&shared.settings, FailStage::Sync)?;
        held.take(msg);
        // What else is ready joins this write, up to a request's worth: while Chroma is busy
        // the next write grows; when the agent is idle a page is written as soon as it comes.
        while held.bytes < WRITE_BYTES {
            match vec_rx.try_recv() {
                Ok(msg) => {
                    fail_point(&shared.settings, FailStage::Sync)?;
                    held.take(msg);
                }
                Err(_) => break,
            }
        }
        if !held.due(shared.settings.upsert_pages) {
            continue;
        }
        // Documents whose last page came are syncing now; the others are still being read.
        for (doc, _) in &held.ended {
            shared
                .telemetry
                .document_stage(doc.job.seq, DocStage::Syncing);
        }
        write_held(&shared, &token, &mut held.buffers).await;
        held.bytes = 0;
        for (doc, ending) in std::mem::take(&mut held.ended) {
            let seq = doc.job.seq;
            let mut buf = held
                .buffers
                .remove(&seq)
                .unwrap_or_else(|| DocBuffer::new(doc.clone()));
            let r = finish(&shared, &token, &doc, &mut buf, ending).await;
            shared.telemetry.document_finished(seq);
            r.map_err(|e| fatal("the job queue cannot be written", e))?;
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

/// One write of some documents' records.
enum Write<'a> {
    /// Pages, then chunks.
    Records {
        pages: &'a [(&'a DocumentMeta, &'a [PageRecord])],
        chunks: &'a [(&'a DocumentMeta, &'a [ChunkRecord])],
    },
    /// Prunes the records the document no longer has.
    Finish {
        meta: &'a DocumentMeta,
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
/// that is away or answers 5xx is not the documents' fault: the records already embedded are
/// kept (the stages before this one wait, so memory stays bounded), tried again with back-off
/// up to [`MAX_CHROMA_WAIT`], no attempt of the job is used up, and `/health` says why.
/// `what` names the documents for the log.
async fn write<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    what: &str,
    w: Write<'_>,
) -> Result<(), Halt> {
    let t = &shared.telemetry;
    let mut delay = Duration::from_secs(1);
    let mut waited = false;
    loop {
        let result = match &w {
            Write::Records { pages, chunks } => shared.sink.upsert_records(pages, chunks).await,
            Write::Finish {
                meta,
                pages,
                chunks,
            } => shared.sink.finish_document(meta, *pages, *chunks).await,
        };
        let e = match result {
            Ok(()) => {
                // Chroma answers (also after a deletion or move had to wait).
                t.chroma_waiting(None);
                if waited {
                    tracing::info!(path = %what, "Chroma takes records again; writing on");
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
            tracing::warn!(path = %what, "{e}; the records embedded so far are kept and written when Chroma takes them again");
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

/// Writes the records of these documents: pages, then chunks.
async fn write_records<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    bufs: &[&DocBuffer],
) -> Result<(), Halt> {
    let metas: Vec<DocumentMeta> = bufs.iter().map(|b| doc_meta(shared, &b.doc)).collect();
    let what = crate::sync::documents_label(metas.iter().map(|m| m.source_path.as_path()));
    let pages: Vec<(&DocumentMeta, &[PageRecord])> = metas
        .iter()
        .zip(bufs)
        .filter(|(_, b)| !b.pages.is_empty())
        .map(|(m, b)| (m, b.pages.as_slice()))
        .collect();
    let chunks: Vec<(&DocumentMeta, &[ChunkRecord])> = metas
        .iter()
        .zip(bufs)
        .filter(|(_, b)| !b.chunks.is_empty())
        .map(|(m, b)| (m, b.chunks.as_slice()))
        .collect();
    let w = Write::Records {
        pages: &pages,
        chunks: &chunks,
    };
    write(shared, token, &what, w).await
}

/// Writes every held record, all documents together. A write refused for good is tried again
/// one document at a time, so only the document at fault fails.
async fn write_held<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    buffers: &mut HashMap<u64, DocBuffer>,
) {
    let mut seqs: Vec<u64> = buffers
        .iter()
        .filter(|(_, b)| b.has_writes())
        .map(|(s, _)| *s)
        .collect();
    if seqs.is_empty() {
        return;
    }
    seqs.sort_unstable();
    let started = Instant::now();
    let all: Vec<&DocBuffer> = seqs.iter().map(|s| &buffers[s]).collect();
    let outcome = write_records(shared, token, &all).await;
    let results: Vec<(u64, Result<(), Halt>)> = match outcome {
        Err(Halt::Failed(_)) if seqs.len() > 1 => {
            let mut each = Vec::new();
            for &seq in &seqs {
                each.push((seq, write_records(shared, token, &[&buffers[&seq]]).await));
            }
            each
        }
        Ok(()) => seqs.iter().map(|s| (*s, Ok(()))).collect(),
        Err(Halt::Stopped) => seqs.iter().map(|s| (*s, Err(Halt::Stopped))).collect(),
        Err(Halt::Failed(e)) => vec![(seqs[0], Err(Halt::Failed(e)))],
    };
    let took = started.elapsed();
    for (seq, result) in results {
        let buf = buffers.get_mut(&seq).expect("held");
        buf.sync_time += took;
        match result {
            Ok(()) => {
                buf.pages.clear();
                buf.chunks.clear();
            }
            Err(Halt::Failed(e)) => buf.doc.fail(e),
            Err(Halt::Stopped) => buf.stopped = true,
        }
    }
}

async fn finish<S: Sink>(
    shared: &Shared<S>,
    token: &CancellationToken,
    doc: &Doc,
    buf: &mut DocBuffer,
    ending: Ending,
) -> Result<(), StoreError> {
    if let Ending::Interrupted = ending {
        // Checkpoint: the job runs again at the next start.
        return shared.job_interrupted(&doc.job, &doc.path, doc.stamp);
    }
    // The document's records were written before this (`write_held`); a failed extraction
    // marked the document failed when its end came.
    let meta = doc_meta(shared, doc);
    let num_pages = meta.num_pages;
    if doc.failure().is_none() && !buf.stopped {
        let started = Instant::now();
        let what = doc.path.display().to_string();
        let w = Write::Finish {
            meta: &meta,
            pages: num_pages,
            chunks: buf.num_chunks,
        };
        match write(shared, token, &what, w).await {
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
