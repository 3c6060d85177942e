//! Failures injected at named points of the stages, as meilisearch's index-scheduler does: the
//! real extractor, model and Chroma, each wrapped so that its first calls at one point fail the
//! way a real outage fails them. This is why the pipeline is generic over its stages.

use std::sync::atomic::{AtomicU32, Ordering};

use docusearch_agent::agent::real::{RealExtract, RealModel, RealModelLoader, RealSink};
use docusearch_agent::agent::runtime::Agent;
use docusearch_agent::agent::stages::{
    ChunkRecord, DocumentMeta, EmbedLoader, PageRecord, Sink, Stage, StageError,
};
use docusearch_agent::telemetry::ModelState;
use docusearch_agent::types::DocId;

use crate::common::{agent_exe, counts, pdf_pages, rig, until, write_file, Rig};

/// Takes one of `n` failures left, if any.
fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

/// Chroma, whose first `fail_upserts` page upserts fail as a server answering 503 does.
struct FlakySink {
    inner: RealSink,
    fail_upserts: AtomicU32,
}

impl Sink for FlakySink {
    async fn upsert_pages(
        &self,
        doc: &DocumentMeta,
        pages: &[PageRecord],
    ) -> Result<(), StageError> {
        if take_one(&self.fail_upserts) {
            return Err(StageError::transient(
                Stage::Sync,
                "injected at upsert_pages: Chroma answered 503 Service Unavailable",
            ));
        }
        self.inner.upsert_pages(doc, pages).await
    }
    async fn upsert_chunks(
        &self,
        doc: &DocumentMeta,
        chunks: &[ChunkRecord],
    ) -> Result<(), StageError> {
        self.inner.upsert_chunks(doc, chunks).await
    }
    async fn finish_document(
        &self,
        doc: &DocumentMeta,
        num_pages: u32,
        num_chunks: u32,
    ) -> Result<(), StageError> {
        self.inner.finish_document(doc, num_pages, num_chunks).await
    }
    async fn delete_document(&self, doc_id: &DocId) -> Result<(), StageError> {
        self.inner.delete_document(doc_id).await
    }
    async fn move_document(&self, old: &DocId, new: &DocumentMeta) -> Result<bool, StageError> {
        self.inner.move_document(old, new).await
    }
}

/// The model, whose first `fail_loads` loads fail as unreadable weights do.
struct FlakyLoader {
    inner: RealModelLoader,
    fail_loads: AtomicU32,
}

impl EmbedLoader for FlakyLoader {
    type Model = RealModel;
    fn load(&self) -> Result<RealModel, StageError> {
        if take_one(&self.fail_loads) {
            return Err(StageError::transient(
                Stage::Model,
                "injected at load: model.safetensors could not be read",
            ));
        }
        self.inner.load()
    }
    fn model_id(&self) -> String {
        self.inner.model_id()
    }
}

