//! The status API over real HTTP, with a real Chroma server behind `/health`.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use docusearch_agent::api::{
    AgentStatus, ApiClient, ApiError, ApiServer, ApiState, ChromaProbe, ChromaStatus, DocState,
    FailedDocument, Health, HealthState, ModelState, ModelStatus, QueueCounts, RecentDocument,
    StoreStatus,
};
use docusearch_agent::config::{ApiConfig, Config};
use docusearch_agent::telemetry::{ModelPlacement, Stage};
use docusearch_agent::types::DocId;

use crate::common;

fn loopback_config() -> ApiConfig {
    ApiConfig {
        enabled: true,
        bind: "127.0.0.1".into(),
        port: 0,
        allow_non_loopback: false,
        ..ApiConfig::default()
    }
}

fn initial_status(chroma_url: &str) -> AgentStatus {
    AgentStatus {
        agent_id: "test-agent".into(),
        watched_folders: vec![PathBuf::from("/watched")],
        model: ModelStatus {
            name: "tiny-colpali".into(),
            ..Default::default()
        },
        chroma: ChromaStatus {
            url: chroma_url.into(),
            managed: true,
            visual_collection: "visual_collection".into(),
            text_collection: "text_collection".into(),
            ..Default::default()
        },
        store: StoreStatus {
            path: PathBuf::from("/state/state.sled"),
            error: None,
        },
        ..Default::default()
    }
}

/// A running API: its address, and the sender that stops it.
struct RunningApi {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ApiError>>,
}

impl RunningApi {
    async fn start(cfg: &ApiConfig, state: ApiState) -> RunningApi {
        let server = ApiServer::bind(cfg).await.expect("the status API binds");
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(state, async {
            let _ = rx.await;
        }));
        RunningApi {
            addr,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = (&mut self.task)
            .await
            .expect("the server task does not panic");
        assert!(res.is_ok(), "the server stops cleanly: {res:?}");
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .expect("an HTTP client")
}

async fn get_health(api: &RunningApi) -> (u16, Health, serde_json::Value) {
    let resp = http()
        .get(api.url("/health"))
        .send()
        .await
        .expect("GET /health");
    let code = resp.status().as_u16();
    let raw: serde_json::Value = resp.json().await.expect("/health answers JSON");
    let health: Health = serde_json::from_value(raw.clone()).expect("/health's JSON shape");
    (code, health, raw)
}

async fn get_metrics(api: &RunningApi) -> BTreeMap<String, f64> {
    let resp = http()
        .get(api.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "OpenMetrics text content type, got {ctype:?}"
    );
    let text = resp.text().await.expect("/metrics body");
    parse_exposition(&text)
}

/// Parses the OpenMetrics text format strictly enough to catch what a scraper would refuse:
/// every sample belongs to a family declared by `# TYPE` before it (counters as `_total`, info
/// as `_info`), families are contiguous, names are valid, values are numbers, histograms are
/// cumulative and end at `+Inf` = `_count`, and the text ends with `# EOF`.
/// Returns `name{labels}` → value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut samples = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "the exposition ends with # EOF");
    for line in text.lines().filter(|l| *l != "# EOF") {
        assert!(
            !line.is_empty(),
            "no blank lines expected in our exposition"
        );
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default().to_string();
            let value = parts.next().unwrap_or_default();
            assert!(valid_name(&name), "bad metric name in {line:?}");
            assert!(
                name.starts_with("docusearch_"),
                "metric {name} lacks the docusearch_ prefix"
            );
            match kind {
                "HELP" => assert!(!value.is_empty(), "empty HELP for {name}"),
                "TYPE" => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "info",
                            "summary",
                            "unknown"
                        ]
                        .contains(&value),
                        "bad TYPE {value:?} for {name}"
                    );
                    assert!(
                        types.insert(name.clone(), value.into()).is_none(),
                        "{name} declared twice"
                    );
                    if let Some(prev) = current.replace(name.clone()) {
                        finished.insert(prev);
                    }
                }
                other => panic!("unknown comment kind {other:?} in {line:?}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("value of {line:?} is not a number")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                (n, Some(l))
            }
            None => (series, None),
        };
        assert!(valid_name(name), "bad sample name in {line:?}");
        let family = current
            .clone()
            .unwrap_or_else(|| panic!("sample {line:?} before any TYPE"));
        let kind = types[&family].as_str();
        let belongs = match kind {
            "histogram" => [
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ]
            .contains(&name.to_string()),
            "counter" => name == format!("{family}_total"),
            "info" => name == format!("{family}_info"),
            _ => name == family,
        };
        assert!(
            belongs,
            "sample {name} is not part of the family {family} declared above it"
        );
        assert!(
            !finished.contains(&family),
            "family {family} is not contiguous"
        );
        if let Some(labels) = labels {
            for pair in labels.split(',') {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(valid_name(k), "bad label name in {line:?}");
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "unquoted label value in {line:?}"
                );
            }
            if name.ends_with("_bucket") {
                let le = labels
                    .strip_prefix("le=\"")
                    .and_then(|l| l.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("bucket without le in {line:?}"));
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                buckets.entry(family.clone()).or_default().push((le, value));
            }
        }
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{series} appears twice"
        );
    }
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let b = &buckets[family];
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{family}: buckets not cumulative: {b:?}"
        );
        let last = b.last().expect("at least one bucket");
        assert_eq!(last.0, f64::INFINITY, "{family}: last bucket is +Inf");
        assert_eq!(
            last.1,
            samples[&format!("{family}_count")],
            "{family}: +Inf bucket = count"
        );
    }
    samples
}

