//! The model stage: one blocking thread batches pages across documents, loads the model when
//! the first page needs it, unloads it after an idle period, and passes every page on in order.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{fail_point, EmbeddedPage, FailStage, Shared, StageMsg};
use crate::agent::stages::{
    ChunkRecord, Embed, EmbedLoader, Page, PageRecord, Stage, StageError, TextChunk,
};
use crate::supervisor::TaskError;
use crate::types::MultiVector;

/// Longest a part-filled batch waits for pages that extraction is still rendering.
const MAX_BATCH_WAIT: Duration = Duration::from_secs(2);

pub(super) fn run<L: EmbedLoader, S>(
    loader: L,
    page_rx: Receiver<StageMsg<Page>>,
    vec_tx: mpsc::Sender<StageMsg<EmbeddedPage>>,
    shared: Arc<Shared<S>>,
) -> Result<(), TaskError> {
    let batch_visual = shared.settings.batch_visual.max(1);
    let idle = shared.settings.idle_unload;
    let mut stage = ModelStage {
        loader,
        model: None,
        shared,
        vec_tx,
    };
    let mut batch: Vec<StageMsg<Page>> = Vec::new();
    let mut pages_in_batch = 0usize;
    loop {
        let msg = if !batch.is_empty() {
            match page_rx.try_recv() {
                Ok(m) => Some(m),
                // Nothing more ready right now. While extraction has documents in hand, their
                // pages join this batch (pages of several documents share a model call);
                // otherwise embed what we have rather than wait.
                Err(TryRecvError::Empty) => {
                    let more_coming =
                        pages_in_batch > 0 && stage.shared.telemetry.extracting.get() > 0;
                    let next = if more_coming {
                        page_rx.recv_timeout(MAX_BATCH_WAIT).ok()
                    } else {
                        None
                    };
                    match next {
                        Some(m) => Some(m),
                        None => {
                            stage.flush(&mut batch)?;
                            pages_in_batch = 0;
                            continue;
                        }
                    }
                }
                Err(TryRecvError::Disconnected) => None,
            }
        } else {
            match (idle, stage.model.is_some()) {
                (Some(idle), true) => match page_rx.recv_timeout(idle) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::info!("model idle for {idle:?}: unloading it");
                        stage.model = None;
                        stage.shared.telemetry.model_unloaded();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                },
                _ => page_rx.recv().ok(),
            }
        };
        let Some(msg) = msg else {
            stage.flush(&mut batch)?;
            break;
        };
        match msg {
            StageMsg::Page(doc, page) => {
                if doc.failure().is_none() {
                    if page.image.is_some() {
                        pages_in_batch += 1;
                    }
                    batch.push(StageMsg::Page(doc, page));
                }
            }
            end @ StageMsg::End(..) => batch.push(end),
        }
        if pages_in_batch >= batch_visual {
            stage.flush(&mut batch)?;
            pages_in_batch = 0;
        }
    }
    if stage.model.take().is_some() {
        stage.shared.telemetry.model_unloaded();
    }
    Ok(())
}

struct ModelStage<L: EmbedLoader, S> {
    loader: L,
    model: Option<L::Model>,
    shared: Arc<Shared<S>>,
    vec_tx: mpsc::Sender<StageMsg<EmbeddedPage>>,
}

impl<L: EmbedLoader, S> ModelStage<L, S> {
    /// The model, loaded now if it is not in memory.
    fn model(&mut self) -> Result<&L::Model, StageError> {
        if self.model.is_none() {
            let telemetry = &self.shared.telemetry;
            telemetry.model_loading();
            let started = Instant::now();
            match self.loader.load() {
                Ok(m) => {
                    let p = m.placement();
                    let secs = started.elapsed().as_secs_f64();
                    if p.fell_back_to_cpu {
                        tracing::warn!(
                            "no GPU could be used: the model runs on the CPU (much slower): {}",
                            p.reason
                        );
                    }
                    telemetry.model_loaded(p, secs);
                    *self
                        .shared
                        .unavailable_wait
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = super::UNAVAILABLE_FIRST_WAIT;
                    self.model = Some(m);
                }
                Err(e) => {
                    tracing::error!("the model could not be loaded: {}", e.reason);
                    telemetry.model_failed(e.reason.clone());
                    return Err(e);
                }
            }
        }
        self.model
            .as_ref()
            .ok_or_else(|| StageError::transient(Stage::Model, "the model is not loaded"))
    }

