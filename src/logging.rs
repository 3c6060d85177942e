//! Logging: stderr on Linux and in a terminal; the macOS unified log when launchd runs us.

use std::io::IsTerminal;

use tracing::{span, Dispatch, Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

/// The unified-log subsystem (`log stream --predicate 'subsystem == "com.docusearch.agent"'`).
pub const OSLOG_SUBSYSTEM: &str = "com.docusearch.agent";

/// Where [`init`] sends the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDestination {
    Stderr,
    /// The macOS unified log (launchd runs us): stderr goes to a file of its own.
    UnifiedLog,
}

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(config: &LoggingConfig) -> LogDestination {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // notify's poller warns about each folder it cannot read on every pass (every few
    // seconds); the agent says it once, in its own words, and lists it in `status`.
    let filter = match "notify::poll=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let to_terminal = std::io::stderr().is_terminal();

    #[cfg(target_os = "macos")]
    if !to_terminal {
        let _ = registry
            .with(ByCategory::new(|category| {
                tracing_oslog::OsLogger::new(OSLOG_SUBSYSTEM, category)
            }))
            .try_init();
        return LogDestination::UnifiedLog;
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
    LogDestination::Stderr
}

/// Unified-log categories, one per stage, so Console.app and `log stream` can filter by stage
/// (`category == "embed"`). Anything else logs under `agent`.
pub const LOG_CATEGORIES: &[&str] = &[
    "watch", "state", "extract", "embed", "sync", "chroma", "search", "api", "service", "agent",
];

/// The category of an event from its target (module path): `docusearch_agent::embed::model`
/// → `embed`.
pub fn category_for(target: &str) -> &'static str {
    LOG_CATEGORIES[category_index(target)]
}

/// Where [`category_for`] is in [`LOG_CATEGORIES`].
fn category_index(target: &str) -> usize {
    let stage = target
        .strip_prefix("docusearch_agent::")
        .and_then(|rest| rest.split("::").next())
        .unwrap_or("");
    LOG_CATEGORIES
        .iter()
        .position(|c| *c == stage)
        .unwrap_or(LOG_CATEGORIES.len() - 1)
}

/// One logger per category behind a single layer: an event goes to the logger of its own
/// category, a span's callbacks to the logger of the span's category only.
///
/// Not one filtered layer per category: a per-layer filter hides the spans of other categories
/// from a layer, yet `Context::current_span` still names them (tokio-rs/tracing#2396), and
/// tracing-oslog 0.3 looks the current span up with `expect` (Absolucy/tracing-oslog#20), so
/// the first `embed` event inside an `extract` span (or a dependency's span under
/// `RUST_LOG=debug`) would panic. Nor every logger told of every span: OsLogger keeps a span's
/// os_activity in the span's extensions, which all layers share, and removes it on close with
/// `expect`, so a second logger closing the same span would panic. Here the context is
/// unfiltered, so every logger sees every span, and exactly one of them owns each span's state.
///
/// Generic over the logger so the routing is compiled and tested on every platform. A logger
/// must keep what it attaches to a span in the span's extensions (as OsLogger does), so that
/// the loggers of other categories find it, and be a plain layer: levels are filtered before
/// this one, by the subscriber's `EnvFilter`, never per logger.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) struct ByCategory<L> {
    /// Indexed like [`LOG_CATEGORIES`].
    loggers: Vec<L>,
}

