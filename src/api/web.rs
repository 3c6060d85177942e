//! The web page on the status API: `GET /` (a search box, results as page thumbnails, a live
//! status panel), and what it calls:
//!
//! - `GET /api/search?q=&limit=&mode=`: exactly what `search --json` prints ([`SearchReport`]);
//! - `GET /api/thumbnail/{doc_id}/{page}`: a PNG of an indexed page, rendered by the isolated
//!   worker and cached ([`thumbnails`]). Addressed by the record's identity, never by a path:
//!   the path comes from the state store, so no path from the client is ever opened;
//! - `GET /api/document/{doc_id}`: the indexed file itself (a browser does not let a page open
//!   `file://` addresses; its PDF viewer honours `#page=N`);
//! - `GET /api/events`: server-sent events carrying the status snapshot `/status` answers,
//!   read once a second while a page listens (nothing runs while none does);
//! - `POST /api/open`: opens an indexed document, or its folder, on this machine.
//!
//! HTML, CSS and JS are embedded in the binary (no build step, no network). Off loopback the
//! page answers only with `api.token`.

pub mod thumbnails;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{json_error, ApiState};
use crate::chroma::client::ChromaClient;
use crate::config::Config;
use crate::embed::Embedder;
use crate::extract::{ExtractOptions, Extractor};
use crate::search::{search_text, Scope, SearchOptions, SearchReport, Searcher};
use crate::state::{FileRecord, FileStamp, Store};
use crate::types::DocId;
use thumbnails::ThumbnailCache;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// Longest side of a thumbnail, in pixels (cards are ~220 CSS pixels wide; twice that for
/// high-density screens).
pub const THUMBNAIL_SIDE: u32 = 480;
/// Thumbnails rendered at once (each is a worker process).
const RENDERS_AT_ONCE: usize = 2;
/// How often a listening page gets the snapshot (only sent when it changed), and how often
/// Chroma's heartbeat is checked for it.
const EVENT_PERIOD: Duration = Duration::from_secs(1);
const HEARTBEAT_EVERY: u32 = 5;
const MAX_LIMIT: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("the thumbnail renderer cannot start: {0}")]
    Extractor(String),
    #[error("{0}")]
    Chroma(String),
}

/// What the page's search and thumbnails need from the running agent: its store (which files
/// are indexed, their content hashes), Chroma, the extractor, and a query model of its own.
pub struct WebBackend {
    store: Store,
    folders: Vec<PathBuf>,
    agent_id: String,
    chroma: ChromaClient,
    chroma_url: String,
    chroma_cfg: crate::config::ChromaConfig,
    model: QueryModel,
    extractor: Extractor,
    thumbnails: ThumbnailCache,
    renders: tokio::sync::Semaphore,
    /// doc id → path, rebuilt from the store when an id is not in it.
    paths: Mutex<HashMap<DocId, PathBuf>>,
}

impl WebBackend {
    /// `worker_exe` is the `docusearch-agent` executable (it runs `extract-worker`).
    pub fn new(
        cfg: &Config,
        chroma_url: &str,
        store: Store,
        worker_exe: PathBuf,
    ) -> Result<WebBackend, WebError> {
        let extractor = Extractor::new(ExtractOptions::from_config(&cfg.extract, 0, worker_exe))
            .map_err(|e| WebError::Extractor(e.to_string()))?;
        let chroma = ChromaClient::new(chroma_url, &cfg.chroma)
            .map_err(|e| WebError::Chroma(e.to_string()))?;
        Ok(WebBackend {
            store,
            // The store's paths are canonical.
            folders: cfg
                .watch
                .folders
                .iter()
                .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
                .collect(),
            agent_id: cfg.agent_id.clone(),
            chroma,
            chroma_url: chroma_url.to_string(),
            chroma_cfg: cfg.chroma.clone(),
            model: QueryModel::new(cfg.model.clone()),
            extractor,
            thumbnails: ThumbnailCache::new(
                cfg.thumbnail_dir(),
                cfg.api.thumbnail_cache_mb.saturating_mul(1024 * 1024),
            ),
            renders: tokio::sync::Semaphore::new(RENDERS_AT_ONCE),
            paths: Mutex::new(HashMap::new()),
        })
    }

