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
            .with(tracing_oslog::OsLogger::new(OSLOG_SUBSYSTEM, "default"))
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
