//! The local status API: `GET /health`, `GET /status`, `GET /metrics`, `POST /rescan`,
//! `POST /index`, `POST /repair`, on 127.0.0.1 by default.
//!
//! The agent builds one [`ApiState`], keeps a clone, and updates it as it works: what it reads
//! from its store through [`ApiState::update`] / [`ApiState::record_document`]; its stages
//! record everything else in the [`Telemetry`] of [`ApiState::telemetry`], which every
//! snapshot reads. It waits for rescan requests with [`ApiState::rescan_requested`],
//! and carries out index and repair requests from [`ApiState::take_requests`].
//! [`serve`] (or [`ApiServer`]) answers HTTP from that state until the shutdown future resolves.
//! [`ApiClient`] is the other end, for commands that talk to a running agent.
//!
//! The API has no authentication, so a web page in a browser on this machine must not be able
//! to use it: a request is answered only when its `Host` is the API's own address (loopback, or
//! the bound address with `api.allow_non_loopback`), so a page whose name was rebound to
//! 127.0.0.1 (DNS rebinding) cannot read `/status`; and a `POST` is refused when it carries
//! another site's `Origin`, a `Sec-Fetch-Site` other than `same-origin`, or a body that is not
//! `application/json` (a page can send a form or plain text without asking the server first,
//! JSON not). The CLI, curl and scripts send none of these.
//!
//! ```no_run
//! # async fn agent(config: docusearch_agent::config::Config) -> anyhow::Result<()> {
//! use docusearch_agent::api::{self, ApiState, ChromaProbe};
//! use docusearch_agent::telemetry::Stage;
//! let state = ApiState::new(api::initial_status(&config), ChromaProbe::from_config(&config.chroma)?);
//! let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn({
//!     let (cfg, state) = (config.api.clone(), state.clone());
//!     async move { api::serve(&cfg, state, async { let _ = stop_rx.await; }).await }
//! });
//! // The managed Chroma is up: health checks can reach it.
//! state.update(|s| s.chroma.url = "http://127.0.0.1:8123".into());
//! // Stages count what they do.
//! state.telemetry().pages_embedded.inc_by(4);
//! state.telemetry().embed_latency.observe(1.7);
//! state.telemetry().failures.inc(Stage::Extract);
//! // The reconcile loop also wakes up on `POST /rescan`.
//! tokio::select! {
//!     _ = state.rescan_requested() => { /* reconcile every watched folder */ }
//!     _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
//! }
//! let _ = stop_tx.send(());
//! server.await??;
//! # Ok(()) }
//! ```

mod metrics;
mod status;
pub mod web;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot, Notify};

pub use metrics::{render_prometheus, PROMETHEUS_CONTENT_TYPE};
pub use status::{
    AgentStatus, ChromaStatus, CounterSnapshot, DocStage, DocState, DocumentProgress,
    FailedDocument, Health, HealthState, IndexedCounts, ModelState, ModelStatus, QueueCounts,
    QueuedPaths, RecentDocument, StoreStatus, TaskFailure, LISTED_FAILURES, RECENT_DOCUMENTS,
};
pub use web::WebBackend;

use crate::config::ApiConfig;
pub use crate::telemetry::now_iso;
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("api.bind = {0:?} is not an IP address — use 127.0.0.1 (or ::1)")]
    BadBind(String),
    #[error("refusing to serve the status API on {0}: not a loopback address. It has no authentication; set api.allow_non_loopback = true only if the network is yours")]
    NonLoopback(IpAddr),
    #[error("cannot listen on {addr} for the status API: {source}. Another agent may be running (check `docusearch-agent status`), or change api.port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the status API on {addr} stopped: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build an HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("request to the agent's status API {url} failed: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("the agent's status API {url} answered {status}: {body}")]
    Response {
        url: String,
        status: u16,
        body: String,
    },
}