    /// The indexed file a doc id names, with its record, when it may be shown: known to the
    /// store, inside a watched folder, and still the file it was (no symbolic link in its
    /// way now). Only the store's path is looked at, and only with `stat`.
    fn indexed(&self, doc: &DocId) -> Result<Option<(PathBuf, FileRecord)>, String> {
        let lookup = |paths: &HashMap<DocId, PathBuf>| paths.get(doc).cloned();
        let mut path = lookup(&self.paths.lock().unwrap_or_else(|p| p.into_inner()));
        if path.is_none() {
            let mut map = HashMap::new();
            for folder in &self.folders {
                for (p, rec) in self.store.files_under(folder).map_err(|e| e.to_string())? {
                    map.insert(rec.doc_id, p);
                }
            }
            path = lookup(&map);
            *self.paths.lock().unwrap_or_else(|p| p.into_inner()) = map;
        }
        let Some(path) = path else { return Ok(None) };
        let Some(rec) = self.store.file(&path).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let inside = self.folders.iter().any(|f| path.starts_with(f));
        // The id is derived from the canonical path: anything else is not this record's file.
        let same = rec.doc_id == *doc && DocId::new(&self.agent_id, &path) == *doc;
        let canonical = std::fs::canonicalize(&path).is_ok_and(|c| c == path);
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        Ok((inside && same && canonical && is_file).then_some((path, rec)))
    }

    /// The PNG thumbnail of page `page` of an indexed document: `Ok(None)` when there is no
    /// such document or page, or the page has no image.
    async fn thumbnail(self: &Arc<Self>, doc: DocId, page: u32) -> Result<Option<Vec<u8>>, String> {
        let this = self.clone();
        let found = tokio::task::spawn_blocking(move || this.indexed(&doc))
            .await
            .map_err(|e| e.to_string())??;
        let Some((path, rec)) = found else {
            return Ok(None);
        };
        if page == 0 || page > rec.num_pages {
            return Ok(None);
        }
        let doc = rec.doc_id.clone();
        if let Some(png) = self.thumbnails.get(&doc, page, &rec.content_hash) {
            return Ok(Some(png));
        }
        let _permit = self.renders.acquire().await.map_err(|e| e.to_string())?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // Re-checked after waiting: another request may have rendered it meanwhile.
            if let Some(png) = this.thumbnails.get(&doc, page, &rec.content_hash) {
                return Ok(Some(png));
            }
            let image = this
                .extractor
                .render_page(&path, page, THUMBNAIL_SIDE)
                .map_err(|e| e.to_string())?;
            let Some(image) = image else { return Ok(None) };
            // Changed on disk since the store hashed it: shown, not cached under the old hash
            // (the agent re-indexes it, and the new hash brings a new thumbnail).
            let unchanged = FileStamp::of_path(&path) == Some(rec.stamp);
            this.thumbnails
                .put(&doc, page, &rec.content_hash, &image, unchanged)
                .map(Some)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn search(&self, query: String, opts: SearchOptions) -> anyhow::Result<SearchReport> {
        let searcher = Searcher::open(&self.chroma, &self.chroma_cfg).await?;
        let (embedder, load) = self.model.get().await?;
        let url = self.chroma_url.clone();
        let rt = tokio::runtime::Handle::current();
        // The query's forward pass is CPU work: off the server's threads.
        tokio::task::spawn_blocking(move || {
            rt.block_on(search_text(&embedder, &searcher, &url, &query, &opts, load))
        })
        .await?
    }
}

/// The model for queries, loaded at the first search and unloaded after `model.idle_unload_s`
/// without one (the pipeline's model is its own: it lives on the embedding thread).
struct QueryModel {
    cfg: crate::config::ModelConfig,
    loaded: tokio::sync::Mutex<Option<(Arc<Embedder>, Instant)>>,
}

impl QueryModel {
    fn new(cfg: crate::config::ModelConfig) -> QueryModel {
        QueryModel {
            cfg,
            loaded: tokio::sync::Mutex::new(None),
        }
    }

    /// The model, and how long loading it took now (zero when it was loaded).
    async fn get(&self) -> anyhow::Result<(Arc<Embedder>, Duration)> {
        let mut slot = self.loaded.lock().await;
        if let Some((m, used)) = slot.as_mut() {
            *used = Instant::now();
            return Ok((m.clone(), Duration::ZERO));
        }
        let cfg = self.cfg.clone();
        let started = Instant::now();
        let model = tokio::task::spawn_blocking(move || Embedder::load(&cfg)).await??;
        let model = Arc::new(model);
        tracing::info!(device = %model.device_name(), "query model loaded for the web page's search");
        *slot = Some((model.clone(), Instant::now()));
        Ok((model, started.elapsed()))
    }