async fn start(rig: &Rig, fail_upserts: u32, fail_loads: u32) -> Agent {
    let extract = RealExtract::new(&rig.cfg, agent_exe()).expect("extractor");
    let loader = FlakyLoader {
        inner: RealModelLoader {
            cfg: rig.cfg.model.clone(),
        },
        fail_loads: AtomicU32::new(fail_loads),
    };
    let sink = FlakySink {
        inner: RealSink(rig.syncer().await),
        fail_upserts: AtomicU32::new(fail_upserts),
    };
    rig.start_with(extract, loader, sink).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chroma_write_that_fails_is_retried_and_nothing_is_lost_or_doubled() {
    let rig = rig(200);
    let agent = start(&rig, 2, 0).await;
    let s = rig.syncer().await;
    write_file(&rig.root.join("doc.pdf"), &pdf_pages("flaky sink", 0, 2));
    let id = rig.doc_id("doc.pdf");
    until("doc.pdf indexed after the failed writes", || async {
        counts(&s, &id).await.0 == 3 && agent.telemetry.files_indexed.get() == 1
    })
    .await;
    let t = &agent.telemetry;
    assert_eq!(t.chroma_errors.get(), 2, "each failed write is counted");
    assert_eq!(t.failures.get(Stage::Sync), 2);
    assert_eq!(t.files_failed.get(), 0, "retried, not given up");
    assert_eq!(t.pages_indexed.get(), 3);
    assert_eq!(
        t.pages_embedded.total(),
        3,
        "the pages were embedded once: the write was tried again, not the document"
    );
    assert_eq!(t.chroma_waiting_reason(), None, "nothing waits any more");
    let (pages, chunks) = counts(&s, &id).await;
    assert_eq!(pages, 3);
    assert!(chunks > 0);
    assert_eq!(
        s.visual_collection().count().await.expect("count"),
        3,
        "no page written twice"
    );
    agent.shutdown().await.expect("shutdown");
}

/// SIGSTOP on a process until dropped (SIGCONT): a server that accepts connections and answers
/// nothing, as a hung or swapped-out Chroma does.
struct Frozen(i32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        Frozen(pid as i32)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chroma_that_stops_answering_mid_document_costs_no_attempt_and_no_second_embedding() {
    let mut rig = rig(200);
    rig.cfg.chroma.timeout_s = 2;
    // One attempt: an outage that used one up would fail the document for good.
    rig.cfg.pipeline.max_attempts = 1;
    let agent = start(&rig, 0, 0).await;
    let s = rig.syncer().await;
    let frozen = Frozen::new(rig.chroma.server.pid().expect("chroma runs"));
    write_file(&rig.root.join("doc.pdf"), &pdf_pages("outage", 0, 3));
    let t = agent.telemetry.clone();
    until("the writes wait for Chroma", || {
        let t = t.clone();
        async move { t.chroma_waiting_reason().is_some() && t.chroma_errors.get() >= 1 }
    })
    .await;
    assert_eq!(t.files_failed.get(), 0);
    assert_eq!(t.pages_embedded.total(), 4, "embedded before the outage");
    drop(frozen);
    let id = rig.doc_id("doc.pdf");
    until("doc.pdf written once Chroma answers again", || async {
        counts(&s, &id).await.0 == 4 && agent.telemetry.files_indexed.get() == 1
    })
    .await;
    assert_eq!(
        t.pages_embedded.total(),
        4,
        "nothing embedded twice for the outage"
    );
    assert_eq!(
        t.files_failed.get(),
        0,
        "the outage was not the document's failure"
    );
    assert_eq!(t.chroma_waiting_reason(), None);
    assert!(agent
        .store()
        .file(&rig.root.join("doc.pdf"))
        .expect("store")
        .is_some_and(|r| r.last_error.is_none() && r.num_pages == 4));
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_once_is_reported_then_recovers() {
    let mut rig = rig(200);
    rig.cfg.pipeline.retry_base_s = 1;
    let agent = start(&rig, 0, 1).await;
    write_file(&rig.root.join("doc.pdf"), &pdf_pages("flaky model", 0, 0));
    let t = agent.telemetry.clone();
    // The retry waits out its back-off (a second at least): the failure is visible meanwhile.
    until("the failed load is reported", || {
        let t = t.clone();
        async move { t.model().state == ModelState::Failed }
    })
    .await;
    let failed = t.model();
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("safetensors"),
        "{failed:?}"
    );
    assert_eq!(t.failures.get(Stage::Model), 1);
    let s = rig.syncer().await;
    let id = rig.doc_id("doc.pdf");
    until("doc.pdf indexed once the model loads", || async {
        counts(&s, &id).await.0 == 1
    })
    .await;
    let loaded = t.model();
    assert_eq!(loaded.state, ModelState::Loaded, "{loaded:?}");
    assert_eq!(loaded.error, None, "a load that works clears the error");
    assert_eq!(loaded.loads, 1);
    agent.shutdown().await.expect("shutdown");
}