/// How long a `/health` or `/status` request waits for Chroma's heartbeat.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// Checks Chroma with a real heartbeat (`GET {url}/api/v2/heartbeat`), with the auth token.
#[derive(Clone)]
pub struct ChromaProbe {
    client: reqwest::Client,
    auth_token: Option<String>,
}

impl std::fmt::Debug for ChromaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ChromaProbe")
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ChromaProbe {
    pub fn new(auth_token: Option<String>, timeout: Duration) -> Result<ChromaProbe, ApiError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(ApiError::Client)?;
        Ok(ChromaProbe { client, auth_token })
    }

    /// With the configured token and the default heartbeat timeout.
    pub fn from_config(chroma: &crate::config::ChromaConfig) -> Result<ChromaProbe, ApiError> {
        Self::new(chroma.auth_token.clone(), DEFAULT_HEARTBEAT_TIMEOUT)
    }

    /// `Ok` when the server answers 200; otherwise what went wrong, for a person to read.
    pub async fn heartbeat(&self, base_url: &str) -> Result<(), String> {
        use crate::chroma::client::{ChromaClient, RetryPolicy};
        let token = self.auth_token.as_deref();
        let client = ChromaClient::with_http(self.client.clone(), base_url, token)
            .map_err(|e| e.heartbeat_reason())?;
        let once = client.with_retry(RetryPolicy::no_retry());
        once.heartbeat().await.map_err(|e| e.heartbeat_reason())
    }
}

/// What the HTTP handlers read and the agent writes. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    status: Mutex<AgentStatus>,
    telemetry: Arc<Telemetry>,
    probe: ChromaProbe,
    rescan: Notify,
    requests_tx: mpsc::UnboundedSender<AgentRequest>,
    requests_rx: Mutex<Option<mpsc::UnboundedReceiver<AgentRequest>>>,
    index_requests_done: std::sync::atomic::AtomicU64,
    started: Instant,
    /// The web page's search and thumbnails, once `run` has its store and Chroma.
    web: std::sync::OnceLock<Arc<WebBackend>>,
    /// Cancelled when the server shuts down: ends the page's event streams.
    closing: tokio_util::sync::CancellationToken,
}

/// Work the API asks of the agent, with where its answer goes (an error is the reason, for the
/// user).
pub enum AgentRequest {
    /// `POST /index`: index these paths now.
    Index {
        paths: Vec<std::path::PathBuf>,
        reply: oneshot::Sender<Result<QueuedPaths, String>>,
    },
    /// `POST /repair`: step 3 of `repair`, the reconcile of Chroma with the state store the
    /// agent holds (its report as JSON).
    Reconcile {
        dry_run: bool,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
}

/// The body of `POST /index`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IndexBody {
    pub paths: Vec<std::path::PathBuf>,
}

/// The body of `POST /repair`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RepairBody {
    #[serde(default)]
    pub dry_run: bool,
}

impl ApiState {
    /// `initial` is the agent's first snapshot (agent id, version, Chroma URL, model name...);
    /// `pid`, `started_at` and `version` are filled in when left empty. The state keeps a
    /// [`Telemetry`] for the agent's stages to record into ([`ApiState::telemetry`]).
    pub fn new(initial: AgentStatus, probe: ChromaProbe) -> ApiState {
        let telemetry = Arc::new(Telemetry::new(&initial.model.name));
        Self::with_telemetry(initial, probe, telemetry)
    }

