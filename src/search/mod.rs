//! The read path: two-stage search (Chroma on the mean vector, then exact MaxSim) and repair.
//!
//! `engine` runs a search on a query multi-vector; `maxsim` is its stage-2 kernel; `repair`
//! finds records the server no longer returns and rebuilds a collection from its own records.

pub mod engine;
pub mod maxsim;
pub mod repair;

use anyhow::Context as _;

use crate::chroma::client::ChromaClient;
use crate::chroma::managed::ManagedChroma;
use crate::config::{ChromaTarget, Config};

pub use engine::{
    RecordKind, Scope, SearchError, SearchHit, SearchOptions, SearchResults, Searcher,
};
pub use repair::{recall_check, RecallReport};

/// The Chroma server a reader talks to, and the server it had to start, if any (stopped on
/// drop).
pub struct ReadConnection {
    pub client: ChromaClient,
    pub url: String,
    _started: Option<ManagedChroma>,
}

/// Finds the Chroma server for a command that reads (or repairs) the index: the configured
/// remote one; with the managed default, the running agent's server, or else one started on
/// the agent's data directory for the length of the command.
pub fn connect_for_reading(config: &Config) -> anyhow::Result<ReadConnection> {
    let (url, started) = match config.chroma_target() {
        ChromaTarget::Remote { url } => (url, None),
        ChromaTarget::Managed => {
            let dir = config.managed_chroma_dir();
            match crate::chroma::managed::running_server(&dir) {
                Some(url) => (url, None),
                None => {
                    if !dir.exists() {
                        anyhow::bail!(
                            "nothing is indexed yet: the agent's Chroma data directory {} does not exist. Fix: run the agent (`docusearch-agent run`) or `docusearch-agent index PATH` first, or set chroma.url",
                            dir.display()
                        );
                    }
                    let command =
                        crate::runtime_paths::find_chroma(config.chroma.command.as_deref())?;
                    // No agent runs (it would have left its server's port): start the server
                    // on the same data for this command only.
                    let server = ManagedChroma::start(&command, &dir).with_context(|| {
                        format!("starting a Chroma server on {}", dir.display())
                    })?;
                    (server.url(), Some(server))
                }
            }
        }
    };
    let client = ChromaClient::new(&url, &config.chroma)?;
    Ok(ReadConnection {
        client,
        url,
        _started: started,
    })
}

/// What `search --json` prints and `GET /api/search` answers: one type, so both say exactly
/// the same. Fields in the order the command always printed them (alphabetical).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchReport {
    /// The Chroma server searched.
    pub chroma: String,
    pub mode: Scope,
    /// Time spent loading the model for this query (0 when it was already loaded).
    pub model_load_ms: f64,
    pub query: String,
    pub query_embedding_ms: f64,
    pub results: SearchResults,
}

/// Embeds `query` with `embedder` and runs the two-stage search: the one path from a query's
/// text to its [`SearchReport`] (`model_load` is what the caller spent loading the model).
pub async fn search_text(
    embedder: &crate::embed::Embedder,
    searcher: &Searcher,
    chroma_url: &str,
    query: &str,
    opts: &SearchOptions,
    model_load: std::time::Duration,
) -> anyhow::Result<SearchReport> {
    let t = std::time::Instant::now();
    let vectors = embedder
        .embed_queries(&[query])?
        .into_iter()
        .next()
        .context("the model returned no vectors for the query")?;
    let embed_time = t.elapsed();
    let results = searcher.search(&vectors, opts).await?;
    Ok(SearchReport {
        chroma: chroma_url.to_string(),
        mode: opts.scope,
        model_load_ms: model_load.as_secs_f64() * 1e3,
        query: query.to_string(),
        query_embedding_ms: embed_time.as_secs_f64() * 1e3,
        results,
    })
}
