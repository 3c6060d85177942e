//! One shutdown signal and every task accounted for, as mini-redis does it: each task the agent
//! spawns goes through a [`Supervisor`], hears the same [`CancellationToken`], and returns a
//! `Result`. A task that returns an error or panics is recorded in the agent's telemetry (which
//! turns `/health` degraded, with the reason) and wakes [`Supervisor::failed`], so `run` stops
//! and exits non-zero, and launchd or systemd start it again.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::{TaskFailure, Telemetry};

/// Why a task stopped: what it was doing, for a person to read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TaskError(pub String);

impl TaskError {
    pub fn new(reason: impl std::fmt::Display) -> TaskError {
        TaskError(reason.to_string())
    }
}

/// Spawns, tracks and watches the agent's tasks. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    token: CancellationToken,
    tracker: TaskTracker,
    telemetry: Arc<Telemetry>,
    failed: Arc<watch::Sender<Option<TaskFailure>>>,
}

impl Supervisor {
    pub fn new(telemetry: Arc<Telemetry>) -> Supervisor {
        Supervisor {
            token: CancellationToken::new(),
            tracker: TaskTracker::new(),
            telemetry,
            failed: Arc::new(watch::channel(None).0),
        }
    }

    /// The shutdown signal every task listens to.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Runs `task` on the async threads. Must be called inside a tokio runtime.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let this = self.clone();
        // The inner task's join handle tells a panic from an error.
        let inner = tokio::spawn(task);
        self.tracker
            .spawn(async move { this.watch(name, inner.await) });
    }

    /// Runs `task` on a thread of its own (it blocks: rendering, the model).
    pub fn spawn_blocking<F>(&self, name: &'static str, task: F)
    where
        F: FnOnce() -> Result<(), TaskError> + Send + 'static,
    {
        let this = self.clone();
        let inner = tokio::task::spawn_blocking(task);
        self.tracker
            .spawn(async move { this.watch(name, inner.await) });
    }

    fn watch(
        &self,
        name: &'static str,
        ended: Result<Result<(), TaskError>, tokio::task::JoinError>,
    ) {
        let reason = match ended {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.0,
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            // Cancelled by the runtime shutting down: not a failure of the task.
            Err(_) => return,
        };
        tracing::error!(task = name, "{reason}");
        self.telemetry.task_failed(name, reason.clone());
        self.failed.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(TaskFailure {
                    task: name.to_string(),
                    reason,
                });
                true
            } else {
                false
            }
        });
    }

    /// Resolves with the first task that failed (at once if one already has).
    pub async fn failed(&self) -> TaskFailure {
        let mut rx = self.failed.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`: never here.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The first failure so far, if any.
    pub fn first_failure(&self) -> Option<TaskFailure> {
        self.failed.borrow().clone()
    }

    /// Tells every task to stop.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// Waits until every task spawned so far has ended.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
        self.tracker.reopen();
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_error_and_a_panic_are_both_recorded_and_reported() {
        let telemetry = Arc::new(Telemetry::new("m"));
        let sup = Supervisor::new(telemetry.clone());
        sup.spawn("fine", async { Ok(()) });
        sup.spawn("broken", async {
            Err(TaskError::new("the queue is unwritable"))
        });
        let first = sup.failed().await;
        assert_eq!(first.task, "broken");
        assert_eq!(first.reason, "the queue is unwritable");
        sup.spawn_blocking("panics", || panic!("boom"));
        sup.wait().await;
        let all = telemetry.task_failures();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[1].task, "panics");
        assert_eq!(all[1].reason, "panicked: boom");
        // The first failure stays the one reported.
        assert_eq!(sup.first_failure().map(|f| f.task), Some("broken".into()));
    }

    #[tokio::test]
    async fn every_task_hears_the_one_shutdown_signal() {
        let sup = Supervisor::new(Arc::new(Telemetry::new("m")));
        for _ in 0..3 {
            let token = sup.token().clone();
            sup.spawn("waits", async move {
                token.cancelled().await;
                Ok(())
            });
        }
        sup.shutdown();
        tokio::time::timeout(std::time::Duration::from_secs(5), sup.wait())
            .await
            .expect("every task stopped");
        assert!(sup.first_failure().is_none());
    }
}