    /// [`ApiState::new`] reading the given telemetry.
    pub fn with_telemetry(
        mut initial: AgentStatus,
        probe: ChromaProbe,
        telemetry: Arc<Telemetry>,
    ) -> ApiState {
        if initial.pid == 0 {
            initial.pid = std::process::id();
        }
        if initial.started_at.is_empty() {
            initial.started_at = now_iso();
        }
        if initial.version.is_empty() {
            initial.version = env!("CARGO_PKG_VERSION").to_string();
        }
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        ApiState {
            inner: Arc::new(Inner {
                status: Mutex::new(initial),
                telemetry,
                probe,
                rescan: Notify::new(),
                requests_tx,
                requests_rx: Mutex::new(Some(requests_rx)),
                index_requests_done: std::sync::atomic::AtomicU64::new(0),
                started: Instant::now(),
                web: std::sync::OnceLock::new(),
                closing: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// Gives the web page its search and thumbnails (the first call wins). Until then they
    /// answer 503.
    pub fn attach_web(&self, web: WebBackend) {
        let _ = self.inner.web.set(Arc::new(web));
    }

    fn web(&self) -> Option<Arc<WebBackend>> {
        self.inner.web.get().cloned()
    }

    /// Resolves when the server is shutting down.
    fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.closing.clone().cancelled_owned()
    }

    /// What the agent's stages record; [`ApiState::snapshot`] reads it.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.inner.telemetry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentStatus> {
        self.inner.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the snapshot in place (`state.update(|s| s.queue = counts)`). Keep `f` short: the
    /// handlers wait for it.
    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.lock());
    }

    /// Puts a document at the top of the recent list (replacing its older entry), keeping at
    /// most [`RECENT_DOCUMENTS`].
    pub fn record_document(&self, doc: RecentDocument) {
        let mut s = self.lock();
        s.recent.retain(|d| d.path != doc.path);
        s.recent.insert(0, doc);
        s.recent.truncate(RECENT_DOCUMENTS);
    }

    /// Records a failed document at the top of the failure list (replacing its older entry).
    pub fn record_failure(&self, failure: FailedDocument) {
        let mut s = self.lock();
        s.failures.retain(|d| d.path != failure.path);
        s.failures.insert(0, failure);
        s.failures.truncate(LISTED_FAILURES);
    }

    /// Removes a document from the failure list (it was indexed or removed since).
    pub fn clear_failure(&self, path: &std::path::Path) {
        self.lock().failures.retain(|d| d.path != path);
    }

    /// A copy of the snapshot: what the agent refreshed from its store, with what the
    /// telemetry records now (model, documents in progress, counters, failed tasks).
    pub fn snapshot(&self) -> AgentStatus {
        let mut s = self.lock().clone();
        self.overlay(&mut s);
        s
    }

    fn overlay(&self, s: &mut AgentStatus) {
        let t = &self.inner.telemetry;
        s.uptime_s = self.inner.started.elapsed().as_secs();
        let name = std::mem::take(&mut s.model.name);
        s.model = t.model();
        if s.model.name.is_empty() {
            s.model.name = name;
        }
        s.in_progress = t.documents();
        s.counters = t.counters();
        s.task_failures = t.task_failures();
        s.sync_waiting = t.chroma_waiting_reason();
        s.watch_polling = t.polling();
        // Files no job can index (their name, their permissions) are failures too.
        for (path, reason) in t.refused() {
            if !s.failures.iter().any(|f| f.path == path) {
                s.failures.push(FailedDocument {
                    path,
                    reason,
                    attempts: 0,
                    at: String::new(),
                });
            }
        }
        let missing = t.missing_folders();
        s.missing_folders.retain(|f| !missing.contains(f));
        s.missing_folders.extend(missing);
    }

    /// Numbers a `POST /index` request whose jobs are now in the store (see
    /// [`QueuedPaths::request`]).
    pub fn index_request_done(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.inner
            .index_requests_done
            .fetch_add(1, Ordering::SeqCst)
            + 1
    }

    /// How many `POST /index` requests have their jobs in the store. Read it before reading
    /// the store's counts into the snapshot.
    pub fn index_requests_done(&self) -> u64 {
        self.inner
            .index_requests_done
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Asks the agent for a reconcile. Requests made before the agent gets to them coalesce
    /// into one.
    pub fn request_rescan(&self) {
        self.lock().rescan_pending = true;
        self.inner.telemetry.rescans_requested.inc();
        self.inner.rescan.notify_one();
    }

    /// Resolves when a reconcile was asked for (also one asked for before this call). Clears the
    /// `rescan_pending` flag: the agent is expected to start the reconcile now.
    pub async fn rescan_requested(&self) {
        self.inner.rescan.notified().await;
        self.lock().rescan_pending = false;
    }

    /// The `POST /index` and `POST /repair` requests, for the one task that carries them out
    /// (the first caller gets them; later calls get `None`). Until it is taken, or once it is
    /// dropped, requests are answered 503.
    pub fn take_requests(&self) -> Option<mpsc::UnboundedReceiver<AgentRequest>> {
        self.inner
            .requests_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Hands `request` to the agent: `false` when nothing takes requests (yet, or any more).
    fn send_request(&self, request: AgentRequest) -> bool {
        let taken = self
            .inner
            .requests_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        taken && self.inner.requests_tx.send(request).is_ok()
    }

    /// Checks Chroma now (recording the answer in the snapshot) and combines it with what the
    /// pipeline reported.
    pub async fn check_health(&self) -> Health {
        self.check().await.0
    }

    /// [`ApiState::check_health`], with the snapshot it judged (its Chroma fields just
    /// checked): what `/status` and `/metrics` answer.
    pub async fn check(&self) -> (Health, AgentStatus) {
        let url = self.lock().chroma.url.clone();
        let chroma = if url.is_empty() {
            Err("the managed Chroma server has not started yet".to_string())
        } else {
            self.inner.probe.heartbeat(&url).await
        };
        let mut s = {
            let mut s = self.lock();
            s.chroma.last_checked = Some(now_iso());
            s.chroma.reachable = Some(chroma.is_ok());
            s.chroma.error = chroma.as_ref().err().cloned();
            s.clone()
        };
        self.overlay(&mut s);
        let mut reasons = Vec::new();
        match chroma {
            Err(e) if url.is_empty() => reasons.push(format!("chroma unreachable: {e}")),
            Err(e) => reasons.push(format!("chroma unreachable at {url}: {e}")),
            Ok(()) => {}
        }
        reasons.extend(s.degraded_reasons());
        (Health::from_reasons(reasons), s)
    }
}

/// The first snapshot for a configuration: identity, folders, model, Chroma (its URL stays
/// empty for a managed server until it has started), store.
pub fn initial_status(config: &crate::config::Config) -> AgentStatus {
    let (url, managed) = match config.chroma_target() {
        crate::config::ChromaTarget::Remote { url } => (url, false),
        crate::config::ChromaTarget::Managed => (String::new(), true),
    };
    AgentStatus {
        agent_id: config.agent_id.clone(),
        watched_folders: config.watch.folders.clone(),
        model: ModelStatus {
            name: config.model.name.clone(),
            ..Default::default()
        },
        chroma: ChromaStatus {
            url,
            managed,
            visual_collection: config.chroma.visual_collection.clone(),
            text_collection: config.chroma.text_collection.clone(),
            ..Default::default()
        },
        store: StoreStatus {
            path: config.store_dir(),
            error: None,
        },
        ..Default::default()
    }
}

/// The address to listen on: loopback unless non-loopback was asked for explicitly.
pub fn bind_addr(cfg: &ApiConfig) -> Result<SocketAddr, ApiError> {
    let ip: IpAddr = cfg
        .bind
        .trim()
        .parse()
        .map_err(|_| ApiError::BadBind(cfg.bind.clone()))?;
    if !ip.is_loopback() && !cfg.allow_non_loopback {
        return Err(ApiError::NonLoopback(ip));
    }
    Ok(SocketAddr::new(ip, cfg.port))
}

/// A listening status API, not yet answering. Lets the caller learn the port (port 0 picks a
/// free one) before serving.
pub struct ApiServer {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    allow_non_loopback: bool,
    token: Option<String>,
}

impl ApiServer {
    /// Refuses a non-loopback address unless `cfg.allow_non_loopback`, whatever validated
    /// the configuration before.
    pub async fn bind(cfg: &ApiConfig) -> Result<ApiServer, ApiError> {
        let want = bind_addr(cfg)?;
        let listener = tokio::net::TcpListener::bind(want)
            .await
            .map_err(|source| ApiError::Bind { addr: want, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiError::Bind { addr: want, source })?;
        Ok(ApiServer {
            listener,
            addr,
            allow_non_loopback: cfg.allow_non_loopback,
            token: cfg.token.clone(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests until `shutdown` resolves, then lets requests in flight finish.
    pub async fn run(
        self,
        state: ApiState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ApiError> {
        tracing::info!(addr = %self.addr, "status API listening");
        let addr = self.addr;
        // Event streams never end by themselves: they are told to, or a graceful shutdown
        // would wait for every open page.
        let closing = state.inner.closing.clone();
        let shutdown = async move {
            shutdown.await;
            closing.cancel();
        };
        let app = app(state, addr, self.allow_non_loopback, self.token);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ApiError::Serve { addr, source })
    }
}

/// Binds `cfg.bind:cfg.port` and serves until `shutdown` resolves.
pub async fn serve(
    cfg: &ApiConfig,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    ApiServer::bind(cfg).await?.run(state, shutdown).await
}

/// The routes, answering requests addressed to `listening` (see the module's notes on who may
/// ask), for embedding in another server or testing.
pub fn router(state: ApiState, listening: SocketAddr, allow_non_loopback: bool) -> Router {
    app(state, listening, allow_non_loopback, None)
}

/// [`router`], with the web page's token for when it listens off loopback.
fn app(
    state: ApiState,
    listening: SocketAddr,
    allow_non_loopback: bool,
    token: Option<String>,
) -> Router {
    let guard = Arc::new(RequestGuard::new(listening, allow_non_loopback));
    let web = web::WebGuard {
        needs_token: guard.bound.map(|_| token),
    };
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/rescan", post(rescan))
        .route("/index", post(index))
        .route("/repair", post(repair))
        .with_state(state.clone())
        .merge(web::routes(state, web))
        .layer(middleware::from_fn_with_state(guard, check_request))
}

/// Which requests are the API's to answer: those addressed to it by its own address.
#[derive(Debug, Clone)]
struct RequestGuard {
    port: u16,
    /// The bound address, when it is not loopback (`api.allow_non_loopback`); an unspecified
    /// one (`0.0.0.0`, `::`) stands for every address of the machine, so any IP address.
    bound: Option<IpAddr>,
}

impl RequestGuard {
    fn new(listening: SocketAddr, allow_non_loopback: bool) -> RequestGuard {
        let ip = listening.ip();
        RequestGuard {
            port: listening.port(),
            bound: (allow_non_loopback && !ip.is_loopback()).then_some(ip),
        }
    }

    /// A `Host` (or an origin's host) naming this API: `localhost` or a loopback address, or
    /// the bound address, with the port it listens on (none written means 80). Any other name
    /// may be one that its owner points at 127.0.0.1; an IP address cannot be.
    fn allows_host(&self, host: &str) -> bool {
        let (name, port) = match host.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((name, "")) => (name, None),
                Some((name, after)) => match after.strip_prefix(':') {
                    Some(port) => (name, Some(port)),
                    None => return false,
                },
                None => return false,
            },
            None => match host.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (host, None),
            },
        };
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) => p,
                Err(_) => return false,
            },
        };
        if port != self.port {
            return false;
        }
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let Ok(ip) = name.parse::<IpAddr>() else {
            return false;
        };
        ip.is_loopback()
            || match self.bound {
                Some(b) if b.is_unspecified() => true,
                Some(b) => b == ip,
                None => false,
            }
    }

    /// An `Origin` that is this API's own (`http://127.0.0.1:8002`).
    fn allows_origin(&self, origin: &str) -> bool {
        origin
            .strip_prefix("http://")
            .is_some_and(|host| !host.contains('/') && self.allows_host(host))
    }

    /// The addresses the API answers at, for the refusal.
    fn addresses(&self) -> String {
        let p = self.port;
        let mut s = format!("http://127.0.0.1:{p}, http://localhost:{p} or http://[::1]:{p}");
        match self.bound {
            Some(b) if b.is_unspecified() => s.push_str(&format!(
                ", or any IP address of this machine with port {p}"
            )),
            Some(b) => s.push_str(&format!(", or {}", SocketAddr::new(b, p))),
            None => {}
        }
        s
    }
}

fn json_error(code: StatusCode, msg: &str) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

/// Refuses what is not for the API (see the module's notes) before any handler runs.
async fn check_request(
    State(guard): State<Arc<RequestGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .map(text)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !host.as_deref().is_some_and(|h| guard.allows_host(h)) {
        let said = host.map_or("no Host header".to_string(), |h| format!("Host {h:?}"));
        return json_error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "{said} is not this agent's status API, which answers only at {} (so that a web page cannot reach it under a name of its own)",
                guard.addresses()
            ),
        );
    }
    if !request.method().is_safe() {
        if let Some(origin) = headers.get(header::ORIGIN).map(text) {
            if !guard.allows_origin(&origin) {
                return json_error(
                    StatusCode::FORBIDDEN,
                    &format!("refused: a request from {origin:?} (a web page of another site) may not change the agent; send it without an Origin header, as `docusearch-agent` and curl do"),
                );
            }
        }
        if let Some(site) = headers.get("sec-fetch-site").map(text) {
            if site != "same-origin" && site != "none" {
                return json_error(
                    StatusCode::FORBIDDEN,
                    &format!("refused: the browser marks this request as {site} (from a web page of another site); it may not change the agent"),
                );
            }
        }
        if let Some(ctype) = headers.get(header::CONTENT_TYPE).map(text) {
            let essence = ctype.split(';').next().unwrap_or_default().trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                return json_error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &format!("content-type {ctype:?} is not accepted: send `content-type: application/json` with a JSON body, or no body"),
                );
            }
        }
    }
    next.run(request).await
}

