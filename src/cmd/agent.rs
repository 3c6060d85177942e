//! `run`, `index` and `status`: the agent's commands, on the real stages.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use docusearch_agent::agent::pipeline::Outcome;
use docusearch_agent::agent::real::{RealExtract, RealModelLoader, RealSink};
use docusearch_agent::agent::report::{report_loop, RepairTarget};
use docusearch_agent::agent::runtime::{index_paths, Agent};
use docusearch_agent::agent::status::{self, running_agent_label, PidFile, Status, StoreAccess};
use docusearch_agent::api::{self, ApiState, ChromaProbe};
use docusearch_agent::api::{ModelState, ModelStatus};
use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::config::{ChromaTarget, Config};
use docusearch_agent::state::Store;
use docusearch_agent::supervisor::Supervisor;
use docusearch_agent::telemetry::Telemetry;

use super::{client_runtime, runtime, Context, IndexArgs, RunArgs, StatusArgs};

/// How long a failed agent keeps answering `/health` (503, with the reason) before it exits.
const FAILED_LINGER: Duration = Duration::from_secs(2);

/// Opens the store, or says plainly that a running agent owns it.
fn open_store(cfg: &Config, what: &str) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    match status::open_or_held(cfg, &cfg.store_dir())? {
        StoreAccess::Store(s) => Ok(s),
        StoreAccess::HeldByAgent { label: who } => {
            bail!("the agent is already running{who} and owns the state store, so `{what}` cannot run beside it: one agent per state directory. `docusearch-agent status` shows it; `docusearch-agent index PATH` hands it more files; stop it first to start another")
        }
    }
}

