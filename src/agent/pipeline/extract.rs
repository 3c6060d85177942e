//! Extraction: one blocking thread streams each document's pages (through the isolated
//! renderer) to the model stage, and stops at the next page on shutdown.

use std::ops::ControlFlow;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{fail_point, Doc, Ending, FailStage, Shared, StageMsg};
use crate::agent::stages::{Extract, ExtractEvent, Page};
use crate::supervisor::{CancellationToken, TaskError};

pub(super) fn run<X: Extract, S>(
    extractor: X,
    mut doc_rx: mpsc::Receiver<Arc<Doc>>,
    page_tx: SyncSender<StageMsg<Page>>,
    token: CancellationToken,
    shared: Arc<Shared<S>>,
) -> Result<(), TaskError> {
    let telemetry = &shared.telemetry;
    while let Some(doc) = doc_rx.blocking_recv() {
        if token.is_cancelled() {
            telemetry.extracting.dec();
            if page_tx
                .send(StageMsg::End(doc, Ending::Interrupted))
                .is_err()
            {
                break;
            }
            continue;
        }
        fail_point(&shared.settings, FailStage::Extract)?;
        let mut interrupted = false;
        let d = doc.clone();
        let started = Instant::now();
        let result = extractor.extract(&doc.path, &mut |item| {
            if token.is_cancelled() {
                interrupted = true;
                return ControlFlow::Break(());
            }
            match item {
                ExtractEvent::Info(info) => {
                    telemetry.document_pages(d.job.seq, info.num_pages);
                    let _ = d.info.set(info);
                    ControlFlow::Continue(())
                }
                ExtractEvent::Page(page) => {
                    if d.failure().is_some() {
                        // A later stage failed: the rest is wasted work.
                        return ControlFlow::Break(());
                    }
                    match page_tx.send(StageMsg::Page(d.clone(), page)) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => {
                            interrupted = true;
                            ControlFlow::Break(())
                        }
                    }
                }
            }
        });
        telemetry
            .extract_latency
            .observe(started.elapsed().as_secs_f64());
        if let Ok(info) = &result {
            let _ = doc.info.set(info.clone());
            telemetry.document_pages(doc.job.seq, info.num_pages);
            telemetry.files_extracted.inc();
        }
        // Before the end is sent, so the model thread never waits for a document that is done.
        telemetry.extracting.dec();
        let ending = if interrupted {
            Ending::Interrupted
        } else {
            Ending::Finished(result)
        };
        if page_tx.send(StageMsg::End(doc, ending)).is_err() {
            break;
        }
    }
    Ok(())
}
