//! The sync stage: upserts each document's records as its pages arrive, prunes what no longer
//! exists when it ends, records the file in the store and closes its job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{fail_point, fatal, Doc, EmbeddedPage, Ending, FailStage, Outcome, Shared, StageMsg};
use crate::agent::stages::{ChunkRecord, DocumentMeta, PageRecord, Sink, Stage, StageError};
use crate::state::{FileRecord, StoreError};
use crate::supervisor::TaskError;
use crate::telemetry::DocStage;
use crate::types::SCHEMA_VERSION;

/// A document's records not yet written, and what writing them took so far.
#[derive(Default)]
struct DocBuffer {
    pages: Vec<PageRecord>,
    chunks: Vec<ChunkRecord>,
    num_chunks: u32,
    sync_time: Duration,
}

pub(super) async fn run<S: Sink>(
    shared: Arc<Shared<S>>,
    mut vec_rx: mpsc::Receiver<StageMsg<EmbeddedPage>>,
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
                    upsert(&shared, &doc, buf).await;
                }
            }
            StageMsg::End(doc, ending) => {
                let mut buf = buffers.remove(&doc.job.seq).unwrap_or_default();
                let seq = doc.job.seq;
                let r = finish(&shared, &doc, &mut buf, ending).await;
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

/// A failed Chroma write fails the document (it is retried with back-off).
fn sink_failed<S>(shared: &Shared<S>, doc: &Doc, e: StageError) {
    if e.stage == Stage::Sync {
        shared.telemetry.chroma_errors.inc();
    }
    doc.fail(e);
}

async fn upsert<S: Sink>(shared: &Shared<S>, doc: &Doc, buf: &mut DocBuffer) {
    if doc.failure().is_some() || (buf.pages.is_empty() && buf.chunks.is_empty()) {
        return;
    }
    let started = Instant::now();
    let meta = doc_meta(shared, doc);
    if !buf.pages.is_empty() {
        if let Err(e) = shared.sink.upsert_pages(&meta, &buf.pages).await {
            sink_failed(shared, doc, e);
            return;
        }
    }
    if !buf.chunks.is_empty() {
        if let Err(e) = shared.sink.upsert_chunks(&meta, &buf.chunks).await {
            sink_failed(shared, doc, e);
        }
    }
    buf.sync_time += started.elapsed();
    buf.pages.clear();
    buf.chunks.clear();
}

async fn finish<S: Sink>(
    shared: &Shared<S>,
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
    upsert(shared, doc, buf).await;
    let meta = doc_meta(shared, doc);
    let num_pages = meta.num_pages;
    if doc.failure().is_none() {
        let started = Instant::now();
        if let Err(e) = shared
            .sink
            .finish_document(&meta, num_pages, buf.num_chunks)
            .await
        {
            sink_failed(shared, doc, e);
        }
        buf.sync_time += started.elapsed();
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
