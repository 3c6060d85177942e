//! `search` and `repair`.

use std::process::ExitCode;
use std::time::Duration;

use docusearch_agent::agent::status::{open_or_held, StoreAccess};
use docusearch_agent::search::repair::{
    reconcile_with_store, repair_collection, OrphanReason, StoreReconcile,
};
use docusearch_agent::search::{
    connect_for_reading, search_text, RecordKind, Scope, SearchOptions, SearchResults, Searcher,
};

use super::{runtime, Context, RepairArgs, SearchArgs, SearchMode};

pub fn search_command(ctx: &Context, args: SearchArgs) -> anyhow::Result<ExitCode> {
    // Chroma first: a server that is down or empty is reported before the model loads.
    let conn = connect_for_reading(&ctx.config)?;
    let rt = runtime()?;
    let searcher = rt.block_on(Searcher::open(&conn.client, &ctx.config.chroma))?;

    let t = std::time::Instant::now();
    let embedder = docusearch_agent::embed::Embedder::load(&ctx.config.model)?;
    let load_time = t.elapsed();
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
    let report = rt.block_on(search_text(
        &embedder,
        &searcher,
        &conn.url,
        &args.query,
        &opts,
        load_time,
    ))?;
    let results = &report.results;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_results(results);
    }
    if args.verbose {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let t = &results.times;
        eprintln!(
            "model load {:.0} ms, query embedding {:.1} ms; stage 1 (Chroma, {} + {} candidates) {:.1} ms; stage 2 (fetch + decode + MaxSim) {:.1} ms [fetch {:.1} ms, decode+score {:.1} ms summed over slices]; search total {:.1} ms",
            ms(load_time),
            report.query_embedding_ms,
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

/// Prints what step (3) found and did (`by_agent`: the running agent did it, so its queued jobs
/// run now).
fn print_reconcile(r: &StoreReconcile, by_agent: bool) {
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "reconcile with the state store (agent id `{}`): {} records in Chroma, {} files in the store",
        r.agent_id, r.records, r.files
    );
    for o in &r.orphans {
        let why = match o.reason {
            OrphanReason::NotInStore => "no file in the state store",
            OrphanReason::FileGone => "its file is gone from disk",
        };
        println!(
            "  orphan: {} ({} page + {} text records): {why}; {}deleted",
            o.source_path.as_deref().unwrap_or(&o.doc_id),
            o.page_records,
            o.text_records,
            would
        );
    }
    for p in &r.gone_files {
        println!(
            "  gone: {} is no longer on disk; {}forgotten by the state store",
            p.display(),
            would
        );
    }
    if !r.unavailable.is_empty() {
        println!(
            "  kept: {} file(s) under a watched folder that is missing (an unmounted disk?) were not checked, their records stay",
            r.unavailable.len()
        );
    }
    for m in &r.missing {
        println!(
            "  missing: {} has {} of {} page and {} of {} text records missing in Chroma; {}queued to be indexed again",
            m.path.display(),
            m.pages_missing,
            m.pages_expected,
            m.chunks_missing,
            m.chunks_expected,
            would
        );
    }
    for (p, reason) in &r.failed_jobs {
        println!("  failed job: {}: {reason}; {}retried", p.display(), would);
    }
    println!(
        "reconcile: {} orphan documents, {} files with missing records, {} failed jobs{}",
        r.orphans.len(),
        r.missing.len(),
        r.failed_jobs.len(),
        if r.dry_run {
            " (dry run: nothing changed)"
        } else if r.missing.is_empty() && r.failed_jobs.is_empty() || by_agent {
            ""
        } else {
            " (the queued jobs run when the agent next starts)"
        }
    );
    if !r.busy.is_empty() {
        println!(
            "  {} file(s) with a job queued or running were left to the agent's pipeline",
            r.busy.len()
        );
    }
}

pub fn repair_command(ctx: &Context, args: RepairArgs) -> anyhow::Result<ExitCode> {
    let conn = connect_for_reading(&ctx.config)?;
    let rt = runtime()?;
    let chroma = &ctx.config.chroma;
    let cfg = &ctx.config;
    let mut problems = false;
    // The state store, opened first and held to the end: step (3) needs it, and while it is
    // held no agent can start and write into a collection being rebuilt. If the running agent
    // holds it, the rebuild waits for it to stop (its writes would go to the replaced
    // collection and be lost) and step (3) is the agent's.
    let store_dir = cfg.store_dir();
    let store = if store_dir.exists() {
        match open_or_held(cfg, &store_dir)? {
            StoreAccess::Store(store) => Some(Ok(store)),
            StoreAccess::HeldByAgent { label } => Some(Err(label)),
        }
    } else {
        None
    };
    let agent_running = matches!(store, Some(Err(_)));
    println!(
        "Chroma at {}{}",
        conn.url,
        if args.dry_run {
            " (dry run: nothing will be changed)"
        } else {
            ""
        }
    );
    for name in [&chroma.visual_collection, &chroma.text_collection] {
        let result = rt.block_on(repair_collection(
            &conn.client,
            name,
            args.dry_run || agent_running,
        ))?;
        let Some(r) = result else {
            println!("{name}: no such collection, nothing to check");
            continue;
        };
        println!(
            "{name}: recall check: {} of {} records returned by a query with their own embedding",
            r.before.checked - r.before.unreachable.len(),
            r.before.checked
        );
        if !r.before.is_complete() {
            let shown: Vec<_> = r.before.unreachable.iter().take(10).cloned().collect();
            println!(
                "{name}: {} unreachable (chroma-core/chroma#7758): {}{}",
                r.before.unreachable.len(),
                shown.join(", "),
                if r.before.unreachable.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            );
        }
        match (&r.rebuilt, &r.after) {
            (Some(b), Some(after)) => {
                println!(
                    "{name}: rebuilt from its own {} records (new collection id {}); recall now {} of {}",
                    b.records,
                    b.new_id,
                    after.checked - after.unreachable.len(),
                    after.checked
                );
                problems |= !after.is_complete();
            }
            _ if !r.before.is_complete() && agent_running && !args.dry_run => {
                println!(
                    "{name}: not rebuilt: the agent is running and writes into this collection; a rebuild now could lose its writes. Fix: stop the agent, run `docusearch-agent repair`, start the agent again"
                );
                problems = true;
            }
            _ if !r.before.is_complete() => {
                println!(
                    "{name}: would rebuild the collection from its own records (no re-embedding)"
                );
                problems = true;
            }
            _ => {}
        }
    }
    // Step (3): with the store held here, or by the running agent.
    match store {
        None => println!(
            "reconcile with the state store: skipped, there is no state store at {} (agent `{}` has indexed nothing on this machine, or its state was deleted to be rebuilt): without it every record of this agent id would look orphaned",
            store_dir.display(),
            cfg.agent_id
        ),
        Some(Ok(store)) => {
            let r = rt.block_on(reconcile_with_store(
                &conn.client,
                chroma,
                &cfg.agent_id,
                &store,
                &cfg.watch.missing_folders(),
                args.dry_run,
            ))?;
            print_reconcile(&r, false);
        }
        // The running agent holds the store: it does this step (`POST /repair`).
        Some(Err(who)) => {
            let client = docusearch_agent::api::ApiClient::new(&cfg.api, Duration::from_secs(310))?;
            match rt.block_on(client.repair(args.dry_run)) {
                Ok(Some(v)) => {
                    let r: StoreReconcile = serde_json::from_value(v)?;
                    println!("reconcile with the state store: done by the running agent{who}");
                    print_reconcile(&r, true);
                }
                Ok(None) => {
                    println!(
                        "reconcile with the state store: skipped, the agent is running{who} and holds the state store, and its status API on port {} does not answer (api.enabled = false?); records with no file, files with no records and failed jobs were not checked. Fix: enable the API, or stop the agent, and run `docusearch-agent repair` again",
                        cfg.api.port
                    );
                    problems = true;
                }
                Err(e) => {
                    println!("reconcile with the state store: the running agent{who} could not do it: {e}");
                    problems = true;
                }
            }
        }
    }
    Ok(if problems {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
