//! The read path: two-stage search (Chroma on the mean vector, then exact MaxSim) and `repair`.
//!
//! `engine` runs a search on a query multi-vector; `maxsim` is its stage-2 kernel; `repair`
//! finds records the server no longer returns and rebuilds a collection from its own records.

pub mod engine;
pub mod maxsim;
pub mod repair;

use std::process::ExitCode;

use anyhow::Context as _;

use crate::chroma::client::ChromaClient;
use crate::chroma::managed::ManagedChroma;
use crate::cli::{Context, RepairArgs, SearchArgs, SearchMode};
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn search_command(ctx: &Context, args: SearchArgs) -> anyhow::Result<ExitCode> {
    // Chroma first: a server that is down or empty is reported before the model loads.
    let conn = connect_for_reading(&ctx.config)?;
    let rt = runtime()?;
    let searcher = rt.block_on(Searcher::open(&conn.client, &ctx.config.chroma))?;

    let t = std::time::Instant::now();
    let embedder = crate::embed::Embedder::load(&ctx.config.model)?;
    let load_time = t.elapsed();
    let t = std::time::Instant::now();
    let query = embedder
        .embed_queries(&[args.query.as_str()])?
        .into_iter()
        .next()
        .context("the model returned no vectors for the query")?;
    let embed_time = t.elapsed();

    let opts = SearchOptions {
        limit: args.limit,
        candidates: args.candidates.max(args.limit),
        scope: match args.mode {
            SearchMode::Hybrid => Scope::Hybrid,
            SearchMode::Visual => Scope::Visual,
            SearchMode::Text => Scope::Text,
        },
        ..SearchOptions::default()
    };
    let results = rt.block_on(searcher.search(&query, &opts))?;

    if args.json {
        let out = serde_json::json!({
            "query": args.query,
            "mode": opts.scope,
            "chroma": conn.url,
            "model_load_ms": load_time.as_secs_f64() * 1e3,
            "query_embedding_ms": embed_time.as_secs_f64() * 1e3,
            "results": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_results(&results);
    }
    if args.verbose {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let t = &results.times;
        eprintln!(
            "model load {:.0} ms, query embedding {:.1} ms; stage 1 (Chroma, {} + {} candidates) {:.1} ms; stage 2 (fetch + decode + MaxSim) {:.1} ms [fetch {:.1} ms, decode+score {:.1} ms summed over slices]; search total {:.1} ms",
            ms(load_time),
            ms(embed_time),
            results.candidates_visual,
            results.candidates_text,
            ms(t.stage1),
            ms(t.stage2),
            ms(t.fetch_sum),
            ms(t.score_sum),
            ms(t.total),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_results(results: &SearchResults) {
    if results.hits.is_empty() {
        println!("no results");
    }
    for h in &results.hits {
        let place = match (h.kind, h.page, h.chunk_id) {
            (RecordKind::Text, Some(p), Some(c)) => format!("page {p}, chunk {c}"),
            (_, Some(p), _) => format!("page {p}"),
            _ => String::new(),
        };
        println!(
            "{:>3}. {:>8.3}  {}  {}  [{}]",
            h.rank,
            h.score,
            h.filename.as_deref().unwrap_or(&h.id),
            place,
            h.kind.as_str()
        );
        if !h.snippet.is_empty() {
            println!("     {}", h.snippet);
        }
    }
    if !results.skipped.is_empty() {
        eprintln!(
            "warning: {} candidate record(s) could not be scored (first: {}: {}); `docusearch-agent repair` or re-indexing those files fixes them",
            results.skipped.len(),
            results.skipped[0].id,
            results.skipped[0].reason
        );
    }
}

pub fn repair_command(ctx: &Context, args: RepairArgs) -> anyhow::Result<ExitCode> {
    repair::repair_command(ctx, args)
}
