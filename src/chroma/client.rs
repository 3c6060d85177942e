//! A client for Chroma's HTTP API v2 (`/api/v2/...`), on `reqwest` with rustls: tenants,
//! databases, collections, and records with any metadata (what DocuSearch's records hold is
//! `crate::records`' business, not this client's).
//!
//! Transient failures (no connection, timeouts, 5xx, 429) are retried with exponential back-off
//! and jitter up to a bound, then returned so the caller's durable queue keeps the work; 4xx
//! answers carry the server's own message. Writes are split into requests that respect both the
//! server's `max_batch_size` and its 40 MiB request-body limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rayon::prelude::*;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// Chroma refuses request bodies above 40 MiB.
pub const SERVER_REQUEST_LIMIT: usize = 40 * 1024 * 1024;
/// What we allow ourselves per request: the server's limit less a margin.
pub const DEFAULT_REQUEST_BUDGET: usize = SERVER_REQUEST_LIMIT - 1024 * 1024;
/// How long to wait for a TCP connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The `{"ids":[],"embeddings":[],...}` around a batch's records, rounded up.
const ENVELOPE_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ChromaError {
    #[error(
        "Chroma URL {url:?} is not usable: {reason}. Fix: set chroma.url to http(s)://host:port"
    )]
    BadUrl { url: String, reason: String },
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("{what}: Chroma at {url} did not answer ({kind}): {source}. Check that the server runs and is reachable")]
    Unreachable {
        what: String,
        url: String,
        kind: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: Chroma answered {status}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: unexpected answer from Chroma: {message}")]
    BadResponse { what: String, message: String },
    #[error("collection `{name}` already exists with {found}, but this agent needs {expected}. Fix: choose other collection names (chroma.visual_collection, chroma.text_collection) or delete that collection")]
    CollectionMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("record {id} alone is {bytes} bytes of JSON, over the {limit}-byte request limit Chroma accepts")]
    RecordTooLarge {
        id: String,
        bytes: usize,
        limit: usize,
    },
}

impl ChromaError {
    /// Worth retrying later: the server was unreachable, too slow, overloaded or failing.
    pub fn is_transient(&self) -> bool {
        match self {
            ChromaError::Unreachable { .. } => true,
            ChromaError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            _ => false,
        }
    }

    /// The HTTP status Chroma answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ChromaError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A failed heartbeat in the few words `/health` and `status` show (they name the server
    /// themselves).
    pub fn heartbeat_reason(&self) -> String {
        match self {
            ChromaError::Status { status, .. } => match StatusCode::from_u16(*status) {
                Ok(code) => format!("heartbeat answered HTTP {code}"),
                Err(_) => format!("heartbeat answered HTTP {status}"),
            },
            ChromaError::Unreachable { source, .. } if source.is_timeout() => {
                "no answer to the heartbeat in time".to_string()
            }
            ChromaError::Unreachable { source, .. } if source.is_connect() => {
                "connection refused or unreachable".to_string()
            }
            ChromaError::Unreachable { source, .. } => format!("heartbeat failed: {source}"),
            other => other.to_string(),
        }
    }
}

/// Bounded retries: exponential back-off with jitter (half fixed, half random).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    pub fn no_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before retry number `retry` (0-based).
    fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

/// Talks to one tenant and database of one Chroma server. Cheap to clone.
#[derive(Clone)]
pub struct ChromaClient {
    http: reqwest::Client,
    /// The auth token's headers (sensitive: never printed), sent with every request.
    auth: HeaderMap,
    base: Url,
    tenant: String,
    database: String,
    retry: RetryPolicy,
    request_budget: usize,
    max_batch: Arc<tokio::sync::OnceCell<usize>>,
    write_requests: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
}