/// Why a body is not the JSON asked for, as a JSON error.
fn bad_body(rejection: JsonRejection) -> Response {
    let msg = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the body as JSON, with `content-type: application/json`".to_string()
        }
        other => other.body_text(),
    };
    json_error(rejection.status(), &msg)
}

async fn health(State(state): State<ApiState>) -> Response {
    let health = state.check_health().await;
    let code = if health.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health)).into_response()
}

async fn status(State(state): State<ApiState>) -> Json<AgentStatus> {
    // The Chroma fields with a live heartbeat.
    Json(state.check().await.1)
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let (_, snapshot) = state.check().await;
    let body = render_prometheus(state.telemetry(), &snapshot);
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], body).into_response()
}

async fn rescan(State(state): State<ApiState>) -> Response {
    state.request_rescan();
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "accepted"})),
    )
        .into_response()
}

/// How long `POST /index` and `POST /repair` wait for the agent's answer (a large folder is
/// scanned; every record id of the agent is listed).
const REQUEST_REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends a request to the agent and answers with its reply: 202 with the result, 422 with the
/// agent's reason, 503 when nothing takes requests, 504 when no answer comes in time.
async fn ask_agent<T: serde::Serialize>(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> AgentRequest,
) -> Response {
    let error = json_error;
    let (reply, answer) = oneshot::channel();
    if !state.send_request(make(reply)) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is not taking requests (starting or stopping); try again",
        );
    }
    match tokio::time::timeout(REQUEST_REPLY_TIMEOUT, answer).await {
        Ok(Ok(Ok(result))) => (StatusCode::ACCEPTED, Json(result)).into_response(),
        Ok(Ok(Err(msg))) => error(StatusCode::UNPROCESSABLE_ENTITY, &msg),
        Ok(Err(_)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent stopped before answering",
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent did not answer in time (still working?); `status` shows its queue",
        ),
    }
}

