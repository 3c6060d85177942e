//! The dispatcher: takes due jobs from the store, does deletions and moves itself (no model
//! needed), checks that a file has settled and really changed, and sends documents on to
//! extraction.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::{fail_point, fatal, Doc, FailStage, Mode, Outcome, Shared};
use crate::agent::stages::{Sink, Stage, StageError};
use crate::state::{now_ms, FileStamp, Job, JobKind, StoreError};
use crate::supervisor::{CancellationToken, TaskError};
use crate::types::{ContentHash, DocFormat};

pub(super) async fn run<S: Sink>(
    shared: Arc<Shared<S>>,
    doc_tx: mpsc::Sender<Arc<Doc>>,
    token: CancellationToken,
    mode: Mode,
) -> Result<(), TaskError> {
    let queued = shared.store.queued_signal();
    loop {
        if token.is_cancelled() {
            break;
        }
        let job = shared
            .store
            .take_due(now_ms())
            .map_err(|e| fatal("the job queue cannot be read", e))?;
        match job {
            Some(job) => {
                fail_point(&shared.settings, FailStage::Dispatch)?;
                shared.telemetry.in_flight.inc();
                shared.telemetry.poke();
                dispatch(&shared, job, &doc_tx)
                    .await
                    .map_err(|e| fatal("the job queue cannot be written", e))?;
                if doc_tx.is_closed() && !token.is_cancelled() {
                    return Err(TaskError::new(
                        "the extraction stage stopped: no document can be indexed",
                    ));
                }
            }
            None => {
                let next = shared.store.next_due_ms();
                if mode == Mode::UntilIdle
                    && next.is_none()
                    && shared.telemetry.in_flight.get() == 0
                {
                    break;
                }
                let wait = match next {
                    Some(d) => Duration::from_millis(d.saturating_sub(now_ms()).max(1)),
                    // Nothing queued: sleep until something is (or, for `index`, re-check
                    // when a document in flight completes).
                    None if mode == Mode::UntilIdle => Duration::from_millis(200),
                    None => Duration::from_secs(24 * 3600),
                };
                tokio::select! {
                    _ = queued.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = token.cancelled() => {}
                }
            }
        }
    }
    // Dropping doc_tx lets the later stages drain and end.
    Ok(())
}

/// Handles one job: deletions and moves here; documents to index go on to extraction.
async fn dispatch<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: Job,
    doc_tx: &mpsc::Sender<Arc<Doc>>,
) -> Result<(), StoreError> {
    match job.kind.clone() {
        JobKind::Delete { path } => {
            if FileStamp::of_path(&path).is_some() {
                // It came back before the deletion ran.
                return index(shared, job, &path, doc_tx).await;
            }
            delete(shared, &job, &path).await
        }
        JobKind::Move { from, to } => {
            if FileStamp::of_path(&to).is_none() {
                // Gone again. A move that reached Chroma before the agent was killed (and
                // before the store recorded it) left the records under `to`'s id: they go too.
                if let Err(e) = shared.sink.delete_document(&shared.doc_id(&to)).await {
                    return shared.sync_failed(&job, &to, &e);
                }
                return delete(shared, &job, &from).await;
            }
            let rec = shared.store.file(&from)?;
            let from_still_there = FileStamp::of_path(&from).is_some();
            if let (Some(rec), false) = (rec, from_still_there) {
                let meta = shared.meta(
                    &to,
                    shared.doc_id(&to),
                    rec_format(&to),
                    rec.num_pages,
                    rec.content_hash.clone(),
                );
                match shared.sink.move_document(&rec.doc_id, &meta).await {
                    Ok(moved) => {
                        shared.telemetry.chroma_waiting(None);
                        shared.store.remove_file(&from)?;
                        if moved {
                            let mut new = rec.clone();
                            new.doc_id = meta.doc_id.clone();
                            // The content check below decides whether the bytes changed too.
                            shared.store.put_file(&to, &new)?;
                            shared.telemetry.files_moved.inc();
                            shared.report(Outcome::Moved {
                                from: from.clone(),
                                to: to.clone(),
                            });
                        }
                    }
                    Err(e) => return shared.sync_failed(&job, &to, &e),
                }
            }
            index(shared, job, &to, doc_tx).await
        }
        JobKind::Index { path } => index(shared, job, &path, doc_tx).await,
    }
}

fn rec_format(path: &Path) -> DocFormat {
    DocFormat::from_path(path).unwrap_or(DocFormat::Pdf)
}

async fn delete<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: &Job,
    path: &Path,
) -> Result<(), StoreError> {
    let rec = shared.store.file(path)?;
    let doc_id = rec
        .as_ref()
        .map(|r| r.doc_id.clone())
        .unwrap_or_else(|| shared.doc_id(path));
    match shared.sink.delete_document(&doc_id).await {
        Ok(()) => {
            shared.telemetry.chroma_waiting(None);
            shared.store.remove_file(path)?;
            if rec.is_some() {
                shared.telemetry.files_removed.inc();
            }
            shared.report(Outcome::Deleted {
                path: path.to_path_buf(),
            });
            shared.job_done(job)
        }
        Err(e) => shared.sync_failed(job, path, &e),
    }
}