impl std::fmt::Debug for ChromaClient {
    // By hand: the auth token lives in the HTTP client's headers and must never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChromaClient")
            .field("base", &self.base.as_str())
            .field("tenant", &self.tenant)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl ChromaClient {
    pub fn new(url: &str, cfg: &crate::config::ChromaConfig) -> Result<ChromaClient, ChromaError> {
        let http = http_client(Duration::from_secs(cfg.timeout_s.max(1)), CONNECT_TIMEOUT)?;
        let mut client = ChromaClient::with_http(http, url, cfg.auth_token.as_deref())?;
        client.tenant = cfg.tenant.clone();
        client.database = cfg.database.clone();
        Ok(client)
    }

    /// A client over an HTTP client the caller keeps (see [`http_client`]), so that short-lived
    /// clients share its connections: the status API's heartbeat, say. Default tenant and
    /// database.
    pub fn with_http(
        http: reqwest::Client,
        url: &str,
        auth_token: Option<&str>,
    ) -> Result<ChromaClient, ChromaError> {
        let bad = |reason: &str| ChromaError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(url.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("only http:// and https:// are supported"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(bad("it has no host"));
        }
        // Path segments are appended to whatever prefix the URL has (a reverse proxy's path).
        if base.path() == "/" {
            base.set_path("");
        }
        let defaults = crate::config::ChromaConfig::default();
        Ok(ChromaClient {
            http,
            auth: auth_headers(auth_token)?,
            base,
            tenant: defaults.tenant,
            database: defaults.database,
            retry: RetryPolicy::default(),
            request_budget: DEFAULT_REQUEST_BUDGET,
            max_batch: Arc::new(tokio::sync::OnceCell::new()),
            write_requests: Arc::new(AtomicU64::new(0)),
            retries: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> ChromaClient {
        self.retry = retry;
        self
    }

    /// Replaces the per-request byte budget for writes (default: just under the server's 40 MiB).
    pub fn with_request_budget(mut self, bytes: usize) -> ChromaClient {
        self.request_budget = bytes.max(ENVELOPE_BYTES + 1);
        self
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Write requests (add, upsert, delete) sent so far by this client and its clones, retries
    /// included: how a caller sees that a big batch went out in several requests.
    pub fn write_requests(&self) -> u64 {
        self.write_requests.load(Ordering::Relaxed)
    }

    /// Requests retried after a transient failure so far (this client and its clones).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            // Cannot fail: `new` refused URLs that cannot be a base.
            let mut path = url.path_segments_mut().expect("base URL");
            path.pop_if_empty();
            path.push("api").push("v2");
            path.extend(segments);
        }
        url
    }

    fn db_url(&self, rest: &[&str]) -> Url {
        let mut segments = vec!["tenants", &self.tenant, "databases", &self.database];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// One request, retried while the failure is transient and attempts remain.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: Url,
        body: Option<Bytes>,
    ) -> Result<Bytes, ChromaError> {
        let mut retry = 0;
        loop {
            match self
                .send_once(what, method.clone(), url.clone(), body.clone())
                .await
            {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.is_transient() && retry + 1 < self.retry.max_attempts => {
                    let wait = self.retry.delay(retry);
                    tracing::warn!(
                        attempt = retry + 1,
                        wait_ms = wait.as_millis() as u64,
                        "{e}; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    retry += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_once(
        &self,
        what: &str,
        method: Method,
        url: Url,
        // `Bytes`: a retry sends the same buffer again without copying it (writes are ~30 MB).
        body: Option<Bytes>,
    ) -> Result<Bytes, ChromaError> {
        let unreachable = |source: reqwest::Error| ChromaError::Unreachable {
            what: what.to_string(),
            url: self.base.to_string(),
            kind: if source.is_timeout() {
                "timed out"
            } else if source.is_connect() {
                "cannot connect"
            } else {
                "connection failed"
            },
            source,
        };
        let sent = body.as_ref().map_or(0, Bytes::len);
        let mut req = self.http.request(method, url).headers(self.auth.clone());
        if let Some(body) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(body);
        }
        let started = std::time::Instant::now();
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        // Where a slow sync spends its time: one line per request at debug level.
        tracing::debug!(
            request = what,
            status = status.as_u16(),
            sent,
            received = bytes.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "Chroma answered"
        );
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ChromaError::Status {
            what: what.to_string(),
            status: status.as_u16(),
            message: server_message(status, &bytes),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        method: Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<T, ChromaError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON values serialize"));
        let bytes = self.send(what, method, url, body.map(Bytes::from)).await?;
        parse(what, &bytes)
    }

    /// `GET /api/v2/heartbeat`, under this client's retry policy: `Ok` when the server answers
    /// with a success. Every part of the agent that asks whether Chroma is up asks this.
    pub async fn heartbeat(&self) -> Result<(), ChromaError> {
        self.send("heartbeat", Method::GET, self.url(&["heartbeat"]), None)
            .await?;
        Ok(())
    }

    /// The server's API version string.
    pub async fn version(&self) -> Result<String, ChromaError> {
        self.call("version", Method::GET, self.url(&["version"]), None)
            .await
    }

    /// The most records the server takes in one write (`/api/v2/pre-flight-checks`); asked
    /// once per client.
    pub async fn max_batch_size(&self) -> Result<usize, ChromaError> {
        #[derive(Deserialize)]
        struct Checks {
            max_batch_size: usize,
        }
        self.max_batch
            .get_or_try_init(|| async {
                let checks: Checks = self
                    .call(
                        "pre-flight checks",
                        Method::GET,
                        self.url(&["pre-flight-checks"]),
                        None,
                    )
                    .await?;
                Ok::<_, ChromaError>(checks.max_batch_size.max(1))
            })
            .await
            .copied()
    }

    /// Creates the configured tenant and database when they do not exist yet.
    pub async fn ensure_tenant_and_database(&self) -> Result<(), ChromaError> {
        let tenant_what = format!("looking up tenant `{}`", self.tenant);
        match self
            .call::<Value>(
                &tenant_what,
                Method::GET,
                self.url(&["tenants", &self.tenant]),
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {
                let what = format!("creating tenant `{}`", self.tenant);
                self.create_ignoring_conflict(&what, self.url(&["tenants"]), &self.tenant)
                    .await?;
            }
            Err(e) => return Err(e),
        }
        let db_what = format!("looking up database `{}`", self.database);
        match self
            .call::<Value>(&db_what, Method::GET, self.db_url(&[]), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => {
                let what = format!("creating database `{}`", self.database);
                let url = self.url(&["tenants", &self.tenant, "databases"]);
                self.create_ignoring_conflict(&what, url, &self.database)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// Another agent may create the same thing at the same moment: 409 is success.
    async fn create_ignoring_conflict(
        &self,
        what: &str,
        url: Url,
        name: &str,
    ) -> Result<(), ChromaError> {
        match self
            .call::<Value>(what, Method::POST, url, Some(&json!({ "name": name })))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens or creates a collection with the default options (cosine space, every string
    /// indexed, any dimension).
    pub async fn get_or_create_collection(&self, name: &str) -> Result<Collection, ChromaError> {
        self.get_or_create_collection_with(name, &CollectionOptions::default())
            .await
    }

    pub async fn get_or_create_collection_with(
        &self,
        name: &str,
        options: &CollectionOptions,
    ) -> Result<Collection, ChromaError> {
        let mut keys = Map::new();
        for key in &options.unindexed_string_keys {
            keys.insert(
                key.clone(),
                json!({ "string": { "string_inverted_index": { "enabled": false, "config": {} } } }),
            );
        }
        keys.insert(
            "#embedding".into(),
            json!({ "float_list": { "vector_index": { "enabled": true, "config": { "space": options.space.as_str() } } } }),
        );
        // The space goes in the schema: the server refuses `configuration` and `schema` together.
        let body = json!({
            "name": name,
            "get_or_create": true,
            "schema": { "defaults": {}, "keys": keys },
        });
        let info = self
            .post_collection(&format!("opening collection `{name}`"), &body)
            .await?;
        let space = info.space();
        if space != options.space.as_str() {
            return Err(ChromaError::CollectionMismatch {
                name: name.to_string(),
                expected: format!("{} space", options.space.as_str()),
                found: format!("{space} space"),
            });
        }
        if let (Some(want), Some(found)) = (options.dimension, info.dimension) {
            if want != found {
                return Err(ChromaError::CollectionMismatch {
                    name: name.to_string(),
                    expected: format!("embeddings of dimension {want}"),
                    found: format!("embeddings of dimension {found}"),
                });
            }
        }
        let collection = self.handle(info).await?;
        for key in &options.unindexed_string_keys {
            if !collection.unindexed_string_keys.contains(key) {
                tracing::info!(collection = name, key, "this existing collection indexes `{key}`; it works, but takes about twice the disk space");
            }
        }
        Ok(collection)
    }

    /// `POST .../collections` (create, or get-or-create, as the body says).
    async fn post_collection(
        &self,
        what: &str,
        body: &Value,
    ) -> Result<CollectionInfo, ChromaError> {
        self.call(
            what,
            Method::POST,
            self.db_url(&["collections"]),
            Some(body),
        )
        .await
    }

    /// A handle on a collection the server described.
    async fn handle(&self, info: CollectionInfo) -> Result<Collection, ChromaError> {
        Ok(Collection {
            max_batch: self.max_batch_size().await?,
            client: self.clone(),
            unindexed_string_keys: info.unindexed_string_keys(),
            id: info.id,
            name: info.name,
            dimension: info.dimension,
        })
    }

    /// Opens an existing collection without creating it: `None` when there is none by that name
    /// (readers such as `search` must not create collections).
    pub async fn get_collection(&self, name: &str) -> Result<Option<Collection>, ChromaError> {
        let what = format!("opening collection `{name}`");
        let bytes = match self
            .send(
                &what,
                Method::GET,
                self.db_url(&["collections", name]),
                None,
            )
            .await
        {
            Ok(bytes) => bytes,
            Err(e) if e.status() == Some(404) => return Ok(None),
            Err(e) => return Err(e),
        };
        let info: CollectionInfo = parse(&what, &bytes)?;
        Ok(Some(self.handle(info).await?))
    }

    /// The collection's `schema` as the server reports it (index settings, HNSW parameters):
    /// what a copy of the collection must be created with.
    pub async fn collection_schema(&self, collection: &Collection) -> Result<Value, ChromaError> {
        let what = format!("reading the settings of collection `{}`", collection.name);
        let info: CollectionInfo = self
            .call(
                &what,
                Method::GET,
                self.db_url(&["collections", &collection.name]),
                None,
            )
            .await?;
        Ok(info.schema)
    }

    /// Creates a collection with a given `schema` (for instance another collection's, read with
    /// [`collection_schema`](Self::collection_schema)); fails if the name is taken.
    pub async fn create_collection_with_schema(
        &self,
        name: &str,
        schema: &Value,
    ) -> Result<Collection, ChromaError> {
        let body = json!({ "name": name, "get_or_create": false, "schema": schema });
        let info = self
            .post_collection(&format!("creating collection `{name}`"), &body)
            .await?;
        self.handle(info).await
    }

    /// Renames a collection (its id and records stay).
    pub async fn rename_collection(
        &self,
        collection: &Collection,
        new_name: &str,
    ) -> Result<(), ChromaError> {
        let what = format!("renaming collection `{}` to `{new_name}`", collection.name);
        let _: Value = self
            .call(
                &what,
                Method::PUT,
                self.db_url(&["collections", &collection.id]),
                Some(&json!({ "new_name": new_name })),
            )
            .await?;
        Ok(())
    }

    /// Deletes a collection and all its records. 404 (already gone) is success.
    pub async fn delete_collection(&self, name: &str) -> Result<(), ChromaError> {
        let what = format!("deleting collection `{name}`");
        match self
            .send(
                &what,
                Method::DELETE,
                self.db_url(&["collections", name]),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// How a collection is created when it does not exist yet, and what an existing one must be.
#[derive(Debug, Clone, Default)]
pub struct CollectionOptions {
    /// The distance space; an existing collection with another is refused.
    pub space: Space,
    /// String metadata keys kept out of Chroma's string inverted index.
    pub unindexed_string_keys: Vec<String>,
    /// When set, an existing collection with another embedding dimension is refused.
    pub dimension: Option<usize>,
}

/// A collection's distance space. Cosine unless asked otherwise (Chroma's own default is l2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Space {
    #[default]
    Cosine,
    L2,
    Ip,
}

impl Space {
    pub fn as_str(self) -> &'static str {
        match self {
            Space::Cosine => "cosine",
            Space::L2 => "l2",
            Space::Ip => "ip",
        }
    }
}

#[derive(Deserialize)]
struct CollectionInfo {
    id: String,
    name: String,
    #[serde(default)]
    dimension: Option<usize>,
    #[serde(default)]
    configuration_json: Value,
    #[serde(default)]
    schema: Value,
}

impl CollectionInfo {
    /// The distance space; Chroma's default is l2 when nothing says otherwise.
    fn space(&self) -> String {
        let config = &self.configuration_json;
        let from_schema =
            &self.schema["keys"]["#embedding"]["float_list"]["vector_index"]["config"]["space"];
        [
            &config["hnsw"]["space"],
            &config["spann"]["space"],
            from_schema,
        ]
        .into_iter()
        .find_map(|v| v.as_str())
        .unwrap_or("l2")
        .to_string()
    }

    fn unindexed_string_keys(&self) -> Vec<String> {
        let Some(keys) = self.schema["keys"].as_object() else {
            return Vec::new();
        };
        keys.iter()
            .filter(|(_, v)| v["string"]["string_inverted_index"]["enabled"] == Value::Bool(false))
            .map(|(k, _)| k.clone())
            .filter(|k| !k.starts_with('#'))
            .collect()
    }
}

/// One record to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub embedding: Vec<f32>,
    pub document: Option<String>,
    pub metadata: Map<String, Value>,
}

/// Fields a read may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Include {
    Embeddings,
    Documents,
    Metadatas,
    Distances,
}

/// Records by ids or by a `where` filter; `include` picks the fields (ids always come back).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GetRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    #[serde(rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    pub include: Vec<Include>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

impl GetRequest {
    /// The records with these ids.
    pub fn by_ids(ids: &[String], include: &[Include]) -> GetRequest {
        GetRequest {
            ids: Some(ids.to_vec()),
            include: include.to_vec(),
            ..GetRequest::default()
        }
    }
}

/// Parallel arrays, one entry per record; fields not asked for are `None`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GetResult {
    pub ids: Vec<String>,
    #[serde(default)]
    pub embeddings: Option<Vec<Vec<f32>>>,
    #[serde(default)]
    pub documents: Option<Vec<Option<String>>>,
    #[serde(default)]
    pub metadatas: Option<Vec<Option<Map<String, Value>>>>,
}

impl GetResult {
    /// The answer's parallel arrays as one value per record.
    pub fn into_records(self) -> Vec<GetRecord> {
        let mut embeddings = self.embeddings.unwrap_or_default().into_iter();
        let mut documents = self.documents.unwrap_or_default().into_iter();
        let mut metadatas = self.metadatas.unwrap_or_default().into_iter();
        self.ids
            .into_iter()
            .map(|id| GetRecord {
                id,
                embedding: embeddings.next(),
                document: documents.next().flatten(),
                metadata: metadatas.next().flatten(),
            })
            .collect()
    }
}

/// One record of a `get` answer; the fields not asked for (or absent) are `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct GetRecord {
    pub id: String,
    pub embedding: Option<Vec<f32>>,
    pub document: Option<String>,
    pub metadata: Option<Metadata>,
}

/// An unparsed `get` answer (see `Collection::get_ids_raw`).
#[derive(Debug, Clone)]
pub struct RawGet {
    what: String,
    body: Bytes,
}

impl RawGet {
    pub fn parse(&self) -> Result<RawGetResult<'_>, ChromaError> {
        self.parse_as()
    }

    fn parse_as<'a, T: Deserialize<'a>>(&'a self) -> Result<T, ChromaError> {
        parse(&self.what, &self.body)
    }
}

/// `GetResult` with each metadata value as the JSON text the server sent.
#[derive(Debug, Deserialize)]
pub struct RawGetResult<'a> {
    pub ids: Vec<String>,
    #[serde(default)]
    pub documents: Option<Vec<Option<String>>>,
    #[serde(default, borrow)]
    pub metadatas: Option<Vec<Option<RawMetadata<'a>>>>,
}

/// One record's metadata.
pub type Metadata = Map<String, Value>;

/// One record's metadata, each value the JSON text the server sent.
pub type RawMetadata<'a> = BTreeMap<String, &'a RawValue>;

/// One list per query embedding, nearest first.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueryResult {
    pub ids: Vec<Vec<String>>,
    #[serde(default)]
    pub distances: Option<Vec<Vec<Option<f32>>>>,
    #[serde(default)]
    pub documents: Option<Vec<Vec<Option<String>>>>,
    #[serde(default)]
    pub metadatas: Option<Vec<Vec<Option<Metadata>>>>,
    #[serde(default)]
    pub embeddings: Option<Vec<Vec<Option<Vec<f32>>>>>,
}

/// A handle on one collection.
#[derive(Debug, Clone)]
pub struct Collection {
    client: ChromaClient,
    pub id: String,
    pub name: String,
    /// The embedding size the collection holds, once it holds any.
    pub dimension: Option<usize>,
    /// String metadata keys the server does not index in this collection.
    pub unindexed_string_keys: Vec<String>,
    max_batch: usize,
}

/// A record already turned into JSON pieces, so batches are sized without serialising twice.
struct EncodedRecord {
    id: Vec<u8>,
    embedding: Vec<u8>,
    document: Vec<u8>,
    metadata: Vec<u8>,
}

impl EncodedRecord {
    fn new(r: &Record) -> EncodedRecord {
        EncodedRecord {
            id: to_json(&r.id),
            embedding: to_json(&r.embedding),
            document: to_json(&r.document),
            metadata: to_json(&r.metadata),
        }
    }

    /// Bytes in a request, with the three commas that separate it from its neighbours.
    fn size(&self) -> usize {
        self.id.len() + self.embedding.len() + self.document.len() + self.metadata.len() + 4
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Strings, finite floats and JSON maps always serialise.
    serde_json::to_vec(value).expect("record fields serialize")
}

fn batch_body(records: &[EncodedRecord]) -> Vec<u8> {
    let size: usize = records.iter().map(EncodedRecord::size).sum::<usize>() + ENVELOPE_BYTES;
    let mut out = Vec::with_capacity(size);
    let field = |out: &mut Vec<u8>, name: &str, pick: fn(&EncodedRecord) -> &[u8], last: bool| {
        out.extend_from_slice(b"\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":[");
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(pick(r));
        }
        out.extend_from_slice(if last { b"]" } else { b"]," });
    };
    out.push(b'{');
    field(&mut out, "ids", |r| &r.id, false);
    field(&mut out, "embeddings", |r| &r.embedding, false);
    field(&mut out, "documents", |r| &r.document, false);
    field(&mut out, "metadatas", |r| &r.metadata, true);
    out.push(b'}');
    out
}

impl Collection {
    pub fn client(&self) -> &ChromaClient {
        &self.client
    }

    /// The most records one write request carries (the server's `max_batch_size`).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn url(&self, op: &str) -> Url {
        self.client.db_url(&["collections", &self.id, op])
    }

    /// Adds records; ids that already exist are left as they are (Chroma ignores them).
    /// Returns the number of requests sent.
    pub async fn add(&self, records: &[Record]) -> Result<usize, ChromaError> {
        self.write("add", records).await
    }

    /// Inserts or replaces records (metadata is merged: send `null` for keys to drop).
    /// Returns the number of requests sent.
    pub async fn upsert(&self, records: &[Record]) -> Result<usize, ChromaError> {
        self.write("upsert", records).await
    }

    async fn write(&self, op: &str, records: &[Record]) -> Result<usize, ChromaError> {
        let budget = self.client.request_budget;
        let mut batch: Vec<EncodedRecord> = Vec::new();
        let mut batch_bytes = ENVELOPE_BYTES;
        let mut requests = 0;
        // Serialising ~0.35 MB strings is CPU work: spread it over the cores.
        let encoded: Vec<EncodedRecord> = records.par_iter().map(EncodedRecord::new).collect();
        for (record, enc) in records.iter().zip(encoded) {
            let size = enc.size();
            if size + ENVELOPE_BYTES > budget {
                return Err(ChromaError::RecordTooLarge {
                    id: record.id.clone(),
                    bytes: size,
                    limit: budget,
                });
            }
            if !batch.is_empty() && (batch_bytes + size > budget || batch.len() >= self.max_batch) {
                self.send_batch(op, &batch).await?;
                requests += 1;
                batch.clear();
                batch_bytes = ENVELOPE_BYTES;
            }
            batch_bytes += size;
            batch.push(enc);
        }
        if !batch.is_empty() {
            self.send_batch(op, &batch).await?;
            requests += 1;
        }
        Ok(requests)
    }

    async fn send_batch(&self, op: &str, batch: &[EncodedRecord]) -> Result<(), ChromaError> {
        let body = batch_body(batch);
        let what = format!("{op} of {} records into `{}`", batch.len(), self.name);
        self.client.write_requests.fetch_add(1, Ordering::Relaxed);
        self.client
            .send(&what, Method::POST, self.url(op), Some(Bytes::from(body)))
            .await?;
        Ok(())
    }

    /// One read request: by ids or `where`, with the fields in `include`. Large reads should be
    /// sliced by the caller (a page record in f32 is ~0.7 MB of JSON).
    pub async fn get(&self, request: &GetRequest) -> Result<GetResult, ChromaError> {
        self.get_raw(request).await?.parse_as()
    }

    /// `get` with the answer left unparsed: `RawGet::parse` then borrows the metadata values
    /// from it (stage 2 of a search reads ~0.7 MB blobs it should not copy).
    pub async fn get_raw(&self, request: &GetRequest) -> Result<RawGet, ChromaError> {
        let body = serde_json::to_vec(request).expect("GetRequest serializes");
        let what = format!("reading records from `{}`", self.name);
        let body = self
            .client
            .send(
                &what,
                Method::POST,
                self.url("get"),
                Some(Bytes::from(body)),
            )
            .await?;
        Ok(RawGet { what, body })
    }

    pub async fn get_ids(
        &self,
        ids: &[String],
        include: &[Include],
    ) -> Result<GetResult, ChromaError> {
        self.get(&GetRequest::by_ids(ids, include)).await
    }

    /// `get_ids`, unparsed (see `get_raw`).
    pub async fn get_ids_raw(
        &self,
        ids: &[String],
        include: &[Include],
    ) -> Result<RawGet, ChromaError> {
        self.get_raw(&GetRequest::by_ids(ids, include)).await
    }

    pub async fn get_where(
        &self,
        filter: Value,
        include: &[Include],
    ) -> Result<GetResult, ChromaError> {
        self.get(&GetRequest {
            filter: Some(filter),
            include: include.to_vec(),
            ..GetRequest::default()
        })
        .await
    }

    /// Deletes records by id, in requests of at most `max_batch_size` ids.
    pub async fn delete_ids(&self, ids: &[String]) -> Result<(), ChromaError> {
        for slice in ids.chunks(self.max_batch) {
            self.delete(&json!({ "ids": slice })).await?;
        }
        Ok(())
    }

    /// Deletes every record matching a `where` filter.
    pub async fn delete_where(&self, filter: Value) -> Result<(), ChromaError> {
        self.delete(&json!({ "where": filter })).await
    }

    async fn delete(&self, body: &Value) -> Result<(), ChromaError> {
        let what = format!("deleting records from `{}`", self.name);
        self.client.write_requests.fetch_add(1, Ordering::Relaxed);
        let _: Value = self
            .client
            .call(&what, Method::POST, self.url("delete"), Some(body))
            .await?;
        Ok(())
    }

    /// Records in the collection.
    pub async fn count(&self) -> Result<usize, ChromaError> {
        let what = format!("counting records in `{}`", self.name);
        self.client
            .call(&what, Method::GET, self.url("count"), None)
            .await
    }

    /// Nearest neighbours of each embedding, optionally within a `where` filter.
    pub async fn query(
        &self,
        embeddings: &[Vec<f32>],
        n_results: usize,
        filter: Option<Value>,
        include: &[Include],
    ) -> Result<QueryResult, ChromaError> {
        let mut body = json!({
            "query_embeddings": embeddings,
            "n_results": n_results,
            "include": include,
        });
        if let Some(f) = filter {
            body["where"] = f;
        }
        let what = format!("querying `{}`", self.name);
        self.client
            .call(&what, Method::POST, self.url("query"), Some(&body))
            .await
    }
}

/// The HTTP client a [`ChromaClient`] sends through: `timeout` for each whole request,
/// `connect_timeout` for the TCP connection.
pub fn http_client(
    timeout: Duration,
    connect_timeout: Duration,
) -> Result<reqwest::Client, ChromaError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        .build()
        .map_err(|e| ChromaError::Client(e.to_string()))
}

/// The token in both headers Chroma's auth providers read: `Authorization: Bearer` and
/// `X-Chroma-Token`.
fn auth_headers(token: Option<&str>) -> Result<HeaderMap, ChromaError> {
    let mut headers = HeaderMap::new();
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Ok(headers);
    };
    let value = |text: &str| {
        let mut v = HeaderValue::from_str(text).map_err(|_| {
            ChromaError::Client(
                "chroma.auth_token holds characters not allowed in an HTTP header".into(),
            )
        })?;
        v.set_sensitive(true);
        Ok::<_, ChromaError>(v)
    };
    headers.insert(AUTHORIZATION, value(&format!("Bearer {token}"))?);
    headers.insert("x-chroma-token", value(token)?);
    Ok(headers)
}

/// One heartbeat to the server at `url`, without retries, `timeout` for all of it: whether
/// Chroma is up, for a status line.
pub async fn probe(
    url: &str,
    auth_token: Option<&str>,
    timeout: Duration,
) -> Result<(), ChromaError> {
    ChromaClient::with_http(http_client(timeout, timeout)?, url, auth_token)?
        .with_retry(RetryPolicy::no_retry())
        .heartbeat()
        .await
}

/// [`probe`] for code that may or may not run inside an async runtime (the managed server's
/// supervisor thread, the commands): it runs on a thread and runtime of its own, and blocks
/// the caller until the answer or the timeout.
pub fn probe_blocking(
    url: &str,
    auth_token: Option<&str>,
    timeout: Duration,
) -> Result<(), ChromaError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| ChromaError::Client(format!("no runtime for the heartbeat: {e}")))?
                    .block_on(probe(url, auth_token, timeout))
            })
            .join()
            .unwrap_or_else(|_| Err(ChromaError::Client("the heartbeat thread panicked".into())))
    })
}

