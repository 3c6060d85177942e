//! The repository is self-contained: a plain clone has everything its tests, benchmarks,
//! examples and scripts read (the corpus and the real model config are in `tests/fixtures`).

use std::path::{Path, PathBuf};

/// The project's shared folder beside the checkout, which a clone does not have. Spelled in two
/// parts so that this file does not match itself.
const OUTSIDE: &str = concat!("..", "/shared");

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries {
        let path = e.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "__pycache__" || name == "target" || name.starts_with(".venv") {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn nothing_reads_the_shared_folder_outside_the_checkout() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["tests", "benches", "examples", "scripts", "src", ".ci"] {
        files_under(&root.join(dir), &mut files);
    }
    files.push(root.join("Makefile"));
    assert!(
        files.iter().any(|f| f.ends_with("tests/it/repo.rs")),
        "the walk sees the test files"
    );
    let needle = OUTSIDE.as_bytes();
    let offending: Vec<String> = files
        .iter()
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            bytes.windows(needle.len()).any(|w| w == needle)
        })
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        offending.is_empty(),
        "these files refer to {OUTSIDE}, which a clone of the repository does not have; use the copies in tests/fixtures (common::corpus(), common::fixture()) instead: {offending:?}"
    );
}