#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
impl<L> ByCategory<L> {
    pub(crate) fn new(make: impl Fn(&'static str) -> L) -> Self {
        ByCategory {
            loggers: LOG_CATEGORIES.iter().map(|&c| make(c)).collect(),
        }
    }

    fn for_target(&self, target: &str) -> &L {
        &self.loggers[category_index(target)]
    }

    /// The logger that owns a span; `None` once the registry no longer knows it.
    fn for_span<S>(&self, id: &span::Id, ctx: &Context<'_, S>) -> Option<&L>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        ctx.metadata(id).map(|meta| self.for_target(meta.target()))
    }
}

impl<S, L> Layer<S> for ByCategory<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        for l in &self.loggers {
            l.on_register_dispatch(subscriber);
        }
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        for l in &mut self.loggers {
            l.on_layer(subscriber);
        }
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.for_target(attrs.metadata().target())
            .on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(l) = self.for_span(id, &ctx) {
            l.on_record(id, values, ctx);
        }
    }

    fn on_follows_from(&self, id: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        if let Some(l) = self.for_span(id, &ctx) {
            l.on_follows_from(id, follows, ctx);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.for_target(event.metadata().target())
            .on_event(event, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(l) = self.for_span(id, &ctx) {
            l.on_enter(id, ctx);
        }
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(l) = self.for_span(id, &ctx) {
            l.on_exit(id, ctx);
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if let Some(l) = self.for_span(&id, &ctx) {
            l.on_close(id, ctx);
        }
    }
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
        let subscriber = tracing_subscriber::registry().with(ByCategory::new(make));
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

    /// What the stand-in loggers were told: `(category, message)` per event and
    /// `(category, span name, "new" | "close")` per span callback.
    #[derive(Default)]
    struct Told {
        events: Vec<(&'static str, String)>,
        spans: Vec<(&'static str, &'static str, &'static str)>,
    }

    /// Stand-in for `tracing_oslog::OsLogger` (0.3.0, `src/logger.rs`): the same span look-ups
    /// with the same `expect`s, a marker where OsLogger keeps the span's os_activity, and a
    /// record of what it was told instead of a call to os_log.
    struct LikeOsLogger {
        category: &'static str,
        told: Arc<Mutex<Told>>,
    }

    /// Where OsLogger keeps its `Activity`.
    struct Activity;

    struct Message(String);

    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}");
            }
        }
    }

    impl<S> Layer<S> for LikeOsLogger
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        fn on_new_span(&self, _: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
            let span = ctx.span(id).expect("invalid span, this shouldn't happen");
            let mut extensions = span.extensions_mut();
            if extensions.get_mut::<Activity>().is_none() {
                if let Some(parent) = span.parent() {
                    parent
                        .extensions()
                        .get::<Activity>()
                        .expect("parent span didn't contain activity wtf");
                }
                extensions.insert(Activity);
            }
            let told = (self.category, span.name(), "new");
            self.told.lock().unwrap().spans.push(told);
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            if let Some(parent_id) = ctx.current_span().id() {
                let span = ctx
                    .span(parent_id)
                    .expect("invalid span, this shouldn't happen");
                let mut extensions = span.extensions_mut();
                extensions
                    .get_mut::<Activity>()
                    .expect("span didn't contain activity wtf");
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            let told = (self.category, message.0);
            self.told.lock().unwrap().events.push(told);
        }

        fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
            let span = ctx.span(&id).expect("invalid span, this shouldn't happen");
            let mut extensions = span.extensions_mut();
            extensions
                .remove::<Activity>()
                .expect("span didn't contain activity wtf");
            let told = (self.category, span.name(), "close");
            self.told.lock().unwrap().spans.push(told);
        }
    }

    /// The first event of one stage inside a span of another (or of a dependency, as under
    /// `RUST_LOG=debug`) reaches exactly its own category's logger, and nothing panics on a
    /// span a logger was not told about.
    #[test]
    fn an_event_inside_another_stages_span_reaches_its_own_logger() {
        let told: Arc<Mutex<Told>> = Arc::default();
        let make = |category: &'static str| LikeOsLogger {
            category,
            told: told.clone(),
        };
        // As `init` builds it, under RUST_LOG=debug.
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("debug"))
            .with(ByCategory::new(make));
        tracing::subscriber::with_default(subscriber, || {
            let render = tracing::info_span!(target: "docusearch_agent::extract", "render");
            let _in_render = render.enter();
            tracing::info!(target: "docusearch_agent::embed", "embedded");
            {
                let request = tracing::debug_span!(target: "hyper::client", "request");
                let _in_request = request.enter();
                tracing::info!(target: "docusearch_agent::chroma", "upserted");
                let sync = tracing::info_span!(target: "docusearch_agent::sync", "sync");
                let _in_sync = sync.enter();
                tracing::warn!(target: "docusearch_agent::sync", "synced");
            }
            tracing::info!(target: "docusearch_agent::extract", "rendered");
        });
        let told = told.lock().unwrap();
        let events: Vec<(&str, &str)> = told.events.iter().map(|(c, m)| (*c, m.as_str())).collect();
        assert_eq!(
            events,
            vec![
                ("embed", "embedded"),
                ("chroma", "upserted"),
                ("sync", "synced"),
                ("extract", "rendered"),
            ]
        );
        assert_eq!(
            told.spans,
            vec![
                ("extract", "render", "new"),
                ("agent", "request", "new"),
                ("sync", "sync", "new"),
                ("sync", "sync", "close"),
                ("agent", "request", "close"),
                ("extract", "render", "close"),
            ],
            "each span is told to its own category's logger, once"
        );
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