/// The Chroma URL, starting the managed server when the configuration asks for one. The
/// server, when started here, is returned to be stopped.
fn chroma(cfg: &Config, reuse_running: bool) -> anyhow::Result<(String, Option<ManagedChroma>)> {
    match cfg.chroma_target() {
        ChromaTarget::Remote { url } => Ok((url, None)),
        ChromaTarget::Managed => {
            if reuse_running {
                if let Some(url) =
                    docusearch_agent::chroma::managed::running_server(&cfg.managed_chroma_dir())
                {
                    return Ok((url, None));
                }
            }
            let exe = docusearch_agent::runtime_paths::find_chroma(cfg.chroma.command.as_deref())?;
            let m = ManagedChroma::start(&exe, &cfg.managed_chroma_dir())?;
            Ok((m.url(), Some(m)))
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// After a run that did not stop cleanly: records that no file in the store accounts for (a
/// move or a deletion written to Chroma just before the kill, the store's half lost) are
/// deleted, and files whose records are incomplete are queued again, as `repair` does. Before
/// the pipeline starts, so nothing changes meanwhile.
async fn recover_index(target: &RepairTarget, cfg: &Config, store: &Store) {
    tracing::info!("the last run did not stop cleanly: comparing the index with the state store");
    let missing = cfg.watch.missing_folders();
    match docusearch_agent::search::repair::reconcile_with_store(
        &target.client,
        &target.chroma,
        &cfg.agent_id,
        store,
        &missing,
        false,
    )
    .await
    {
        Ok(r) if r.orphans.is_empty() && r.missing.is_empty() => {
            tracing::info!(records = r.records, "the index agrees with the state store")
        }
        Ok(r) => tracing::warn!(
            orphans = r.orphans.len(),
            incomplete = r.missing.len(),
            "the index had records left from the interrupted run: deleted the orphans, queued the incomplete files again"
        ),
        Err(e) => tracing::warn!(
            "could not compare the index with the state store after an unclean stop ({e}); `docusearch-agent repair` does it later"
        ),
    }
}

pub fn run_command(ctx: &Context, args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = ctx.config.clone();
    if !args.folders.is_empty() {
        cfg.watch.folders = args.folders.clone();
    }
    if cfg.watch.folders.is_empty() {
        bail!("no folder to watch: give one (`docusearch-agent run ~/Documents`) or set watch.folders in the config file");
    }
    // A missing folder (an unmounted disk) is not fatal: it is watched once it is there, and
    // until then /health and `status` report it.
    for f in &cfg.watch.missing_folders() {
        tracing::warn!(
            "watched folder {} is missing (an unmounted disk?): it is watched once it is there",
            f.display()
        );
    }
    let store = open_store(&cfg, "run")?;
    // We hold the store's lock, so a pid file left behind is of a run that did not stop
    // cleanly (killed, crashed, power lost), maybe between a write to Chroma and the store.
    let unclean = status::pid_file(&cfg).exists();
    let web_store = store.clone();
    let _pid = PidFile::write(&cfg)
        .with_context(|| format!("cannot write the pid file in {}", cfg.state_dir.display()))?;
    let (url, mut managed) = chroma(&cfg, false)?;
    let rt = runtime()?;
    let flush_store = store.clone();
    let result: anyhow::Result<()> = rt.block_on(async {
        let syncer = docusearch_agent::sync::Syncer::connect(&url, &cfg).await?;
        let repair = RepairTarget {
            client: syncer.client().clone(),
            chroma: cfg.chroma.clone(),
        };
        if unclean {
            recover_index(&repair, &cfg, &store).await;
        }
        let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
        let extract = RealExtract::new(&cfg, exe.clone())?;
        let loader = RealModelLoader { cfg: cfg.model.clone() };
        let folders: Vec<PathBuf> = cfg.watch.folders.clone();
        let supervisor = Supervisor::new(Arc::new(Telemetry::new(&cfg.model.name)));
        let api_state = ApiState::with_telemetry(
            api::initial_status(&cfg),
            ChromaProbe::from_config(&cfg.chroma)?,
            supervisor.telemetry().clone(),
        );
        api_state.update(|s| {
            s.chroma.url = url.clone();
            s.watched_folders = folders.clone();
        });
        // The web page's search and thumbnails read the same store, Chroma and renderer.
        let mut web_cfg = cfg.clone();
        web_cfg.watch.folders = folders.clone();
        match api::WebBackend::new(&web_cfg, &url, web_store, exe) {
            Ok(web) => api_state.attach_web(web),
            Err(e) => tracing::warn!("the web page's search and thumbnails are not available: {e}"),
        }
        // The status API answers from the start (a failure to listen is reported, not fatal:
        // indexing matters more than its dashboard).
        if cfg.api.enabled {
            let (api_cfg, st, token) = (cfg.api.clone(), api_state.clone(), supervisor.token().clone());
            supervisor.spawn("api", async move {
                if let Err(e) = api::serve(&api_cfg, st, token.cancelled_owned()).await {
                    tracing::warn!("status API not available: {e}");
                }
                Ok(())
            });
        }
        let (otx, orx) = tokio::sync::mpsc::unbounded_channel();
        let agent = Agent::start_supervised(&supervisor, &cfg, &folders, store, extract, loader, RealSink(syncer), Some(otx)).await?;
        api_state.update(|s| s.last_reconcile = Some(api::now_iso()));
        supervisor.spawn(
            "report",
            report_loop(
                api_state.clone(),
                agent.tracker.clone(),
                cfg.agent_id.clone(),
                orx,
                Some(repair),
                supervisor.clone(),
            ),
        );
        tracing::info!(folders = ?folders, chroma = %url, "agent running");
        let failure = tokio::select! {
            _ = wait_for_signal() => None,
            f = supervisor.failed() => Some(f),
        };
        if let Some(f) = &failure {
            tracing::error!(task = %f.task, "{}; the agent stops so that its service manager starts it again", f.reason);
            // Meanwhile `/health` answers 503 with the reason, for whoever looks.
            tokio::time::sleep(FAILED_LINGER).await;
        }
        // Leave time within the 10 s service managers allow to stop Chroma and exit.
        if tokio::time::timeout(Duration::from_secs(7), agent.shutdown()).await.is_err() {
            tracing::warn!("the batch in flight did not finish in time; its jobs are re-queued at the next start");
        }
        match failure {
            Some(f) => Err(anyhow::anyhow!("the agent's {} task failed: {}", f.task, f.reason)),
            None => Ok(()),
        }
    });
    let _ = flush_store.flush();
    rt.shutdown_timeout(Duration::from_millis(500));
    if let Some(m) = managed.as_mut() {
        m.stop();
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// `index` while `run` is up: the agent files the jobs (`POST /index`), and this waits until
/// its queue is empty, then reports the failures among the given paths.
fn index_through_agent(cfg: &Config, args: &IndexArgs) -> anyhow::Result<ExitCode> {
    let who = running_agent_label(cfg);
    let paths = args
        .paths
        .iter()
        .map(|p| std::fs::canonicalize(p).with_context(|| format!("{}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = api::ApiClient::new(&cfg.api, Duration::from_secs(310))?;
    let rt = client_runtime()?;
    let started = Instant::now();
    let queued = match rt.block_on(client.index(&paths)) {
        Ok(Some(q)) => q,
        Ok(None) => bail!(
            "the agent is running{who} and owns the state store, but its status API on port {} does not answer (api.enabled = false?), so `index` cannot hand it the paths. Fix: enable the API, or stop the agent and run `index` again",
            cfg.api.port
        ),
        Err(api::ApiError::Response { body, .. }) => {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(body);
            bail!("the running agent{who} refused: {msg}")
        }
        Err(e) => return Err(e.into()),
    };
    if !args.json {
        println!(
            "the running agent{who} indexes these paths: {} file(s) queued, {} unchanged; waiting for its queue to empty (Ctrl-C stops waiting, not the agent)",
            queued.queued, queued.unchanged
        );
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let status = rt.block_on(async {
        loop {
            // A moment for the agent to pick the jobs up (new files wait out `settle_ms`).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(s) = client.status().await? else {
                anyhow::bail!(
                    "the agent stopped while indexing; its jobs stay queued for its next start"
                );
            };
            let left = s.queue.queued + s.queue.in_progress;
            bar.set_message(format!("{left} job(s) left in the agent's queue"));
            bar.tick();
            // Only a snapshot taken after the agent queued these paths can say they are done.
            if left == 0 && s.index_requests_done >= queued.request {
                return anyhow::Ok(s);
            }
        }
    })?;
    bar.finish_and_clear();
    let failed: Vec<_> = status
        .failures
        .iter()
        .filter(|f| paths.iter().any(|p| f.path.starts_with(p)))
        .collect();
    if args.json {
        let json = serde_json::json!({
            "through_agent": true,
            "queued": queued.queued,
            "unchanged": queued.unchanged,
            "failed": failed.iter().map(|f| serde_json::json!({"path": f.path, "reason": f.reason})).collect::<Vec<_>>(),
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "done in {:.1} s: {} failed",
            started.elapsed().as_secs_f64(),
            failed.len()
        );
        for f in &failed {
            println!("  failed: {}: {}", f.path.display(), f.reason);
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// "120 pages · 1.9 pages/s · report.pdf page 37/300": pages embedded so far, and where the
/// documents in progress are.
fn page_progress(t: &Telemetry, started: Instant) -> String {
    let pages = t.pages_embedded.total();
    let rate = pages as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let mut msg = format!("{pages} pages · {rate:.1} pages/s");
    for d in t.documents().iter().take(2) {
        let name = d
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match d.num_pages {
            Some(n) => msg.push_str(&format!(" · {name} page {}/{n}", d.pages_embedded)),
            None => msg.push_str(&format!(" · {name}")),
        }
    }
    msg
}

pub fn index_command(ctx: &Context, args: IndexArgs) -> anyhow::Result<ExitCode> {
    let cfg = ctx.config.clone();
    for p in &args.paths {
        // A link to nowhere or a loop is there, and `index` says what it is.
        if std::fs::symlink_metadata(p).is_err() {
            bail!("{} does not exist", p.display());
        }
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let store = match status::open_or_held(&cfg, &cfg.store_dir())? {
        StoreAccess::Store(s) => s,
        // A running agent owns the store: it does the work.
        StoreAccess::HeldByAgent { .. } => return index_through_agent(&cfg, &args),
    };
    let (url, mut managed) = chroma(&cfg, true)?;
    let rt = runtime()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files · {msg} · ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let q = store.clone();
    let summary = rt.block_on(async {
        let syncer = docusearch_agent::sync::Syncer::connect(&url, &cfg).await?;
        let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
        let extract = RealExtract::new(&cfg, exe.clone())?;
        let loader = RealModelLoader {
            cfg: cfg.model.clone(),
        };
        let paths: Vec<PathBuf> = args.paths.clone();
        let telemetry = Arc::new(Telemetry::new(&cfg.model.name));
        // Pages as well as files: one long PDF on a CPU takes hours, and a bar that counts
        // files would stand still all that time.
        let ticker = {
            let (bar, t) = (bar.clone(), telemetry.clone());
            tokio::spawn(async move {
                loop {
                    bar.set_message(page_progress(&t, started));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        let s = index_paths(
            &cfg,
            &paths,
            store,
            extract,
            loader,
            RealSink(syncer),
            telemetry,
            |o, t| {
                let pending = q
                    .queue_counts()
                    .map(|c| c.queued + c.in_progress)
                    .unwrap_or(0) as u64;
                bar.inc(1);
                bar.set_length(bar.position() + pending);
                bar.set_message(page_progress(t, started));
                if let Outcome::Failed { path, reason } = o {
                    bar.println(format!("failed: {}: {reason}", path.display()));
                }
            },
        )
        .await;
        ticker.abort();
        anyhow::Ok(s?)
    });
    bar.finish_and_clear();
    rt.shutdown_timeout(Duration::from_millis(500));
    if let Some(m) = managed.as_mut() {
        m.stop();
    }
    let summary = summary?;
    if args.json {
        let json = serde_json::json!({
            "indexed": summary.indexed.iter().map(|(p, n)| serde_json::json!({"path": p, "pages": n})).collect::<Vec<_>>(),
            "unchanged": summary.unchanged,
            "moved": summary.moved,
            "deleted": summary.deleted,
            // Lossy: a name that is not UTF-8 is among the failures, and JSON is text.
            "failed": summary.failed.iter().map(|(p, r)| serde_json::json!({"path": p.to_string_lossy(), "reason": r})).collect::<Vec<_>>(),
            "pages": summary.pages,
            "seconds": started.elapsed().as_secs_f64(),
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "indexed {} files ({} pages), {} unchanged, {} moved, {} deleted, {} failed in {:.1} s",
            summary.indexed.len(),
            summary.pages,
            summary.unchanged,
            summary.moved,
            summary.deleted,
            summary.failed.len(),
            started.elapsed().as_secs_f64()
        );
        for (p, r) in &summary.failed {
            println!("  failed: {}: {r}", p.display());
        }
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn status_command(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let rt = client_runtime()?;
    let s = rt.block_on(status::gather(&ctx.config, &ctx.config.store_dir()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render(&s));
    }
    Ok(ExitCode::SUCCESS)
}

/// The human-readable form.
fn render(s: &Status) -> String {
    let mut out = String::new();
    let line = |out: &mut String, t: String| {
        out.push_str(&t);
        out.push('\n');
    };
    line(
        &mut out,
        match (s.agent_running, s.agent_pid) {
            (true, Some(p)) => format!("agent:   running (pid {p})"),
            (true, None) => "agent:   running".into(),
            (false, _) => "agent:   not running".into(),
        },
    );
    if let Some(f) = &s.files {
        line(
            &mut out,
            format!(
                "indexed: {} files, {} pages, {} text chunks",
                f.indexed, f.pages, f.chunks
            ),
        );
    }
    if let Some(q) = &s.queue {
        line(
            &mut out,
            format!(
                "queue:   {} queued, {} in progress, {} failed",
                q.queued, q.in_progress, q.failed
            ),
        );
    }
    for d in &s.in_progress {
        let pages = match d.num_pages {
            Some(n) => format!(", page {}/{n}", d.pages_embedded),
            None => String::new(),
        };
        line(
            &mut out,
            format!(
                "  {}{pages}: {}",
                format!("{:?}", d.stage).to_lowercase(),
                d.path.display()
            ),
        );
    }
    for f in &s.failures {
        line(
            &mut out,
            format!("  failed: {}: {}", f.path.display(), f.reason),
        );
    }
    line(
        &mut out,
        format!("model:   {} ({})", s.model.name, model_state(&s.model)),
    );
    line(
        &mut out,
        format!(
            "chroma:  {}{} — {}",
            s.chroma.target,
            s.chroma
                .url
                .as_ref()
                .filter(|u| **u != s.chroma.target)
                .map(|u| format!(" at {u}"))
                .unwrap_or_default(),
            if s.chroma.reachable {
                "reachable"
            } else if s.chroma.url.is_none() && !s.agent_running {
                // The managed server lives and dies with the agent.
                "not running (the agent starts it)"
            } else {
                "not reachable"
            }
        ),
    );
    for f in &s.missing_folders {
        line(
            &mut out,
            format!(
                "warning: watched folder {} is missing (an unmounted disk?): it is watched once it is there",
                f.display()
            ),
        );
    }
    if let Some(why) = &s.watch_polling {
        line(
            &mut out,
            format!(
                "warning: the watcher polls the folders (changes are seen within seconds): {why}"
            ),
        );
    }
    if let Some(h) = &s.health {
        if h.is_healthy() {
            line(&mut out, "health:  healthy".into());
        }
        for r in &h.reasons {
            line(&mut out, format!("health:  degraded: {r}"));
        }
    }
    for n in &s.notes {
        line(&mut out, format!("note:    {n}"));
    }
    out
}

/// "loaded on cpu, f32 (a GPU was asked for: running on the CPU)", "failed: why", ...
fn model_state(m: &ModelStatus) -> String {
    let place = || {
        let mut p = format!(
            "on {}, {}",
            m.device.as_deref().unwrap_or("?"),
            m.dtype.as_deref().unwrap_or("?")
        );
        if m.fell_back_to_cpu {
            p.push_str(": no usable GPU, so the CPU is used");
        }
        if let Some(why) = &m.placement_reason {
            p.push_str(&format!(" ({why})"));
        }
        p
    };
    match (m.state, &m.error) {
        (ModelState::Loaded, _) => format!("loaded {}", place()),
        (ModelState::Failed, Some(e)) | (ModelState::Loading, Some(e)) => {
            format!("failed to load: {e}")
        }
        (ModelState::Failed, None) => "failed to load".into(),
        (ModelState::Loading, None) => "loading".into(),
        (ModelState::Unloaded, _) => format!("unloaded while idle; ran {}", place()),
        (ModelState::NotLoaded, _) => "not loaded".into(),
    }
}
