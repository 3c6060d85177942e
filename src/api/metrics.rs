//! `/metrics`: the agent's telemetry in the Prometheus text exposition (format 0.0.4, a few
//! lines of text written here). Counters and histograms come from [`Telemetry`]; gauges from
//! the status snapshot, so `/metrics` and `/status` show the same numbers.

use std::fmt::Write as _;

use super::status::{AgentStatus, ModelState};
use crate::telemetry::{HistogramSnapshot, Stage, Telemetry};

/// The `Content-Type` of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus text exposition of the metrics, plus gauges read from the status snapshot.
pub fn render_prometheus(m: &Telemetry, status: &AgentStatus) -> String {
    let mut out = String::with_capacity(4096);
    let mut counter = |name: &str, help: &str, v: u64| {
        header(&mut out, name, help, "counter");
        let _ = writeln!(out, "{name} {v}");
    };
    counter(
        "docusearch_files_indexed_total",
        "Documents whose records were written to Chroma (each re-index counts).",
        status.counters.files_indexed,
    );
    counter(
        "docusearch_pages_indexed_total",
        "Pages of the documents indexed.",
        status.counters.pages_indexed,
    );
    counter(
        "docusearch_chunks_indexed_total",
        "Text-chunk records written to Chroma.",
        status.counters.chunks_indexed,
    );
    counter(
        "docusearch_files_removed_total",
        "Documents whose records were removed from Chroma.",
        status.counters.files_removed,
    );
    counter(
        "docusearch_files_moved_total",
        "Documents re-keyed after a move or rename, without re-embedding.",
        status.counters.files_moved,
    );
    counter(
        "docusearch_pages_embedded_total",
        "Pages embedded by the model.",
        status.counters.pages_embedded,
    );
    counter(
        "docusearch_chroma_errors_total",
        "Chroma operations that failed (after the client's own retries).",
        status.counters.chroma_errors,
    );
    counter(
        "docusearch_files_failed_total",
        "Documents marked failed after their last attempt.",
        status.counters.files_failed,
    );
    counter(
        "docusearch_chunks_embedded_total",
        "Text chunks embedded by the model.",
        status.counters.chunks_embedded,
    );
    counter(
        "docusearch_missed_changes_total",
        "Changes the periodic rescan found that no file-system event reported.",
        status.counters.missed_changes,
    );
    counter(
        "docusearch_rescans_requested_total",
        "Reconciles asked for through POST /rescan.",
        status.counters.rescans_requested,
    );

    header(
        &mut out,
        "docusearch_failures_total",
        "Failed attempts, by stage.",
        "counter",
    );
    for stage in Stage::ALL {
        let _ = writeln!(
            out,
            "docusearch_failures_total{{stage=\"{}\"}} {}",
            stage.as_str(),
            status.counters.failures.get(stage.as_str()).copied().unwrap_or(0)
        );
    }

    let mut gauge = |name: &str, help: &str, v: f64| {
        header(&mut out, name, help, "gauge");
        let _ = writeln!(out, "{name} {}", fmt_f64(v));
    };
    gauge(
        "docusearch_pages_embedded_per_second",
        "Pages embedded per second over the last minute.",
        status.counters.pages_per_second,
    );
    gauge(
        "docusearch_queue_depth",
        "Jobs waiting in the queue.",
        status.queue.queued as f64,
    );
    gauge(
        "docusearch_jobs_in_progress",
        "Jobs being worked on.",
        status.queue.in_progress as f64,
    );
    gauge(
        "docusearch_failed_documents",
        "Documents currently marked failed.",
        status.queue.failed as f64,
    );
    gauge(
        "docusearch_model_loaded",
        "1 when the model is in memory.",
        bool_f64(status.model.state == ModelState::Loaded),
    );
    gauge(
        "docusearch_model_failed",
        "1 while the model cannot be loaded (/status says why).",
        bool_f64(status.model.error.is_some() && status.model.state != ModelState::Loaded),
    );
    gauge(
        "docusearch_model_load_seconds",
        "Seconds the last successful model load took.",
        status.model.load_seconds.unwrap_or(0.0),
    );
    gauge(
        "docusearch_documents_in_progress",
        "Documents in the pipeline now.",
        status.in_progress.len() as f64,
    );
    gauge(
        "docusearch_task_failures",
        "Tasks of the agent that stopped with an error (the agent exits).",
        status.task_failures.len() as f64,
    );
    gauge(
        "docusearch_model_cpu_fallback",
        "1 when a GPU was asked for but the model runs on the CPU.",
        bool_f64(status.model.fell_back_to_cpu),
    );
    gauge(
        "docusearch_chroma_up",
        "1 when the last Chroma heartbeat answered.",
        bool_f64(status.chroma.reachable == Some(true)),
    );
    gauge(
        "docusearch_uptime_seconds",
        "Seconds since the agent started.",
        status.uptime_s as f64,
    );

    histogram(
        &mut out,
        "docusearch_embed_batch_seconds",
        "Seconds per model call (one batch of pages or of text chunks).",
        &m.embed_latency.snapshot(),
    );
    histogram(
        &mut out,
        "docusearch_sync_seconds",
        "Seconds to write one document's records to Chroma.",
        &m.sync_latency.snapshot(),
    );
    histogram(
        &mut out,
        "docusearch_extract_seconds",
        "Seconds to render and read one document.",
        &m.extract_latency.snapshot(),
    );

    header(
        &mut out,
        "docusearch_build_info",
        "The agent's version.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "docusearch_build_info{{version=\"{}\",agent_id=\"{}\"}} 1",
        escape_label(&status.version),
        escape_label(&status.agent_id)
    );
    out
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &HistogramSnapshot) {
    header(out, name, help, "histogram");
    for (le, n) in &h.cumulative {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", fmt_f64(*le));
    }
    let _ = writeln!(out, "{name}_sum {}", fmt_f64(h.sum_s));
    let _ = writeln!(out, "{name}_count {}", h.count);
}

fn fmt_f64(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

fn bool_f64(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