/// Polls a future once (to see that it is not ready yet) without a runtime.
fn is_ready<F: Future>(fut: std::pin::Pin<&mut F>) -> bool {
    matches!(
        fut.poll(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(_)
    )
}

/// What the embed stage records when `device = auto` found no GPU.
fn cpu_fallback() -> ModelPlacement {
    ModelPlacement {
        device: "cpu".into(),
        dtype: "f32".into(),
        fell_back_to_cpu: true,
        reason:
            "device = auto and no GPU: this build has no GPU back-end; dtype = auto: f32 on the CPU"
                .into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_over_real_http() {
    let chroma = tokio::task::spawn_blocking(common::start_chroma)
        .await
        .expect("start chroma");
    let state = ApiState::new(
        initial_status(&chroma.url()),
        ChromaProbe::new(None, Duration::from_secs(5)).expect("probe"),
    );
    // What the pipeline would record (the running agent's own numbers are checked in
    // tests/it/agent/telemetry.rs).
    let m = state.telemetry();
    m.model_loaded(cpu_fallback(), 0.5);
    m.files_indexed.inc();
    m.pages_indexed.inc_by(12);
    m.chunks_indexed.inc_by(3);
    m.pages_embedded.inc_by(12);
    m.embed_latency.observe(0.3);
    m.embed_latency.observe(4.0);
    m.sync_latency.observe(0.02);
    m.failures.inc(Stage::Extract);
    m.chroma_errors.inc();
    state.update(|s| {
        s.queue = QueueCounts {
            queued: 3,
            in_progress: 1,
            failed: 1,
        };
        s.indexed.files = 1;
        s.indexed.pages = 12;
    });
    state.record_document(RecentDocument {
        path: PathBuf::from("/watched/a.pdf"),
        doc_id: Some(DocId::from_string("0123456789abcdef0123456789abcdef")),
        state: DocState::Queued,
        pages: Some(12),
        chunks: None,
        at: docusearch_agent::api::now_iso(),
        error: None,
    });
    state.record_document(RecentDocument {
        path: PathBuf::from("/watched/a.pdf"),
        doc_id: Some(DocId::from_string("0123456789abcdef0123456789abcdef")),
        state: DocState::Indexed,
        pages: Some(12),
        chunks: Some(3),
        at: docusearch_agent::api::now_iso(),
        error: None,
    });
    state.record_failure(FailedDocument {
        path: PathBuf::from("/watched/broken.pdf"),
        reason: "PDFium cannot open it: file is damaged".into(),
        attempts: 5,
        at: docusearch_agent::api::now_iso(),
    });

    let api = RunningApi::start(&loopback_config(), state.clone()).await;
    assert!(api.addr.ip().is_loopback());

    // /health: healthy, exactly the documented body.
    let (code, health, raw) = get_health(&api).await;
    assert_eq!(code, 200, "{raw}");
    assert_eq!(raw, serde_json::json!({"status": "healthy"}));
    assert!(health.is_healthy());

    // /status: what the pipeline reported, plus a live Chroma check.
    let resp = http()
        .get(api.url("/status"))
        .send()
        .await
        .expect("GET /status");
    assert_eq!(resp.status().as_u16(), 200);
    let raw: serde_json::Value = resp.json().await.expect("JSON");
    for key in [
        "queue", "indexed", "recent", "failures", "model", "chroma", "store", "uptime_s",
    ] {
        assert!(raw.get(key).is_some(), "/status has `{key}`: {raw}");
    }
    let status: AgentStatus = serde_json::from_value(raw.clone()).expect("/status's JSON shape");
    assert_eq!(status.agent_id, "test-agent");
    assert_eq!(status.pid, std::process::id());
    assert_eq!(
        status.queue,
        QueueCounts {
            queued: 3,
            in_progress: 1,
            failed: 1
        }
    );
    assert_eq!(
        status.recent.len(),
        1,
        "a document's newer state replaces its older one"
    );
    assert_eq!(status.recent[0].state, DocState::Indexed);
    assert_eq!(raw["recent"][0]["state"], "indexed");
    assert_eq!(
        status.failures[0].path,
        PathBuf::from("/watched/broken.pdf")
    );
    assert!(status.failures[0].reason.contains("damaged"));
    assert_eq!(raw["model"]["state"], "loaded");
    assert_eq!(status.model.device.as_deref(), Some("cpu"));
    assert!(status.model.fell_back_to_cpu);
    assert_eq!(
        status.model.placement_reason.as_deref(),
        Some(cpu_fallback().reason.as_str()),
        "/status says why the CPU is used"
    );
    assert_eq!(status.chroma.url, chroma.url());
    assert_eq!(status.chroma.reachable, Some(true));
    assert!(status.chroma.last_checked.is_some());

    // /metrics: valid exposition with the pipeline's numbers.
    let metrics = get_metrics(&api).await;
    let expect = [
        ("docusearch_files_indexed_total", 1.0),
        ("docusearch_pages_indexed_total", 12.0),
        ("docusearch_chunks_indexed_total", 3.0),
        ("docusearch_pages_embedded_total", 12.0),
        ("docusearch_chroma_errors_total", 1.0),
        ("docusearch_failures_total{stage=\"extract\"}", 1.0),
        ("docusearch_failures_total{stage=\"sync\"}", 0.0),
        ("docusearch_queue_depth", 3.0),
        ("docusearch_failed_documents", 1.0),
        ("docusearch_model_loaded", 1.0),
        ("docusearch_model_cpu_fallback", 1.0),
        ("docusearch_chroma_up", 1.0),
        ("docusearch_embed_batch_seconds_count", 2.0),
        ("docusearch_embed_batch_seconds_bucket{le=\"0.5\"}", 1.0),
        ("docusearch_embed_batch_seconds_bucket{le=\"5.0\"}", 2.0),
        ("docusearch_sync_seconds_count", 1.0),
        ("docusearch_rescans_requested_total", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(metrics.get(series), Some(&value), "{series}");
    }
    assert!((metrics["docusearch_embed_batch_seconds_sum"] - 4.3).abs() < 1e-6);
    let rate = metrics["docusearch_pages_embedded_per_second"];
    assert!(rate > 0.0 && rate <= 12.0, "pages per second {rate}");

    // POST /rescan reaches the agent; requests made before it looks coalesce into one.
    {
        let mut early = std::pin::pin!(state.rescan_requested());
        assert!(!is_ready(early.as_mut()), "no rescan asked for yet");
    }
    for _ in 0..2 {
        let resp = http()
            .post(api.url("/rescan"))
            .send()
            .await
            .expect("POST /rescan");
        assert_eq!(resp.status().as_u16(), 202);
    }
    assert!(state.snapshot().rescan_pending);
    let mut first = std::pin::pin!(state.rescan_requested());
    assert!(
        is_ready(first.as_mut()),
        "the agent is told about the rescan"
    );
    assert!(!state.snapshot().rescan_pending, "taken by the agent");
    let mut second = std::pin::pin!(state.rescan_requested());
    assert!(
        !is_ready(second.as_mut()),
        "two requests before the agent looked make one rescan"
    );
    assert_eq!(
        get_metrics(&api).await["docusearch_rescans_requested_total"],
        2.0
    );

    // POST /index and POST /repair: refused until the agent takes the requests; then its
    // answer, or its reason.
    use docusearch_agent::api::{AgentRequest, ApiError, QueuedPaths};
    let client = ApiClient::at(api.addr, Duration::from_secs(30)).expect("client");
    let paths = vec![std::path::PathBuf::from("/watched/a.pdf")];
    match client.index(&paths).await {
        Err(ApiError::Response {
            status: 503, body, ..
        }) => assert!(body.contains("not taking requests"), "{body}"),
        other => panic!("expected 503 before the agent listens, got {other:?}"),
    }
    let mut requests = state.take_requests().expect("the agent's end");
    assert!(state.take_requests().is_none(), "one taker only");
    let agent = tokio::spawn(async move {
        let Some(AgentRequest::Index { paths, reply }) = requests.recv().await else {
            panic!("an index request")
        };
        assert_eq!(paths, vec![std::path::PathBuf::from("/watched/a.pdf")]);
        let _ = reply.send(Ok(QueuedPaths {
            queued: 1,
            unchanged: 0,
            request: 1,
        }));
        let Some(AgentRequest::Index { reply, .. }) = requests.recv().await else {
            panic!("a second index request")
        };
        let _ = reply.send(Err(
            "/elsewhere is not in a folder the running agent watches".into(),
        ));
        let Some(AgentRequest::Reconcile { dry_run, reply }) = requests.recv().await else {
            panic!("a repair request")
        };
        assert!(dry_run);
        let _ = reply.send(Ok(serde_json::json!({"orphans": []})));
    });
    let q = client
        .index(&paths)
        .await
        .expect("index")
        .expect("an agent answers");
    assert_eq!((q.queued, q.unchanged), (1, 0));
    match client
        .index(&[std::path::PathBuf::from("/elsewhere")])
        .await
    {
        Err(ApiError::Response {
            status: 422, body, ..
        }) => assert!(
            body.contains("not in a folder the running agent watches"),
            "{body}"
        ),
        other => panic!("expected 422 with the reason, got {other:?}"),
    }
    let r = client
        .repair(true)
        .await
        .expect("repair")
        .expect("an agent answers");
    assert_eq!(r, serde_json::json!({"orphans": []}));
    agent.await.expect("the agent's side");

    // Wrong method and unknown path.
    let resp = http()
        .get(api.url("/rescan"))
        .send()
        .await
        .expect("GET /rescan");
    assert_eq!(resp.status().as_u16(), 405);
    let resp = http()
        .get(api.url("/nope"))
        .send()
        .await
        .expect("GET /nope");
    assert_eq!(resp.status().as_u16(), 404);

    // The client other commands use.
    let client = ApiClient::at(api.addr, Duration::from_secs(30)).expect("client");
    let via_client = client
        .status()
        .await
        .expect("status via client")
        .expect("an agent answers");
    assert_eq!(via_client.queue, status.queue);
    assert!(client
        .health()
        .await
        .expect("health")
        .expect("answers")
        .is_healthy());
    assert!(client.rescan().await.expect("rescan"));

    // A model that failed to load, or a store error, degrade the agent; fixing them heals it.
    state
        .telemetry()
        .model_failed("config.json not found in /models/tiny".into());
    let (code, health, _) = get_health(&api).await;
    assert_eq!(code, 503);
    assert_eq!(health.status, HealthState::Degraded);
    assert_eq!(health.reasons.len(), 1, "{:?}", health.reasons);
    assert!(
        health.reasons[0].contains("model tiny-colpali failed to load: config.json not found"),
        "{:?}",
        health.reasons
    );
    state.telemetry().model_loaded(cpu_fallback(), 0.5);
    state.update(|s| s.store.error = Some("I/O error: disk full".into()));
    let (code, health, _) = get_health(&api).await;
    assert_eq!(code, 503);
    assert!(
        health.reasons[0].contains("state store /state/state.sled error: I/O error: disk full"),
        "{:?}",
        health.reasons
    );
    // A watched folder missing at start (an unmounted disk) degrades it too, by name.
    state.update(|s| {
        s.store.error = None;
        s.missing_folders = vec![PathBuf::from("/Volumes/Archive/docs")];
    });
    let (code, health, _) = get_health(&api).await;
    assert_eq!(code, 503);
    assert_eq!(health.reasons.len(), 1, "{:?}", health.reasons);
    assert!(
        health.reasons[0].starts_with("watched folder /Volumes/Archive/docs is missing"),
        "{:?}",
        health.reasons
    );
    let mut raw = client
        .status()
        .await
        .expect("status via client")
        .expect("an agent answers");
    assert_eq!(
        raw.missing_folders,
        [PathBuf::from("/Volumes/Archive/docs")]
    );
    // A snapshot from an agent without the field still reads.
    raw.missing_folders.clear();
    let mut json = serde_json::to_value(&raw).expect("serialises");
    json.as_object_mut()
        .expect("an object")
        .remove("missing_folders");
    assert_eq!(
        serde_json::from_value::<AgentStatus>(json).expect("reads"),
        raw
    );
    state.update(|s| s.missing_folders.clear());
    assert_eq!(get_health(&api).await.0, 200);

    let addr = api.addr;
    api.shutdown().await;
    let gone = ApiClient::at(addr, Duration::from_secs(5)).expect("client");
    assert!(
        gone.status().await.expect("refused is an answer").is_none(),
        "nothing listens after shutdown"
    );
    assert!(!gone.rescan().await.expect("refused is an answer"));
}

/// Continues a SIGSTOPped server when dropped, so a failing assertion never leaves it frozen.
struct Stopped(i32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = pid as i32;
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP the Chroma server"
        );
        // The signal takes effect asynchronously: a thread already running may still answer
        // one more request. Wait until every thread shows as stopped.
        let all_stopped = || -> Option<bool> {
            let mut any = false;
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                if state != 'T' && state != 't' {
                    return Some(false);
                }
                any = true;
            }
            Some(any)
        };
        if !cfg!(target_os = "linux") {
            // No /proc to look at: give the signal a moment.
            std::thread::sleep(Duration::from_millis(500));
            return Stopped(pid);
        }
        let mut stopped = false;
        for _ in 0..200 {
            if all_stopped() == Some(true) {
                stopped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(stopped, "every thread of the Chroma server {pid} stopped");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_degraded_when_chroma_stops_and_healthy_when_it_is_back() {
    let mut chroma = tokio::task::spawn_blocking(common::start_chroma)
        .await
        .expect("start chroma");
    let url = chroma.url();
    let state = ApiState::new(
        initial_status(&url),
        // Short, so a frozen server is noticed quickly.
        ChromaProbe::new(None, Duration::from_secs(1)).expect("probe"),
    );
    let api = RunningApi::start(&loopback_config(), state.clone()).await;
    assert_eq!(
        get_health(&api).await.0,
        200,
        "healthy while Chroma answers"
    );

    // A server that accepts connections but does not answer.
    let pid = chroma.server.pid().expect("chroma runs");
    let frozen = Stopped::new(pid);
    let (code, health, raw) = get_health(&api).await;
    assert_eq!(code, 503, "{raw}");
    assert_eq!(raw["status"], "degraded");
    assert_eq!(health.reasons.len(), 1, "{:?}", health.reasons);
    assert!(
        health.reasons[0].starts_with(&format!("chroma unreachable at {url}")),
        "{:?}",
        health.reasons
    );
    let status = ApiClient::at(api.addr, Duration::from_secs(30))
        .expect("client")
        .status()
        .await
        .expect("status")
        .expect("answers");
    assert_eq!(status.chroma.reachable, Some(false));
    assert!(status.chroma.error.is_some());
    assert_eq!(get_metrics(&api).await["docusearch_chroma_up"], 0.0);

    // Back.
    drop(frozen);
    let mut healthy = false;
    for _ in 0..60 {
        if get_health(&api).await.0 == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(healthy, "healthy again once Chroma answers");
    assert_eq!(get_metrics(&api).await["docusearch_chroma_up"], 1.0);

    // Gone for good: connection refused.
    tokio::task::block_in_place(|| chroma.server.stop());
    let (code, health, _) = get_health(&api).await;
    assert_eq!(code, 503);
    assert!(
        health.reasons[0].contains("chroma unreachable"),
        "{:?}",
        health.reasons
    );
    api.shutdown().await;
}

#[tokio::test]
async fn refuses_a_non_loopback_address_unless_allowed() {
    for bind in ["0.0.0.0", "::", "192.168.1.10"] {
        let cfg = ApiConfig {
            bind: bind.into(),
            ..loopback_config()
        };
        match ApiServer::bind(&cfg).await {
            Err(ApiError::NonLoopback(ip)) => {
                assert_eq!(ip.to_string(), bind);
                let msg = ApiError::NonLoopback(ip).to_string();
                assert!(msg.contains("api.allow_non_loopback = true"), "{msg}");
            }
            Err(other) => panic!("{bind}: wrong refusal: {other}"),
            Ok(s) => panic!("{bind}: bound {} without permission", s.local_addr()),
        }
        // `serve` refuses too, before ever listening.
        let state = ApiState::new(
            initial_status(""),
            ChromaProbe::new(None, Duration::from_secs(1)).unwrap(),
        );
        let res = docusearch_agent::api::serve(&cfg, state, std::future::pending()).await;
        assert!(
            matches!(res, Err(ApiError::NonLoopback(_))),
            "{bind}: {res:?}"
        );

        // And the configuration is refused when loaded.
        let mut config = Config::default();
        config.api.bind = bind.into();
        let err = config
            .validate()
            .expect_err("config validation refuses it too");
        assert!(err.to_string().contains("api.bind"), "{err}");
    }

    let cfg = ApiConfig {
        bind: "localhost".into(),
        ..loopback_config()
    };
    assert!(matches!(
        ApiServer::bind(&cfg).await,
        Err(ApiError::BadBind(_))
    ));

    // Explicitly allowed: listens on every interface, reachable on loopback.
    let cfg = ApiConfig {
        bind: "0.0.0.0".into(),
        allow_non_loopback: true,
        ..loopback_config()
    };
    // No Chroma yet (a managed one not started): an answer all the same, degraded.
    let state = ApiState::new(
        initial_status(""),
        ChromaProbe::new(None, Duration::from_secs(1)).unwrap(),
    );
    let api = RunningApi::start(&cfg, state).await;
    assert!(api.addr.ip().is_unspecified());
    let (code, health, _) = get_health(&api).await;
    assert_eq!(code, 503);
    assert!(
        health.reasons[0].contains("has not started yet"),
        "{:?}",
        health.reasons
    );
    // The client reaches a wildcard bind on loopback.
    let client = ApiClient::new(
        &ApiConfig {
            port: api.addr.port(),
            ..cfg.clone()
        },
        Duration::from_secs(30),
    )
    .expect("client");
    assert_eq!(
        client.base_url(),
        format!("http://127.0.0.1:{}", api.addr.port())
    );
    assert!(client.status().await.expect("status").is_some());
    api.shutdown().await;
}

#[test]
fn the_initial_status_follows_the_configuration() {
    let mut config = Config::default();
    let s = docusearch_agent::api::initial_status(&config);
    assert!(s.chroma.managed, "no URL: the managed server");
    assert_eq!(
        s.chroma.url, "",
        "known once the managed server has started"
    );
    assert_eq!(s.store.path, config.store_dir());
    assert_eq!(s.model.name, config.model.name);
    assert_eq!(s.model.state, ModelState::NotLoaded);

    config.chroma.url = Some("http://chroma.local:8000/".into());
    config.agent_id = "laptop".into();
    let s = docusearch_agent::api::initial_status(&config);
    assert!(!s.chroma.managed);
    assert_eq!(s.chroma.url, "http://chroma.local:8000");
    assert_eq!(s.agent_id, "laptop");
}

/// One HTTP/1.1 request written by hand (so its `Host` is what the test says), and the answer's
/// status and body.
async fn raw_request(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn quiet_state() -> ApiState {
    ApiState::new(
        initial_status(""),
        ChromaProbe::new(None, Duration::from_secs(1)).expect("probe"),
    )
}

/// A web page can reach 127.0.0.1: under its own name rebound to 127.0.0.1 (DNS rebinding) it
/// could read `/status`, and any page can send a form POST. Neither is answered; the CLI is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_web_pages_are_refused_and_the_cli_is_answered() {
    let state = quiet_state();
    let api = RunningApi::start(&loopback_config(), state.clone()).await;
    let port = api.addr.port();

    // Another name for this machine, or another port: refused before any handler runs.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1:{}", port.wrapping_add(1)),
        format!("localhost.evil.example:{port}"),
        format!("10.0.0.7:{port}"),
    ] {
        for path in ["/status", "/health", "/metrics", "/nope"] {
            let (code, body) = raw_request(
                api.addr,
                &format!("GET {path} HTTP/1.1\r\nHost: {host}"),
                "",
            )
            .await;
            assert!(code == 421, "{host} {path}: {code} {body}");
            let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
            assert!(
                json["error"].as_str().is_some_and(|e| e.contains("Host")),
                "{body}"
            );
            assert!(!body.contains("agent_id"), "nothing of the status: {body}");
        }
    }
    // Its own addresses.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (code, body) = raw_request(
            api.addr,
            &format!("GET /status HTTP/1.1\r\nHost: {host}"),
            "",
        )
        .await;
        assert_eq!(code, 200, "{host}: {body}");
    }

    // A POST from another origin, or that a browser marks as cross-site, changes nothing.
    let host = format!("Host: 127.0.0.1:{port}");
    for extra in [
        "Origin: http://evil.example",
        "Origin: null",
        &format!("Origin: http://evil.example:{port}"),
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Site: same-site",
    ] {
        for path in ["/rescan", "/index", "/repair"] {
            let (code, body) = raw_request(
                api.addr,
                &format!(
                    "POST {path} HTTP/1.1\r\n{host}\r\n{extra}\r\nContent-Type: application/json"
                ),
                "{\"paths\": [\"/watched/a.pdf\"]}",
            )
            .await;
            assert_eq!(code, 403, "{extra} {path}: {body}");
            assert!(body.contains("\"error\""), "{body}");
        }
    }
    // A form, or plain text: what a page sends without asking the server first.
    for ctype in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
    ] {
        for path in ["/rescan", "/index", "/repair"] {
            let (code, body) = raw_request(
                api.addr,
                &format!("POST {path} HTTP/1.1\r\n{host}\r\nContent-Type: {ctype}"),
                "paths=/watched/a.pdf",
            )
            .await;
            assert_eq!(code, 415, "{ctype} {path}: {body}");
            assert!(body.contains("application/json"), "{body}");
        }
    }
    // A JSON endpoint needs its content type, and says so in JSON.
    let (code, body) = raw_request(
        api.addr,
        &format!("POST /index HTTP/1.1\r\n{host}"),
        "{\"paths\": []}",
    )
    .await;
    assert_eq!(code, 415, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|j| j["error"].is_string()),
        "{body}"
    );
    assert_eq!(
        state.telemetry().counters().rescans_requested,
        0,
        "no refused request reached the agent"
    );
    assert!(!state.snapshot().rescan_pending);

    // The API's own origin, and the CLI (no Origin at all), are answered.
    let (code, body) = raw_request(
        api.addr,
        &format!("POST /rescan HTTP/1.1\r\n{host}\r\nOrigin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin"),
        "",
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let client = ApiClient::at(api.addr, Duration::from_secs(30)).expect("client");
    assert!(client.rescan().await.expect("rescan"));
    assert!(client.status().await.expect("status").is_some());
    assert!(client.health().await.expect("health").is_some());
    match client.index(&[PathBuf::from("/watched/a.pdf")]).await {
        // Through the checks; nothing takes requests in this test.
        Err(ApiError::Response { status: 503, .. }) => {}
        other => panic!("the CLI's index request reaches the agent: {other:?}"),
    }
    assert_eq!(state.telemetry().counters().rescans_requested, 2);
    api.shutdown().await;
}

/// With `api.allow_non_loopback`, the machine's own addresses are answered too, never a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_api_answers_its_addresses_not_names() {
    let cfg = ApiConfig {
        bind: "0.0.0.0".into(),
        allow_non_loopback: true,
        ..loopback_config()
    };
    let api = RunningApi::start(&cfg, quiet_state()).await;
    let port = api.addr.port();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    for (host, answered) in [
        (format!("192.0.2.10:{port}"), true),
        (format!("127.0.0.1:{port}"), true),
        (format!("evil.example:{port}"), false),
        (format!("192.0.2.10:{}", port.wrapping_add(1)), false),
    ] {
        let (code, body) =
            raw_request(to, &format!("GET /status HTTP/1.1\r\nHost: {host}"), "").await;
        assert_eq!(code == 200, answered, "{host}: {code} {body}");
    }
    api.shutdown().await;
}

/// `POST /index` from whoever reaches the API: a path outside the watched folders is refused
/// without a word on whether it exists or where a link points; a relative path is refused.
/// Through the real server, the real change tracker and store, as the running agent answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_refusals_say_nothing_about_what_lies_outside_the_watched_folders() {
    use docusearch_agent::agent::changes::ChangeTracker;
    use docusearch_agent::agent::runtime::queue_paths_in_agent;
    use docusearch_agent::api::AgentRequest;
    use docusearch_agent::state::Store;
    use docusearch_agent::watch::Filter;

    let (_w, root) = common::canonical_tempdir();
    let (_o, outside) = common::canonical_tempdir();
    let state_dir = tempfile::tempdir().expect("state dir");
    common::write_file(&root.join("a.pdf"), b"%PDF-1.4 inside");
    common::write_file(&outside.join("secret.pdf"), b"%PDF-1.4 outside");
    std::os::unix::fs::symlink(outside.join("secret.pdf"), root.join("to-file.pdf")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("to-dir")).unwrap();
    std::os::unix::fs::symlink(outside.join("gone.pdf"), root.join("dangling.pdf")).unwrap();
    std::os::unix::fs::symlink(root.join("a.pdf"), root.join("alias.pdf")).unwrap();

    let store = Store::open(state_dir.path()).expect("store");
    let tracker = ChangeTracker {
        store: store.clone(),
        filter: Filter::new(std::slice::from_ref(&root), &[], &[]).expect("filter"),
        settle: Duration::ZERO,
        check: Duration::ZERO,
        model: "tiny".into(),
        telemetry: std::sync::Arc::new(docusearch_agent::telemetry::Telemetry::new("tiny")),
    };
    let state = quiet_state();
    let mut requests = state.take_requests().expect("the agent's end");
    let agent = tokio::spawn(async move {
        while let Some(r) = requests.recv().await {
            if let AgentRequest::Index { paths, reply } = r {
                let t = tracker.clone();
                let answer = tokio::task::spawn_blocking(move || queue_paths_in_agent(&t, &paths))
                    .await
                    .expect("no panic");
                let _ = reply.send(answer);
            }
        }
    });
    let api = RunningApi::start(&loopback_config(), state).await;
    let client = ApiClient::at(api.addr, Duration::from_secs(30)).expect("client");
    let refusal = |p: PathBuf| {
        let client = client.clone();
        async move {
            match client.index(std::slice::from_ref(&p)).await {
                Err(ApiError::Response {
                    status: 422, body, ..
                }) => {
                    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                    json["error"].as_str().expect("an error").to_string()
                }
                other => panic!("{} is refused: {other:?}", p.display()),
            }
        }
    };
    // Said with the path as sent, nothing else about it.
    let generic = |msg: &str, p: &std::path::Path| msg.replace(&p.display().to_string(), "PATH");

    // Outside: the same words whether or not it exists.
    let there = refusal(outside.join("secret.pdf")).await;
    let absent = refusal(outside.join("absent.pdf")).await;
    assert_eq!(
        generic(&there, &outside.join("secret.pdf")),
        generic(&absent, &outside.join("absent.pdf")),
        "existence is not told"
    );
    assert!(
        there.contains("not in a folder the running agent watches"),
        "{there}"
    );
    assert!(!there.contains("No such file"), "{there}");
    // `..` is not resolved: refused as written.
    let up = root
        .join("..")
        .join(outside.file_name().unwrap())
        .join("secret.pdf");
    let up_msg = refusal(up.clone()).await;
    assert!(up_msg.contains(".."), "{up_msg}");
    assert!(!up_msg.contains("No such file"), "{up_msg}");

    // Inside, leading outside through a link: refused, without where it leads, and the same
    // whether or not what it leads to exists.
    let links = [
        root.join("to-file.pdf"),
        root.join("to-dir/secret.pdf"),
        root.join("to-dir/absent.pdf"),
        root.join("to-dir"),
        root.join("dangling.pdf"),
        root.join("absent.pdf"),
    ];
    let mut said = Vec::new();
    for p in &links {
        let msg = refusal(p.clone()).await;
        assert!(
            !msg.contains(&outside.display().to_string()),
            "{}: where the link points is not told: {msg}",
            p.display()
        );
        assert!(!msg.contains("No such file"), "{msg}");
        said.push(generic(&msg, p));
    }
    assert!(
        said.windows(2).all(|w| w[0] == w[1]),
        "one refusal for all of them: {said:#?}"
    );

    // Relative: refused, not resolved against the agent's working directory.
    for rel in ["a.pdf", "./a.pdf", ""] {
        let msg = refusal(PathBuf::from(rel)).await;
        assert!(msg.contains("absolute path"), "{rel:?}: {msg}");
    }
    assert!(store.all_jobs().expect("jobs").is_empty(), "nothing queued");

    // What lies inside is queued, through a link inside too (under its own path).
    let q = client
        .index(&[root.join("a.pdf")])
        .await
        .expect("index")
        .expect("answered");
    assert_eq!((q.queued, q.unchanged), (1, 0));
    client
        .index(&[root.join("alias.pdf"), root.clone()])
        .await
        .expect("index")
        .expect("answered");
    let jobs: Vec<PathBuf> = store
        .all_jobs()
        .expect("jobs")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(jobs, vec![root.join("a.pdf")], "{jobs:?}");
    api.shutdown().await;
    agent.abort();
}