/// The shortest wait between two looks at a file that is not ready.
const MIN_CHECK: Duration = Duration::from_millis(20);

/// How long `stamp` must have held still before the file is read: the settle period, or, when
/// its writer closed it with this size and mtime (or it was moved in whole), the short check,
/// doubled for each change seen while it waited (a file rewritten again and again is waited
/// for as long as one nobody said was complete).
fn quiet_period(settings: &super::PipelineSettings, job: &Job, stamp: FileStamp) -> Duration {
    if job.closed != Some(stamp) {
        return settings.settle;
    }
    let doubled = settings
        .settle_check
        .saturating_mul(1u32 << job.changes.min(16));
    doubled.min(settings.settle)
}

/// Checks that the file settled and changed, tries a re-key by content, else sends it on.
async fn index<S: Sink>(
    shared: &Arc<Shared<S>>,
    job: Job,
    path: &Path,
    doc_tx: &mpsc::Sender<Arc<Doc>>,
) -> Result<(), StoreError> {
    let Some(stamp) = FileStamp::of_path(path) else {
        return delete(shared, &job, path).await;
    };
    // Stable: the same size and mtime as when last looked at, and not written for long
    // enough (a file still being copied in keeps changing both).
    let quiet = quiet_period(&shared.settings, &job, stamp);
    let age = stamp.age(SystemTime::now());
    let still = age >= quiet || stamp.mtime_ns > now_ms() as i128 * 1_000_000;
    if job.seen != Some(stamp) || !still {
        shared.telemetry.in_flight.dec();
        // Looked at again once it could have been still long enough.
        let wait = if job.seen != Some(stamp) {
            quiet
        } else {
            quiet.saturating_sub(age)
        };
        let wait = wait.max(shared.settings.settle_check).max(MIN_CHECK);
        return shared.store.defer(&job, Some(stamp), wait);
    }
    let p = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || ContentHash::of_file(&p)).await;
    let hash = match hashed {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let err =
                StageError::permanent(Stage::Read, format!("cannot read {}: {e}", path.display()));
            return shared.job_failed(&job, path, &err);
        }
        Err(e) => {
            return shared.job_failed(
                &job,
                path,
                &StageError::transient(Stage::Read, e.to_string()),
            );
        }
    };
    let rec = shared.store.file(path)?;
    if let Some(rec) = &rec {
        if rec.content_hash == hash && rec.last_error.is_none() && rec.model == shared.model_id {
            let mut rec = rec.clone();
            rec.stamp = stamp;
            shared.store.put_file(path, &rec)?;
            shared.telemetry.files_unchanged.inc();
            shared.report(Outcome::Unchanged {
                path: path.to_path_buf(),
            });
            return shared.job_done(&job);
        }
    }
    // The same content under a path that vanished: a move reported as two unrelated events.
    if rec.is_none() {
        for old in shared.store.paths_with_hash(&hash)? {
            if old == path || FileStamp::of_path(&old).is_some() {
                continue;
            }
            let Some(old_rec) = shared.store.file(&old)? else {
                continue;
            };
            if old_rec.last_error.is_some() || old_rec.model != shared.model_id {
                continue;
            }
            let meta = shared.meta(
                path,
                shared.doc_id(path),
                rec_format(path),
                old_rec.num_pages,
                hash.clone(),
            );
            if let Ok(true) = shared.sink.move_document(&old_rec.doc_id, &meta).await {
                shared.store.remove_file(&old)?;
                let mut new = old_rec.clone();
                new.doc_id = meta.doc_id;
                new.stamp = stamp;
                shared.store.put_file(path, &new)?;
                shared.telemetry.files_moved.inc();
                shared.report(Outcome::Moved {
                    from: old,
                    to: path.to_path_buf(),
                });
                return shared.job_done(&job);
            }
        }
    }
    let doc = Arc::new(Doc {
        path: path.to_path_buf(),
        doc_id: shared.doc_id(path),
        hash,
        stamp,
        format: rec_format(path),
        job,
        info: OnceLock::new(),
        failed: Mutex::new(None),
        started: std::time::Instant::now(),
    });
    shared.telemetry.extracting.inc();
    shared
        .telemetry
        .document_started(doc.job.seq, doc.path.clone());
    if let Err(mpsc::error::SendError(doc)) = doc_tx.send(doc).await {
        shared.telemetry.extracting.dec();
        shared.telemetry.document_finished(doc.job.seq);
        // Extraction is gone: back in the queue.
        shared.telemetry.in_flight.dec();
        shared
            .store
            .defer(&doc.job, Some(doc.stamp), Duration::ZERO)?;
    }
    Ok(())
}