    /// Unloads the model when it has not been used for the idle period (0 keeps it).
    async fn unload_if_idle(&self) {
        let idle = Duration::from_secs(self.cfg.idle_unload_s);
        let mut slot = self.loaded.lock().await;
        if !idle.is_zero()
            && slot
                .as_ref()
                .is_some_and(|(_, used)| used.elapsed() >= idle)
        {
            *slot = None;
            tracing::info!("query model idle for {idle:?}: unloaded");
        }
    }
}

/// The page's routes, answering from `state` (its [`WebBackend`] attached by `run`).
pub(super) fn routes(state: ApiState, guard: WebGuard) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/api/search", get(search))
        .route("/api/thumbnail/{doc_id}/{page}", get(thumbnail))
        .route("/api/document/{doc_id}", get(document))
        .route("/api/events", get(events))
        .route("/api/open", post(open))
        .with_state(state)
        .layer(middleware::from_fn_with_state(Arc::new(guard), check_web))
}

/// Who may use the page: off loopback, only requests with the token; and the `/api/` routes
/// only from the page itself (a browser marks what other sites' pages send).
#[derive(Debug, Clone)]
pub(super) struct WebGuard {
    /// Off loopback: the token asked for (`None`: the page is not served there).
    pub needs_token: Option<Option<String>>,
}

async fn check_web(State(guard): State<Arc<WebGuard>>, request: Request, next: Next) -> Response {
    if let Some(token) = &guard.needs_token {
        let Some(token) = token else {
            return json_error(
                StatusCode::FORBIDDEN,
                "the web page is served off loopback only with a token: set api.token in the config file, then open http://HOST:PORT/?token=TOKEN",
            );
        };
        if !carries_token(&request, token) {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "this page needs the token (api.token): open it as http://HOST:PORT/?token=TOKEN",
            );
        }
    }
    if request.uri().path().starts_with("/api/") {
        let site = request.headers().get("sec-fetch-site");
        if let Some(site) = site.and_then(|v| v.to_str().ok()) {
            if site != "same-origin" && site != "none" {
                return json_error(
                    StatusCode::FORBIDDEN,
                    &format!("refused: the browser marks this request as {site} (from a web page of another site)"),
                );
            }
        }
    }
    next.run(request).await
}

fn carries_token(request: &Request, token: &str) -> bool {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = request.uri().query().unwrap_or_default();
    let in_query = query.split('&').find_map(|kv| kv.strip_prefix("token="));
    [bearer, in_query]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given.as_bytes(), token.as_bytes()))
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            // Nothing from elsewhere: the page works offline and runs only its own script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn unavailable() -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "search and thumbnails are served by the running agent (`docusearch-agent run`) once it has started",
    )
}

/// The indexed file a doc id names (see [`WebBackend::indexed`]), or why not, as the answer.
async fn indexed_path(web: Arc<WebBackend>, doc: DocId) -> Result<PathBuf, (StatusCode, String)> {
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
    match tokio::task::spawn_blocking(move || web.indexed(&doc)).await {
        Ok(Ok(Some((path, _)))) => Ok(path),
        Ok(Ok(None)) => Err((StatusCode::NOT_FOUND, "no such indexed document".into())),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e.to_string())),
    }
}

#[derive(Debug, serde::Deserialize)]
struct SearchParams {
    q: Option<String>,
    limit: Option<usize>,
    mode: Option<String>,
}

async fn search(State(state): State<ApiState>, Query(p): Query<SearchParams>) -> Response {
    let Some(web) = state.web() else {
        return unavailable();
    };
    let query = p.q.unwrap_or_default().trim().to_string();
    if query.is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "give a query: /api/search?q=WORDS");
    }
    let scope = match p.mode.as_deref().unwrap_or("hybrid") {
        "hybrid" | "both" => Scope::Hybrid,
        "visual" => Scope::Visual,
        "text" => Scope::Text,
        other => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("mode {other:?} is not one of hybrid (or both), visual, text"),
            )
        }
    };
    let limit = p.limit.unwrap_or(10).clamp(1, MAX_LIMIT);
    let defaults = SearchOptions::default();
    let opts = SearchOptions {
        limit,
        candidates: defaults.candidates.max(limit),
        scope,
        ..defaults
    };
    let answer = web.search(query, opts).await;
    // The model stays loaded for the next query; it is let go after the idle period.
    let idle = Duration::from_secs(web.model.cfg.idle_unload_s);
    if !idle.is_zero() {
        let w = web.clone();
        tokio::spawn(async move {
            tokio::time::sleep(idle).await;
            w.model.unload_if_idle().await;
        });
    }
    match answer {
        Ok(report) => Json(report).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{e:#}")),
    }
}