fn parse<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, ChromaError> {
    serde_json::from_slice(bytes).map_err(|e| ChromaError::BadResponse {
        what: what.to_string(),
        message: format!("{e} in {}", snippet(bytes)),
    })
}

/// The server's own words: `{"error": ..., "message": ...}` when it sent JSON, else its text.
fn server_message(status: StatusCode, bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        error: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) if !b.message.is_empty() => {
            if b.error.is_empty() {
                b.message
            } else {
                format!("{}: {}", b.error, b.message)
            }
        }
        _ if bytes.is_empty() => status
            .canonical_reason()
            .unwrap_or("no message")
            .to_string(),
        _ => snippet(bytes),
    }
}

fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]);
    text.trim().to_string()
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_and_overload_are_transient_refusals_are_not() {
        let status = |status| ChromaError::Status {
            what: "x".into(),
            status,
            message: "m".into(),
        };
        for s in [500, 502, 503, 504, 429, 408] {
            assert!(status(s).is_transient(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!status(s).is_transient(), "{s}");
        }
    }

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for retry in 0..10 {
            let exp = (100u64 << retry).min(1000);
            let d = p.delay(retry).as_millis() as u64;
            assert!(
                d >= exp / 2 && d <= exp,
                "retry {retry}: {d} ms not in [{}, {exp}]",
                exp / 2
            );
        }
    }

    #[test]
    fn batch_body_is_the_json_serde_would_write() {
        let records = [
            Record {
                id: "a".into(),
                embedding: vec![0.5, -1.0],
                document: Some("x \"quoted\"".into()),
                metadata: json!({"k": 1, "s": "v"}).as_object().unwrap().clone(),
            },
            Record {
                id: "b".into(),
                embedding: vec![0.25, 2.0],
                document: None,
                metadata: Map::new(),
            },
        ];
        let enc: Vec<_> = records.iter().map(EncodedRecord::new).collect();
        let body = batch_body(&enc);
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            json!({
                "ids": ["a", "b"],
                "embeddings": [[0.5, -1.0], [0.25, 2.0]],
                "documents": ["x \"quoted\"", null],
                "metadatas": [{"k": 1, "s": "v"}, {}],
            })
        );
        let sized: usize = enc.iter().map(EncodedRecord::size).sum::<usize>() + ENVELOPE_BYTES;
        assert!(body.len() <= sized, "{} > {sized}", body.len());
    }

    #[test]
    fn urls_keep_a_proxy_prefix_and_escape_names() {
        let mut cfg = crate::config::ChromaConfig::default();
        cfg.tenant = "my tenant".into();
        let c = ChromaClient::new("https://example.org/chroma/", &cfg).unwrap();
        assert_eq!(
            c.db_url(&["collections"]).as_str(),
            "https://example.org/chroma/api/v2/tenants/my%20tenant/databases/default_database/collections"
        );
        let c = ChromaClient::new("http://127.0.0.1:8000", &cfg).unwrap();
        assert_eq!(
            c.url(&["heartbeat"]).as_str(),
            "http://127.0.0.1:8000/api/v2/heartbeat"
        );
        assert!(ChromaClient::new("ftp://x", &cfg).is_err());
        assert!(ChromaClient::new("not a url", &cfg).is_err());
    }

    #[test]
    fn the_token_is_never_printed() {
        let mut cfg = crate::config::ChromaConfig::default();
        cfg.auth_token = Some("s3cret-token".into());
        let c = ChromaClient::new("http://127.0.0.1:1", &cfg).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
