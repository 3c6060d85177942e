//! Logging: stderr on Linux and in a terminal; the macOS unified log when launchd runs us.

use std::io::IsTerminal;

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

/// The unified-log subsystem (`log stream --predicate 'subsystem == "com.docusearch.agent"'`).
pub const OSLOG_SUBSYSTEM: &str = "com.docusearch.agent";

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(config: &LoggingConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let to_terminal = std::io::stderr().is_terminal();

    #[cfg(target_os = "macos")]
    if !to_terminal {
        let _ = registry
            .with(per_category(|category| {
                tracing_oslog::OsLogger::new(OSLOG_SUBSYSTEM, category)
            }))
            .try_init();
        return;
    }

    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(to_terminal)
        .with_target(false);
    let _ = if config.format == "json" {
        registry.with(fmt.json().boxed()).try_init()
    } else {
        registry.with(fmt.boxed()).try_init()
    };
}

/// Unified-log categories, one per stage, so Console.app and `log stream` can filter by stage
/// (`category == "embed"`). Anything else logs under `agent`.
pub const LOG_CATEGORIES: &[&str] = &[
    "watch", "state", "extract", "embed", "sync", "chroma", "search", "api", "service", "agent",
];

/// The category of an event from its target (module path): `docusearch_agent::embed::model`
/// → `embed`.
pub fn category_for(target: &str) -> &'static str {
    let stage = target
        .strip_prefix("docusearch_agent::")
        .and_then(|rest| rest.split("::").next())
        .unwrap_or("");
    LOG_CATEGORIES
        .iter()
        .copied()
        .find(|c| *c == stage)
        .unwrap_or("agent")
}

/// One layer per category, each seeing only its own events. Generic over the layer so the
/// routing is tested with a plain formatter on every platform.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
fn per_category<S, L>(
    make: impl Fn(&'static str) -> L,
) -> Vec<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S> + Send + Sync + 'static,
{
    LOG_CATEGORIES
        .iter()
        .map(|&category| {
            make(category)
                .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                    category_for(meta.target()) == category
                }))
                .boxed()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn stages_get_their_own_category() {
        assert_eq!(category_for("docusearch_agent::embed::model"), "embed");
        assert_eq!(category_for("docusearch_agent::sync"), "sync");
        assert_eq!(category_for("docusearch_agent::cli"), "agent");
        assert_eq!(category_for("hyper::client"), "agent");
    }

    /// Each event reaches exactly the layer of its category (as the os_log layers will).
    #[test]
    fn each_event_goes_to_its_category_layer_only() {
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let make = |category: &'static str| {
            let seen = seen.clone();
            tracing_subscriber::fmt::layer()
                .without_time()
                .with_ansi(false)
                .with_writer(move || Tagged {
                    category,
                    seen: seen.clone(),
                })
        };
        let subscriber = tracing_subscriber::registry().with(per_category(make));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "docusearch_agent::embed::model", "embedded");
            tracing::warn!(target: "docusearch_agent::sync", "synced");
            tracing::info!(target: "some_crate", "other");
        });
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let got: Vec<(&str, bool)> = seen
            .iter()
            .map(|(c, line)| {
                (
                    c.as_str(),
                    line.contains(match c.as_str() {
                        "embed" => "embedded",
                        "sync" => "synced",
                        _ => "other",
                    }),
                )
            })
            .collect();
        assert_eq!(got, vec![("agent", true), ("embed", true), ("sync", true)]);
    }

    struct Tagged {
        category: &'static str,
        seen: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl std::io::Write for Tagged {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.seen.lock().unwrap().push((
                self.category.to_string(),
                String::from_utf8_lossy(buf).into_owned(),
            ));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
