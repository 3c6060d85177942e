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

/// The library's top-level modules (`src/X.rs`, `src/X/…`) and which others each one names
/// (`crate::Y`), comments left out. The command layer (`src/cmd/`, `src/main.rs`) is in the
/// binary: the compiler already keeps the library from naming it.
fn library_imports(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    files_under(src, &mut files);
    let mut edges: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
    {
        let rel = f.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a path");
        let top = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if ["cmd", "main", "lib"].contains(&top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("source");
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = edges.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
        // `use crate::{a::X, b::Y}`
        for (i, _) in code.match_indices("crate::{") {
            let group = &code[i + "crate::{".len()..];
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for part in group.split(',') {
                let name = part
                    .trim()
                    .split("::")
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                if !name.is_empty() && name != top && name != "self" {
                    deps.insert(name);
                }
            }
        }
    }
    edges
}

#[test]
fn no_import_circle_among_the_library_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = library_imports(&src);
    assert!(
        edges.contains_key("agent") && edges["agent"].contains("state"),
        "{edges:?}"
    );
    assert!(
        !edges.contains_key("cmd"),
        "the command layer is not part of the library"
    );
    // A circle is a module that reaches itself.
    for start in edges.keys() {
        let mut stack: Vec<Vec<&String>> = vec![vec![start]];
        while let Some(path) = stack.pop() {
            let last = *path.last().expect("non-empty");
            for next in edges.get(last).into_iter().flatten() {
                assert!(
                    next != start,
                    "import circle: {} → {start}",
                    path.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(" → ")
                );
                if !path.contains(&next) {
                    let mut p = path.clone();
                    p.push(next);
                    stack.push(p);
                }
            }
        }
    }
}

#[test]
fn the_library_does_not_know_the_command_line() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    assert!(
        !lib.contains("mod cmd"),
        "the command layer is declared by main.rs only"
    );
    let main = std::fs::read_to_string(src.join("main.rs")).expect("main.rs");
    assert!(
        main.contains("mod cmd;"),
        "main.rs declares the command layer"
    );
    for (module, deps) in library_imports(&src) {
        assert!(
            !deps.contains("cmd") && !deps.contains("cli"),
            "{module} imports the command line"
        );
    }
}
