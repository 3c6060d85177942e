//! docusearch-agent: a background agent that keeps a DocuSearch index in sync with folders.
//!
//! The modules follow the data flow (see `docs/` and DESIGN.md):
//! `watch` → `state` (files, jobs) → `extract` (pages, text) → `embed` (ColPali) →
//! `sync` (Chroma records) ; `search` reads them back; `agent` runs the stages; `service`,
//! `priority` and `api` make it a well-behaved background process. `records` is DocuSearch's
//! record format (ids, metadata keys, encodings); `chroma` a generic client for the server that
//! holds them; `errors` says an error and its causes once.

pub mod agent;
pub mod api;
pub mod chroma;
pub mod config;
pub mod doctor;
pub mod embed;
pub mod errors;
pub mod extract;
pub mod gpu_check;
pub mod logging;
pub mod priority;
pub mod records;
pub mod runtime_paths;
pub mod search;
pub mod service;
pub mod state;
pub mod supervisor;
pub mod sync;
pub mod telemetry;
pub mod types;
pub mod watch;