    /// Embeds the batch's pages (several documents may share it) and their chunks, then passes
    /// everything on in order.
    fn flush(&mut self, batch: &mut Vec<StageMsg<Page>>) -> Result<(), TaskError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut items = std::mem::take(batch);
        let needs_model = items
            .iter()
            .any(|p| matches!(p, StageMsg::Page(d, _) if d.failure().is_none()));
        let mut page_vecs: HashMap<usize, PageRecord> = HashMap::new();
        let mut chunk_vecs: HashMap<usize, Vec<ChunkRecord>> = HashMap::new();
        if needs_model {
            fail_point(&self.shared.settings, FailStage::Embed)?;
            if let Err(e) = self.embed(&mut items, &mut page_vecs, &mut chunk_vecs) {
                for it in &items {
                    if let StageMsg::Page(d, _) = it {
                        d.fail(e.clone());
                    }
                }
            }
        }
        for (i, it) in items.into_iter().enumerate() {
            let msg = match it {
                StageMsg::Page(d, _) => {
                    if d.failure().is_some() {
                        continue;
                    }
                    StageMsg::Page(
                        d,
                        EmbeddedPage {
                            record: page_vecs.remove(&i),
                            chunks: chunk_vecs.remove(&i).unwrap_or_default(),
                        },
                    )
                }
                StageMsg::End(d, ending) => StageMsg::End(d, ending),
            };
            if self.vec_tx.blocking_send(msg).is_err() {
                // The sync stage is gone; it reports why itself.
                break;
            }
        }
        Ok(())
    }

    fn embed(
        &mut self,
        items: &mut [StageMsg<Page>],
        page_vecs: &mut HashMap<usize, PageRecord>,
        chunk_vecs: &mut HashMap<usize, Vec<ChunkRecord>>,
    ) -> Result<(), StageError> {
        let shared = self.shared.clone();
        let telemetry = &shared.telemetry;
        let batch_text = shared.settings.batch_text.max(1);
        let m = self.model()?;
        let mut idx = Vec::new();
        let mut images = Vec::new();
        let mut per_doc: HashMap<u64, u32> = HashMap::new();
        for (i, it) in items.iter_mut().enumerate() {
            if let StageMsg::Page(d, p) = it {
                if d.failure().is_none() {
                    // The image is not needed after this: move it, do not copy it.
                    if let Some(img) = p.image.take() {
                        idx.push(i);
                        images.push(img);
                        *per_doc.entry(d.job.seq).or_default() += 1;
                    }
                }
            }
        }
        if !images.is_empty() {
            telemetry.image_batches.inc();
            let vecs = model_call(telemetry, "pages", images.len(), || m.embed_images(&images))?;
            for (i, v) in idx.into_iter().zip(vecs) {
                if let StageMsg::Page(_, p) = &items[i] {
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
            telemetry.pages_embedded.inc_by(images.len() as u64);
            for (seq, n) in per_doc {
                telemetry.document_embedded(seq, n);
            }
        }
        // The chunks are not needed after this either.
        let mut chunks: Vec<(usize, TextChunk)> = Vec::new();
        for (i, it) in items.iter_mut().enumerate() {
            if let StageMsg::Page(d, p) = it {
                if d.failure().is_none() {
                    chunks.extend(std::mem::take(&mut p.chunks).into_iter().map(|c| (i, c)));
                }
            }
        }
        let mut chunks = chunks.into_iter().peekable();
        while chunks.peek().is_some() {
            let group: Vec<(usize, TextChunk)> = chunks.by_ref().take(batch_text).collect();
            let texts: Vec<&str> = group.iter().map(|(_, c)| c.text.as_str()).collect();
            let vecs = model_call(telemetry, "chunks", texts.len(), || m.embed_texts(&texts))?;
            let n = texts.len() as u64;
            for ((i, c), v) in group.into_iter().zip(vecs) {
                chunk_vecs.entry(i).or_default().push(ChunkRecord {
                    chunk_index: c.chunk_index,
                    page: c.page,
                    text: c.text,
                    word_count: c.word_count,
                    embedding: v,
                });
            }
            telemetry.chunks_embedded.inc_by(n);
        }
        Ok(())
    }
}

/// One call into the model: counted, timed, and checked to give one vector per input (`n`
/// `what`s).
fn model_call(
    telemetry: &crate::telemetry::Telemetry,
    what: &str,
    n: usize,
    call: impl FnOnce() -> Result<Vec<MultiVector>, StageError>,
) -> Result<Vec<MultiVector>, StageError> {
    telemetry.embed_calls.inc();
    let started = Instant::now();
    let vecs = call()?;
    telemetry
        .embed_latency
        .observe(started.elapsed().as_secs_f64());
    if vecs.len() != n {
        return Err(StageError::transient(
            Stage::Embed,
            format!("the model returned {} vectors for {n} {what}", vecs.len()),
        ));
    }
    Ok(vecs)
}
