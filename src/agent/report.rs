//! Keeps the status API's snapshot current with what only the store knows: every job's
//! outcome, the queue and index counts (refreshed whenever the telemetry says something
//! changed, at most once a second, and never while nothing happens), and carries out
//! `POST /rescan`, `POST /index` and `POST /repair` requests. Everything else in the snapshot
//! (model, documents in progress, counters) is read live from the telemetry.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

use super::changes::ChangeTracker;
use super::pipeline::Outcome;
use super::runtime::queue_paths_in_agent;
use crate::api::{
    now_iso, AgentRequest, ApiState, DocState, FailedDocument, IndexedCounts, QueueCounts,
    QueuedPaths, RecentDocument,
};
use crate::chroma::client::ChromaClient;
use crate::config::ChromaConfig;
use crate::search::repair::reconcile_with_store;
use crate::supervisor::{Supervisor, TaskError};
use crate::types::DocId;

fn recent(o: &Outcome, agent_id: &str) -> RecentDocument {
    let (path, state, pages, chunks, error) = match o {
        Outcome::Indexed {
            path,
            pages,
            chunks,
        } => (path, DocState::Indexed, Some(*pages), Some(*chunks), None),
        Outcome::Unchanged { path } => (path, DocState::Unchanged, None, None, None),
        Outcome::Moved { to, .. } => (to, DocState::Moved, None, None, None),
        Outcome::Deleted { path } => (path, DocState::Removed, None, None, None),
        Outcome::Retrying { path, reason } => {
            (path, DocState::Queued, None, None, Some(reason.clone()))
        }
        Outcome::Failed { path, reason } => {
            (path, DocState::Failed, None, None, Some(reason.clone()))
        }
        Outcome::Interrupted { path } => (path, DocState::Queued, None, None, None),
    };
    RecentDocument {
        path: path.clone(),
        doc_id: Some(DocId::new(agent_id, path)),
        state,
        pages,
        chunks,
        at: now_iso(),
        error,
    }
}

/// Copies the store's counts into the snapshot.
fn refresh(state: &ApiState, tracker: &ChangeTracker) {
    // Before the counts: every request counted done has its jobs in them.
    let requests_done = state.index_requests_done();
    let store = &tracker.store;
    let queue = store.queue_counts();
    let files = store.file_counts();
    let failures = store.all_jobs();
    state.update(|s| {
        s.index_requests_done = requests_done;
        match (&queue, &files) {
            (Ok(q), Ok(f)) => {
                s.queue = QueueCounts {
                    queued: q.queued as u64,
                    in_progress: q.in_progress as u64,
                    failed: q.failed as u64,
                };
                s.indexed = IndexedCounts {
                    files: f.indexed as u64,
                    pages: f.pages,
                    chunks: f.chunks,
                };
                s.store.error = None;
            }
            (Err(e), _) | (_, Err(e)) => s.store.error = Some(e.to_string()),
        }
        if let Ok(jobs) = &failures {
            s.failures = jobs
                .iter()
                .filter(|(_, j)| j.state == crate::state::JobState::Failed)
                .take(crate::api::LISTED_FAILURES)
                .map(|(p, j)| FailedDocument {
                    path: p.clone(),
                    reason: j.last_error.clone().unwrap_or_default(),
                    attempts: j.attempts,
                    at: now_iso(),
                })
                .collect();
        }
    });
}

/// The next `POST /index` or `POST /repair` request; never resolves when there is no channel.
async fn next_request(rx: &mut Option<UnboundedReceiver<AgentRequest>>) -> Option<AgentRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Where `POST /repair` reconciles the store with (the agent's Chroma).
pub struct RepairTarget {
    pub client: ChromaClient,
    pub chroma: ChromaConfig,
}

/// Does what a `POST /index` or `POST /repair` asked for and sends the answer back.
async fn carry_out(
    request: AgentRequest,
    state: ApiState,
    tracker: ChangeTracker,
    repair: Option<Arc<RepairTarget>>,
    agent_id: String,
) {
    match request {
        AgentRequest::Index { paths, reply } => {
            let queued =
                tokio::task::spawn_blocking(move || queue_paths_in_agent(&tracker, &paths))
                    .await
                    .unwrap_or_else(|e| Err(format!("the index request failed: {e}")))
                    .map(|q| QueuedPaths {
                        request: state.index_request_done(),
                        ..q
                    });
            state.telemetry().poke();
            let _ = reply.send(queued);
        }
        AgentRequest::Reconcile { dry_run, reply } => {
            // Watched folders missing now: their files are out of reach, not gone.
            let missing = state.telemetry().missing_folders();
            let report = match &repair {
                Some(r) => reconcile_with_store(
                    &r.client,
                    &r.chroma,
                    &agent_id,
                    &tracker.store,
                    &missing,
                    dry_run,
                )
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string())),
                None => Err("this agent has no Chroma client for repairs".into()),
            };
            let _ = reply.send(report);
        }
    }
}

/// How often, at most, the store's counts are read again while the agent works.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Runs until `token` is cancelled or the outcome channel closes (the pipeline stopped).
pub async fn report_loop(
    state: ApiState,
    tracker: ChangeTracker,
    agent_id: String,
    mut outcomes: UnboundedReceiver<Outcome>,
    repair: Option<RepairTarget>,
    supervisor: Supervisor,
) -> Result<(), TaskError> {
    let token = supervisor.token().clone();
    let repair = repair.map(Arc::new);
    let telemetry = state.telemetry().clone();
    let (t, st) = (tracker.clone(), state.clone());
    let _ = tokio::task::spawn_blocking(move || refresh(&st, &t)).await;
    let mut last = Instant::now();
    let mut dirty = false;
    let mut requests = state.take_requests();
    loop {
        tokio::select! {
            _ = token.cancelled() => break,
            o = outcomes.recv() => {
                let Some(o) = o else { break };
                state.record_document(recent(&o, &agent_id));
                if let Outcome::Indexed { path, .. } | Outcome::Deleted { path } = &o {
                    state.clear_failure(path);
                }
                dirty = true;
            }
            // A job was taken, a document moved on, the model changed, a file event queued
            // a job: the counts may have moved.
            _ = telemetry.changed() => dirty = true,
            _ = state.rescan_requested() => {
                let t = tracker.clone();
                match tokio::task::spawn_blocking(move || t.reconcile_all()).await {
                    Ok(Ok(_)) => state.update(|s| s.last_reconcile = Some(now_iso())),
                    Ok(Err(e)) => tracing::error!("requested rescan failed: {e}"),
                    Err(e) => tracing::error!("requested rescan failed: {e}"),
                }
                dirty = true;
            }
            r = next_request(&mut requests) => {
                match r {
                    // Its own task: a folder scan or a repair must not stall the snapshot.
                    Some(r) => {
                        let request = carry_out(r, state.clone(), tracker.clone(), repair.clone(), agent_id.clone());
                        supervisor.spawn("request", async move {
                            request.await;
                            Ok(())
                        });
                    }
                    None => requests = None,
                }
                dirty = true;
            }
            _ = tokio::time::sleep_until(last + REFRESH_EVERY), if dirty => {}
        }
        if dirty && Instant::now() >= last + REFRESH_EVERY {
            let (t, st) = (tracker.clone(), state.clone());
            let _ = tokio::task::spawn_blocking(move || refresh(&st, &t)).await;
            last = Instant::now();
            dirty = false;
        }
    }
    Ok(())
}