async fn index(
    State(state): State<ApiState>,
    body: Result<Json<IndexBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(r) => return bad_body(r),
    };
    ask_agent(&state, |reply| AgentRequest::Index {
        paths: body.paths,
        reply,
    })
    .await
}

async fn repair(
    State(state): State<ApiState>,
    body: Result<Json<RepairBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(b)) => b,
        Err(r) => return bad_body(r),
    };
    ask_agent(&state, |reply| AgentRequest::Reconcile {
        dry_run: body.dry_run,
        reply,
    })
    .await
}

/// Talks to a running agent's status API (for `status`, `service status`, `index` while the
/// agent runs).
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    client: reqwest::Client,
}

impl ApiClient {
    /// Reaches the API configured in `cfg`; a wildcard bind address is reached on loopback.
    pub fn new(cfg: &ApiConfig, timeout: Duration) -> Result<ApiClient, ApiError> {
        let ip: IpAddr = cfg
            .bind
            .trim()
            .parse()
            .map_err(|_| ApiError::BadBind(cfg.bind.clone()))?;
        let ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };
        Self::at(SocketAddr::new(ip, cfg.port), timeout)
    }

    pub fn at(addr: SocketAddr, timeout: Duration) -> Result<ApiClient, ApiError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(ApiError::Client)?;
        Ok(ApiClient {
            base: format!("http://{addr}"),
            client,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `None` when no agent listens there (connection refused).
    pub async fn status(&self) -> Result<Option<AgentStatus>, ApiError> {
        let url = format!("{}/status", self.base);
        let sent = self.client.get(&url).send().await;
        json_answer(url, sent).await
    }

    /// `None` when no agent listens there. A degraded agent (503) is an answer, not an error.
    pub async fn health(&self) -> Result<Option<Health>, ApiError> {
        let url = format!("{}/health", self.base);
        match self.client.get(&url).send().await {
            Err(e) if e.is_connect() => Ok(None),
            Err(source) => Err(ApiError::Request { url, source }),
            Ok(resp) => resp
                .json()
                .await
                .map(Some)
                .map_err(|source| ApiError::Request { url, source }),
        }
    }

    /// Asks the running agent to index `paths` (absolute, in its watched folders). `None` when
    /// no agent listens; a path the agent refuses is an `ApiError::Response` with its reason.
    pub async fn index(
        &self,
        paths: &[std::path::PathBuf],
    ) -> Result<Option<QueuedPaths>, ApiError> {
        let body = IndexBody {
            paths: paths.to_vec(),
        };
        self.post_json("/index", &body).await
    }

    /// Asks the running agent for step 3 of `repair` (its report as JSON). `None` when no agent
    /// listens.
    pub async fn repair(&self, dry_run: bool) -> Result<Option<serde_json::Value>, ApiError> {
        self.post_json("/repair", &RepairBody { dry_run }).await
    }

    async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Option<T>, ApiError> {
        let url = format!("{}{path}", self.base);
        let sent = self.client.post(&url).json(body).send().await;
        json_answer(url, sent).await
    }

    /// Asks the running agent for a reconcile. `false` when no agent listens.
    pub async fn rescan(&self) -> Result<bool, ApiError> {
        let url = format!("{}/rescan", self.base);
        match self.client.post(&url).send().await {
            Err(e) if e.is_connect() => Ok(false),
            Err(source) => Err(ApiError::Request { url, source }),
            Ok(resp) => ok_or_error(&url, resp).await.map(|_| true),
        }
    }
}

/// A successful answer's JSON; `None` when nothing listens (connection refused).
async fn json_answer<T: serde::de::DeserializeOwned>(
    url: String,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<Option<T>, ApiError> {
    match sent {
        Err(e) if e.is_connect() => Ok(None),
        Err(source) => Err(ApiError::Request { url, source }),
        Ok(resp) => {
            let resp = ok_or_error(&url, resp).await?;
            resp.json()
                .await
                .map(Some)
                .map_err(|source| ApiError::Request { url, source })
        }
    }
}

async fn ok_or_error(url: &str, resp: reqwest::Response) -> Result<reqwest::Response, ApiError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    Err(ApiError::Response {
        url: url.to_string(),
        status,
        body,
    })
}
