//! The read path: two-stage search (Chroma on the mean vector, then exact MaxSim) and repair.
//!
//! `engine` runs a search on a query multi-vector; `maxsim` is its stage-2 kernel; `repair`
//! finds records the server no longer returns and rebuilds a collection from its own records.

pub mod engine;
pub mod maxsim;
pub mod repair;

use anyhow::Context as _;

use crate::chroma::client::ChromaClient;
use crate::chroma::managed::ManagedChroma;
use crate::config::{ChromaTarget, Config};

pub use engine::{
    RecordKind, Scope, SearchError, SearchHit, SearchOptions, SearchResults, Searcher,
};
pub use repair::{recall_check, RecallReport};

/// The Chroma server a reader talks to, and the server it had to start, if any (stopped on
/// drop).
pub struct ReadConnection {
    pub client: ChromaClient,
    pub url: String,
    _started: Option<ManagedChroma>,
}

/// Finds the Chroma server for a command that reads (or repairs) the index: the configured
/// remote one; with the managed default, the running agent's server, or else one started on
/// the agent's data directory for the length of the command.
pub fn connect_for_reading(config: &Config) -> anyhow::Result<ReadConnection> {
    let (url, started) = match config.chroma_target() {
        ChromaTarget::Remote { url } => (url, None),
        ChromaTarget::Managed => {
            let dir = config.managed_chroma_dir();
            match crate::chroma::managed::running_server(&dir) {
                Some(url) => (url, None),
                None => {
                    if !dir.exists() {
                        anyhow::bail!(
                            "nothing is indexed yet: the agent's Chroma data directory {} does not exist. Fix: run the agent (`docusearch-agent run`) or `docusearch-agent index PATH` first, or set chroma.url",
                            dir.display()
                        );
                    }
                    let command =
                        crate::runtime_paths::find_chroma(config.chroma.command.as_deref())?;
                    // No agent runs (it would have left its server's port): start the server
                    // on the same data for this command only.
                    let server = ManagedChroma::start(&command, &dir).with_context(|| {
                        format!("starting a Chroma server on {}", dir.display())
                    })?;
                    (server.url(), Some(server))
                }
            }
        }
    };
    let client = ChromaClient::new(&url, &config.chroma)?;
    Ok(ReadConnection {
        client,
        url,
        _started: started,
    })
}