/// The web page off loopback: refused without `api.token` set, then answered only with it
/// (`?token=` or a bearer header); the rest of the API is as before. On loopback it needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_off_loopback_is_served_only_with_the_token() {
    let token = "0123456789abcdef0123";
    for (configured, path, header, expected) in [
        (None, "/".to_string(), "", 403),
        (None, "/api/events".to_string(), "", 403),
        (Some(token), "/".to_string(), "", 401),
        (
            Some(token),
            "/?token=wrong-token-wrong-token".to_string(),
            "",
            401,
        ),
        (Some(token), format!("/?token={token}"), "", 200),
        (
            Some(token),
            "/app.js".to_string(),
            &format!("\r\nAuthorization: Bearer {token}") as &str,
            200,
        ),
        (Some(token), "/status".to_string(), "", 200),
    ] {
        let cfg = ApiConfig {
            bind: "0.0.0.0".into(),
            allow_non_loopback: true,
            token: configured.map(String::from),
            ..loopback_config()
        };
        let api = RunningApi::start(&cfg, quiet_state()).await;
        let port = api.addr.port();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let (code, body) = raw_request(
            to,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}{header}"),
            "",
        )
        .await;
        assert_eq!(code, expected, "{path} with token {configured:?}: {body}");
        api.shutdown().await;
    }
    // Loopback: no token asked for.
    let api = RunningApi::start(&loopback_config(), quiet_state()).await;
    let (code, body) = raw_request(
        api.addr,
        &format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}", api.addr.port()),
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("DocuSearch"), "{body}");
    api.shutdown().await;
}
