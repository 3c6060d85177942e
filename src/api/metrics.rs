//! `/metrics`: the agent's telemetry in the OpenMetrics text format, encoded by the official
//! Prometheus client (`prometheus-client`). Every value is read from the status snapshot that
//! `/status` serves (counters, queue, model, Chroma) or from the telemetry's own histograms, so
//! `/metrics` and `/status` show the same numbers.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::status::{AgentStatus, ModelState};
use crate::telemetry::{Stage, Telemetry};

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of `docusearch_failures_total`.
type StageLabel = Vec<(&'static str, &'static str)>;

/// The metrics of `status` (with `t`'s histograms), encoded. Every name starts `docusearch_`;
/// counters end `_total`.
pub fn render_prometheus(t: &Telemetry, status: &AgentStatus) -> String {
    let mut r = Registry::with_prefix("docusearch");
    let c = &status.counters;
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let m: Counter = Counter::default();
        m.inc_by(v);
        r.register(name, help, m);
    };
    counter(
        &mut r,
        "files_indexed",
        "Documents whose records were written to Chroma (each re-index counts)",
        c.files_indexed,
    );
    counter(
        &mut r,
        "pages_indexed",
        "Pages of the documents indexed",
        c.pages_indexed,
    );
    counter(
        &mut r,
        "chunks_indexed",
        "Text-chunk records written to Chroma",
        c.chunks_indexed,
    );
    counter(
        &mut r,
        "files_removed",
        "Documents whose records were removed from Chroma",
        c.files_removed,
    );
    counter(
        &mut r,
        "files_moved",
        "Documents re-keyed after a move or rename, without re-embedding",
        c.files_moved,
    );
    counter(
        &mut r,
        "files_failed",
        "Documents marked failed after their last attempt",
        c.files_failed,
    );
    counter(
        &mut r,
        "pages_embedded",
        "Pages embedded by the model",
        c.pages_embedded,
    );
    counter(
        &mut r,
        "chunks_embedded",
        "Text chunks embedded by the model",
        c.chunks_embedded,
    );
    counter(
        &mut r,
        "chroma_errors",
        "Chroma operations that failed (after the client's own retries)",
        c.chroma_errors,
    );
    counter(
        &mut r,
        "missed_changes",
        "Changes the periodic rescan found that no file-system event reported",
        c.missed_changes,
    );
    counter(
        &mut r,
        "rescans_requested",
        "Reconciles asked for through POST /rescan",
        c.rescans_requested,
    );
    let failures = Family::<StageLabel, Counter>::default();
    for stage in Stage::ALL {
        let n = c.failures.get(stage.as_str()).copied().unwrap_or(0);
        failures
            .get_or_create(&vec![("stage", stage.as_str())])
            .inc_by(n);
    }
    r.register("failures", "Failed attempts, by stage", failures);

    let gauge = |r: &mut Registry, name: &str, help: &str, v: f64| {
        let m: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        m.set(v);
        r.register(name, help, m);
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge(
        &mut r,
        "pages_embedded_per_second",
        "Pages embedded per second over the last minute",
        c.pages_per_second,
    );
    gauge(
        &mut r,
        "queue_depth",
        "Jobs waiting in the queue",
        status.queue.queued as f64,
    );
    gauge(
        &mut r,
        "jobs_in_progress",
        "Jobs being worked on",
        status.queue.in_progress as f64,
    );
    gauge(
        &mut r,
        "failed_documents",
        "Documents currently marked failed",
        status.queue.failed as f64,
    );
    gauge(
        &mut r,
        "documents_in_progress",
        "Documents in the pipeline now",
        status.in_progress.len() as f64,
    );
    gauge(
        &mut r,
        "model_loaded",
        "1 when the model is in memory",
        flag(status.model.state == ModelState::Loaded),
    );
    gauge(
        &mut r,
        "model_failed",
        "1 while the model cannot be loaded (/status says why)",
        flag(status.model.error.is_some() && status.model.state != ModelState::Loaded),
    );
    gauge(
        &mut r,
        "model_load_seconds",
        "Seconds the last successful model load took",
        status.model.load_seconds.unwrap_or(0.0),
    );
    gauge(
        &mut r,
        "model_cpu_fallback",
        "1 when no GPU could be used and the model runs on the CPU",
        flag(status.model.fell_back_to_cpu),
    );
    gauge(
        &mut r,
        "task_failures",
        "Tasks of the agent that stopped with an error (the agent exits)",
        status.task_failures.len() as f64,
    );
    gauge(
        &mut r,
        "chroma_up",
        "1 when the last Chroma heartbeat answered",
        flag(status.chroma.reachable == Some(true)),
    );
    gauge(
        &mut r,
        "uptime_seconds",
        "Seconds since the agent started",
        status.uptime_s as f64,
    );

    // Histograms are shared handles: these are the telemetry's own.
    r.register(
        "embed_batch_seconds",
        "Seconds per model call (one batch of pages or of text chunks)",
        t.embed_latency.clone(),
    );
    r.register(
        "sync_seconds",
        "Seconds to write one document's records to Chroma",
        t.sync_latency.clone(),
    );
    r.register(
        "extract_seconds",
        "Seconds to render and read one document",
        t.extract_latency.clone(),
    );
    r.register(
        "build",
        "The agent's version and id",
        Info::new(vec![
            ("version", escape_label(&status.version)),
            ("agent_id", escape_label(&status.agent_id)),
        ]),
    );

    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// The encoder writes label values as they are; OpenMetrics wants backslash, double quote
/// and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_the_snapshot_and_the_histograms() {
        let t = Telemetry::new("m");
        t.embed_latency.observe(0.3);
        t.embed_latency.observe(4.0);
        let mut status = AgentStatus {
            version: "1.2.3".into(),
            agent_id: "a\"b".into(),
            ..Default::default()
        };
        status.counters.pages_embedded = 12;
        status.counters.failures.insert("extract".into(), 2);
        status.queue.queued = 3;
        let text = render_prometheus(&t, &status);
        for line in [
            "# TYPE docusearch_pages_embedded counter",
            "docusearch_pages_embedded_total 12",
            "docusearch_failures_total{stage=\"extract\"} 2",
            "docusearch_failures_total{stage=\"sync\"} 0",
            "docusearch_queue_depth 3.0",
            "docusearch_embed_batch_seconds_count 2",
            "docusearch_embed_batch_seconds_bucket{le=\"0.5\"} 1",
            "docusearch_embed_batch_seconds_bucket{le=\"5.0\"} 2",
            "docusearch_build_info{version=\"1.2.3\",agent_id=\"a\\\"b\"} 1",
            "# HELP docusearch_pages_embedded Pages embedded by the model.",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
    }
}
