//! The test harness: real prerequisites, found the way the agent finds them. A missing one fails
//! the test with the fix (run `scripts/setup`); nothing is silently skipped.
#![allow(dead_code)]

use std::path::PathBuf;

use docusearch_agent::chroma::managed::ManagedChroma;
use docusearch_agent::runtime_paths;

/// A real Chroma server on a free loopback port, with its data in a temporary directory.
/// Stopped (and its data removed) on drop.
pub struct TestChroma {
    pub server: ManagedChroma,
    pub dir: tempfile::TempDir,
}

impl TestChroma {
    pub fn url(&self) -> String {
        self.server.url()
    }
}

pub fn chroma_bin() -> PathBuf {
    runtime_paths::find_chroma(None)
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"))
}

pub fn start_chroma() -> TestChroma {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = ManagedChroma::start(&chroma_bin(), &dir.path().join("chroma"))
        .unwrap_or_else(|e| panic!("could not start a Chroma server for the test: {e}"));
    TestChroma { server, dir }
}

pub fn pdfium_path() -> PathBuf {
    runtime_paths::find_pdfium(None)
        .unwrap_or_else(|e| panic!("prerequisite missing for this test: {e}"))
}

/// `../shared/corpus`: real documents nobody on this project wrote.
pub fn corpus() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    assert!(
        dir.join("R-intro.pdf").is_file(),
        "the test corpus is missing: expected real documents in {} (the project's shared folder beside the checkout)",
        dir.display()
    );
    dir
}

/// `tests/fixtures/...`
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}
