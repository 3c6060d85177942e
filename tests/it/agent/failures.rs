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
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> Result<(), StageError> {
        if take_one(&self.fail_upserts) {
            return Err(StageError::transient(
                Stage::Sync,
                "injected at upsert_pages: Chroma answered 503 Service Unavailable",
            ));
        }
        self.inner.upsert_pages(docs).await
    }
    async fn upsert_chunks(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), StageError> {
        self.inner.upsert_chunks(docs).await
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

/// Chroma behind a gate: page writes wait until the test opens it. Notes which documents each
/// page write held, and refuses for good (as a 4xx does) any page write holding `refuse`.
struct GatedSink {
    inner: RealSink,
    open: tokio::sync::watch::Receiver<bool>,
    /// Page writes that reached the gate.
    arrived: AtomicU32,
    /// Per page write, in order: the file names it held, and whether it was refused.
    writes: std::sync::Mutex<Vec<(Vec<String>, bool)>>,
    refuse: Option<&'static str>,
}

impl GatedSink {
    fn names(docs: &[(&DocumentMeta, &[PageRecord])]) -> Vec<String> {
        docs.iter()
            .map(|(d, _)| {
                d.source_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn writes(&self) -> Vec<(Vec<String>, bool)> {
        self.writes.lock().unwrap().clone()
    }
}

impl Sink for &'static GatedSink {
    async fn upsert_pages(
        &self,
        docs: &[(&DocumentMeta, &[PageRecord])],
    ) -> Result<(), StageError> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.clone();
        open.wait_for(|o| *o)
            .await
            .expect("the test holds the gate");
        let names = GatedSink::names(docs);
        let refused = self
            .refuse
            .is_some_and(|r| names.iter().any(|n| n.as_str() == r));
        self.writes.lock().unwrap().push((names, refused));
        if refused {
            return Err(StageError {
                stage: Stage::Sync,
                permanent: true,
                reason: "injected at upsert_pages: Chroma answered 422 for bad.pdf's record".into(),
                waits: false,
            });
        }
        self.inner.upsert_pages(docs).await
    }
    async fn upsert_chunks(
        &self,
        docs: &[(&DocumentMeta, &[ChunkRecord])],
    ) -> Result<(), StageError> {
        self.inner.upsert_chunks(docs).await
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

/// An agent writing through a closed [`GatedSink`]; send `true` to open it.
async fn start_gated(
    rig: &Rig,
    refuse: Option<&'static str>,
) -> (Agent, &'static GatedSink, tokio::sync::watch::Sender<bool>) {
    let (open_tx, open) = tokio::sync::watch::channel(false);
    // Leaked: the agent's tasks and the test both hold it for the test's whole life.
    let sink: &'static GatedSink = Box::leak(Box::new(GatedSink {
        inner: RealSink(rig.syncer().await),
        open,
        arrived: AtomicU32::new(0),
        writes: std::sync::Mutex::new(Vec::new()),
        refuse,
    }));
    let extract = RealExtract::new(&rig.cfg, agent_exe()).expect("extractor");
    let loader = RealModelLoader {
        cfg: rig.cfg.model.clone(),
    };
    (rig.start_with(extract, loader, sink).await, sink, open_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_embedded_while_chroma_is_busy_are_written_together() {
    let rig = rig(200);
    let (agent, sink, open) = start_gated(&rig, None).await;
    let names = ["a.pdf", "b.pdf", "c.pdf", "d.pdf", "e.pdf", "f.pdf"];
    for (i, n) in names.iter().enumerate() {
        write_file(&rig.root.join(n), &pdf_pages(n, i as u16, i as u16));
    }
    let t = agent.telemetry.clone();
    // The first write waits at the gate while every other document is embedded behind it.
    until(
        "all six documents embedded, the first write waiting",
        || {
            let t = t.clone();
            async move { t.pages_embedded.total() == 6 && sink.arrived.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    open.send(true).expect("the sink holds the gate");
    until("all six documents indexed", || {
        let t = t.clone();
        async move { t.files_indexed.get() == 6 }
    })
    .await;
    let writes = sink.writes();
    assert_eq!(
        writes.len(),
        2,
        "the first write, then one for everything embedded meanwhile: {writes:?}"
    );
    let mut written: Vec<String> = writes.iter().flat_map(|(w, _)| w.clone()).collect();
    written.sort();
    assert_eq!(written, names, "each document written once: {writes:?}");
    let s = rig.syncer().await;
    for n in names {
        let (pages, chunks) = counts(&s, &rig.doc_id(n)).await;
        assert_eq!(pages, 1, "{n}");
        assert!(chunks > 0, "{n}");
    }
    assert_eq!(t.files_failed.get(), 0);
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_good_fails_only_the_document_at_fault() {
    let rig = rig(200);
    let (agent, sink, open) = start_gated(&rig, Some("bad.pdf")).await;
    let t = agent.telemetry.clone();
    write_file(&rig.root.join("first.pdf"), &pdf_pages("first", 0, 0));
    until("the first write waits at the gate", || async {
        sink.arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    write_file(&rig.root.join("good.pdf"), &pdf_pages("good", 0, 0));
    write_file(&rig.root.join("bad.pdf"), &pdf_pages("bad", 0, 0));
    until(
        "good.pdf and bad.pdf embedded behind the first write",
        || {
            let t = t.clone();
            async move { t.pages_embedded.total() == 3 }
        },
    )
    .await;
    open.send(true).expect("the sink holds the gate");
    until("two documents indexed and one failed", || {
        let t = t.clone();
        async move { t.files_indexed.get() == 2 && t.files_failed.get() == 1 }
    })
    .await;
    let writes = sink.writes();
    let together = writes
        .iter()
        .position(|(w, _)| w.len() == 2)
        .unwrap_or_else(|| panic!("good.pdf and bad.pdf were written together: {writes:?}"));
    assert!(writes[together].1, "the write holding bad.pdf was refused");
    assert!(
        writes[together + 1..].contains(&(vec!["good.pdf".to_string()], false))
            && writes[together + 1..].contains(&(vec!["bad.pdf".to_string()], true)),
        "then each document was tried alone: {writes:?}"
    );
    let s = rig.syncer().await;
    assert_eq!(counts(&s, &rig.doc_id("first.pdf")).await.0, 1);
    assert_eq!(counts(&s, &rig.doc_id("good.pdf")).await.0, 1);
    assert_eq!(counts(&s, &rig.doc_id("bad.pdf")).await, (0, 0));
    let bad = agent
        .store()
        .file(&rig.root.join("bad.pdf"))
        .expect("store")
        .expect("bad.pdf recorded");
    assert!(
        bad.last_error.as_deref().is_some_and(|e| e.contains("422")),
        "{bad:?}"
    );
    agent.shutdown().await.expect("shutdown");
}