/// A doc id as the record format writes it (32 lowercase hex digits): anything else (a path,
/// `..`, an encoded slash) is not one.
fn parse_doc_id(s: &str) -> Option<DocId> {
    (s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| DocId::from_string(s))
}

async fn thumbnail(
    State(state): State<ApiState>,
    UrlPath((doc_id, page)): UrlPath<(String, String)>,
) -> Response {
    let Some(web) = state.web() else {
        return unavailable();
    };
    let (Some(doc), Ok(page)) = (parse_doc_id(&doc_id), page.parse::<u32>()) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "a thumbnail is asked for as /api/thumbnail/DOC_ID/PAGE (a record's doc_id and 1-based page)",
        );
    };
    match web.thumbnail(doc, page).await {
        Ok(Some(png)) => (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            png,
        )
            .into_response(),
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            "no such page of an indexed document (or it has no image)",
        ),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn document(State(state): State<ApiState>, UrlPath(doc_id): UrlPath<String>) -> Response {
    let Some(web) = state.web() else {
        return unavailable();
    };
    let Some(doc) = parse_doc_id(&doc_id) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "a document is asked for as /api/document/DOC_ID",
        );
    };
    let path = match indexed_path(web, doc).await {
        Ok(p) => p,
        Err((code, msg)) => return json_error(code, &msg),
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return json_error(StatusCode::NOT_FOUND, &format!("cannot read it now: {e}")),
    };
    let content_type = match crate::types::DocFormat::from_path(&path).map(|f| f.as_str()) {
        Some("pdf") => "application/pdf",
        Some("text" | "markdown" | "csv") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        _ => match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => "image/png",
            Some("jpg" | "jpeg") => "image/jpeg",
            Some("gif") => "image/gif",
            Some("webp") => "image/webp",
            _ => "application/octet-stream",
        },
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{name}\""),
            ),
            // HTML files go out as bytes to save, never sniffed into a page of this origin.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        body,
    )
        .into_response()
}

/// The status snapshot, as `/status` answers it, each time it changes while the page listens.
async fn events(
    State(state): State<ApiState>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    use futures_util::StreamExt as _;
    let closing = state.closing();
    let stream = futures_util::stream::unfold(
        (state, 0u32, String::new()),
        |(state, mut tick, mut last)| async move {
            loop {
                if tick > 0 {
                    tokio::time::sleep(EVENT_PERIOD).await;
                }
                let snapshot = if tick % HEARTBEAT_EVERY == 0 {
                    state.check().await.1
                } else {
                    state.snapshot()
                };
                tick = tick.wrapping_add(1);
                let mut value = serde_json::to_value(&snapshot).unwrap_or_default();
                // Uptime alone changes every second: not worth a message.
                if let Some(o) = value.as_object_mut() {
                    o.remove("uptime_s");
                }
                let json = value.to_string();
                if json != last {
                    last = json.clone();
                    let event = Event::default().event("status").data(json);
                    return Some((Ok(event), (state, tick, last)));
                }
            }
        },
    );
    Sse::new(stream.take_until(closing)).keep_alive(KeepAlive::default())
}

#[derive(Debug, serde::Deserialize)]
struct OpenBody {
    doc_id: String,
    /// Show it in its folder instead of opening it.
    #[serde(default)]
    reveal: bool,
}

/// Opens an indexed document (or its folder) with the desktop's own program.
async fn open(State(state): State<ApiState>, Json(body): Json<OpenBody>) -> Response {
    let Some(web) = state.web() else {
        return unavailable();
    };
    let Some(doc) = parse_doc_id(&body.doc_id) else {
        return json_error(StatusCode::BAD_REQUEST, "doc_id is not a record's doc_id");
    };
    let path = match indexed_path(web, doc).await {
        Ok(p) => p,
        Err((code, msg)) => return json_error(code, &msg),
    };
    match open_on_desktop(&path, body.reveal) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "opened": path, "reveal": body.reveal })),
        )
            .into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

fn open_on_desktop(path: &Path, reveal: bool) -> Result<(), String> {
    let mut cmd = if cfg!(target_os = "macos") {
        let mut c = std::process::Command::new("open");
        if reveal {
            c.arg("-R");
        }
        c.arg(path);
        c
    } else {
        let mut c = std::process::Command::new("xdg-open");
        c.arg(if reveal {
            path.parent().unwrap_or(path)
        } else {
            path
        });
        c
    };
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(|mut child| {
            // Reaped in the background: the desktop program may stay open.
            std::thread::spawn(move || child.wait());
        })
        .map_err(|e| {
            format!(
                "cannot run `{program}` to open {}: {e} (is a desktop session available?)",
                path.display()
            )
        })
}
