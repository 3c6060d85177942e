//! The file-system source on real folders and real inotify/FSEvents events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use docusearch_agent::watch::{is_excluded_name, Filter, FsEvent, FsWatcher};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common::{canonical_tempdir, write_file};

/// Collects events until `done` says the expected ones are there (or fails after a generous
/// guard, so a missing event fails instead of hanging).
async fn collect_until(
    rx: &mut UnboundedReceiver<Vec<FsEvent>>,
    mut done: impl FnMut(&[FsEvent]) -> bool,
) -> Vec<FsEvent> {
    let mut all = Vec::new();
    let guard = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(guard);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                all.extend(batch.expect("watcher channel closed"));
                if done(&all) { return all; }
            }
            _ = &mut guard => panic!("expected events did not arrive; got {all:?}"),
        }
    }
}

/// Whatever else arrives within a quiet period (used to check that nothing more came).
async fn drain(rx: &mut UnboundedReceiver<Vec<FsEvent>>, quiet: Duration) -> Vec<FsEvent> {
    let mut all = Vec::new();
    while let Ok(Some(batch)) = tokio::time::timeout(quiet, rx.recv()).await {
        all.extend(batch);
    }
    all
}

fn watcher(
    root: &Path,
    include: &[&str],
    exclude: &[&str],
) -> (Filter, FsWatcher, UnboundedReceiver<Vec<FsEvent>>) {
    let inc: Vec<String> = include.iter().map(|s| s.to_string()).collect();
    let exc: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
    let filter = Filter::new(&[root.to_path_buf()], &inc, &exc).expect("filter");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let w =
        FsWatcher::start(filter.clone(), Duration::from_millis(100), tx).expect("watcher starts");
    (filter, w, rx)
}

#[test]
fn fixed_exclusion_rules() {
    for (name, dir, excluded) in [
        ("report.pdf", false, false),
        (".hidden.pdf", false, true),
        ("report.pdf.part", false, true),
        ("report.pdf.crdownload", false, true),
        ("x.tmp", false, true),
        ("~$report.docx", false, true),
        (".DS_Store", false, true),
        (".report.pdf.swp", false, true),
        ("report.pdf~", false, true),
        ("archive.noindex", true, true),
        ("archive.noindex", false, false),
        (".git", true, true),
        ("papers", true, false),
    ] {
        assert_eq!(
            is_excluded_name(name.as_ref(), dir),
            excluded,
            "{name} (dir: {dir})"
        );
    }
}

#[test]
fn scan_applies_every_rule_and_stays_inside() {
    let (_t, root) = canonical_tempdir();
    let (_o, outside) = canonical_tempdir();
    write_file(&root.join("a.pdf"), b"a");
    write_file(&root.join("notes.md"), b"n");
    write_file(&root.join("unsupported.xyz"), b"x");
    write_file(&root.join(".hidden/b.pdf"), b"b");
    write_file(&root.join("old.noindex/c.pdf"), b"c");
    write_file(&root.join("dl/d.pdf.part"), b"d");
    write_file(&root.join("dl/~$e.docx"), b"e");
    write_file(&root.join("drafts/f.pdf"), b"f");
    write_file(&root.join("sub/g.pdf"), b"g");
    write_file(&root.join("sub/h.pdf"), b"h");
    write_file(&root.join("sub/keep/i.pdf"), b"i");
    write_file(&root.join("sub/.docusearchignore"), b"h.pdf\nkeep/\n");
    write_file(&outside.join("secret.pdf"), b"s");
    std::os::unix::fs::symlink(&outside, root.join("link-out")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("secret.pdf"), root.join("secret-link.pdf"))
        .expect("symlink");

    let filter =
        Filter::new(std::slice::from_ref(&root), &[], &["drafts/**".to_string()]).expect("filter");
    let mut got: Vec<PathBuf> = filter
        .scan(&root)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(&root).expect("inside").to_path_buf())
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            PathBuf::from("a.pdf"),
            PathBuf::from("notes.md"),
            PathBuf::from("sub/g.pdf")
        ]
    );

    // The same rules answer for single paths (what events are judged by).
    assert!(filter.accepts_file(&root.join("sub/g.pdf")));
    assert!(!filter.accepts_file(&root.join("sub/h.pdf")));
    assert!(!filter.accepts_file(&root.join("sub/keep/i.pdf")));
    assert!(!filter.accepts_file(&root.join("drafts/f.pdf")));
    assert!(!filter.accepts_file(&outside.join("secret.pdf")));

    // Include globs narrow the set.
    let only_pdf =
        Filter::new(std::slice::from_ref(&root), &["**/*.pdf".to_string()], &[]).expect("filter");
    let got: Vec<PathBuf> = only_pdf.scan(&root).into_iter().map(|(p, _)| p).collect();
    assert!(got.contains(&root.join("a.pdf")));
    assert!(!got.contains(&root.join("notes.md")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_written_renamed_and_removed_files_become_our_events() {
    let (_t, root) = canonical_tempdir();
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);

    let a = root.join("a.pdf");
    write_file(&a, b"%PDF-1.4 first");
    // Written and closed: a change, then the news that its writer is done with it.
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::Written(a.clone()))).await;
    assert!(ev.iter().all(|e| is_change_of(e, &a)), "{ev:?}");

    // Reading a file is not a change.
    let _ = std::fs::read(&a).expect("read");
    let quiet = drain(&mut rx, Duration::from_millis(600)).await;
    assert!(quiet.is_empty(), "reading produced events: {quiet:?}");

    let b = root.join("b.pdf");
    std::fs::rename(&a, &b).expect("rename");
    let ev = collect_until(&mut rx, |e| {
        e.iter().any(|x| matches!(x, FsEvent::Renamed { .. }))
    })
    .await;
    assert!(
        ev.contains(&FsEvent::Renamed {
            from: a.clone(),
            to: b.clone()
        }),
        "{ev:?}"
    );

    std::fs::remove_file(&b).expect("remove");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::Removed(b.clone()))).await;
    assert!(
        !ev.iter()
            .any(|x| matches!(x, FsEvent::Changed(_) | FsEvent::Written(_))),
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_reported_written_only_once_its_writer_closes_it() {
    use std::io::Write;
    let (_t, root) = canonical_tempdir();
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);
    let a = root.join("a.pdf");
    let mut file = std::fs::File::create(&a).expect("create");
    file.write_all(b"%PDF-1.4 half").expect("write");
    file.flush().expect("flush");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::Changed(a.clone()))).await;
    let ev = [ev, drain(&mut rx, Duration::from_millis(600)).await].concat();
    assert!(
        !ev.contains(&FsEvent::Written(a.clone())),
        "still open for writing: {ev:?}"
    );
    file.write_all(b" and the rest").expect("write");
    drop(file);
    collect_until(&mut rx, |e| e.contains(&FsEvent::Written(a.clone()))).await;

    // Moved in from outside: whole.
    let (_o, outside) = canonical_tempdir();
    write_file(&outside.join("b.pdf"), b"b");
    let b = root.join("b.pdf");
    std::fs::rename(outside.join("b.pdf"), &b).expect("move in");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Written(b.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_save_is_a_change_of_the_saved_path() {
    let (_t, root) = canonical_tempdir();
    let doc = root.join("doc.pdf");
    write_file(&doc, b"version 1");
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);

    // What editors do: write a temporary file, then rename it over the original.
    let tmp = root.join(".doc.pdf.tmp");
    write_file(&tmp, b"version 2");
    std::fs::rename(&tmp, &doc).expect("rename over");
    let ev = collect_until(&mut rx, |e| e.iter().any(|x| is_change_of(x, &doc))).await;
    let ev = [ev, drain(&mut rx, Duration::from_millis(600)).await].concat();
    assert!(
        ev.iter().all(|e| is_change_of(e, &doc)),
        "an atomic save must read as a change of {}: {ev:?}",
        doc.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_names_produce_no_changes() {
    let (_t, root) = canonical_tempdir();
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);
    write_file(&root.join("big.pdf.part"), b"partial");
    write_file(&root.join(".hidden.pdf"), b"h");
    write_file(&root.join("x.noindex/y.pdf"), b"y");
    write_file(&root.join("unsupported.xyz"), b"z");
    let marker = root.join("marker.pdf");
    write_file(&marker, b"m");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::Written(marker.clone()))).await;
    let ev = [ev, drain(&mut rx, Duration::from_millis(600)).await].concat();
    let changed: Vec<&FsEvent> = ev
        .iter()
        .filter(|e| matches!(e, FsEvent::Changed(_) | FsEvent::Written(_)))
        .collect();
    assert!(
        !changed.is_empty() && changed.iter().all(|e| is_change_of(e, &marker)),
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_folder_and_moving_one_in() {
    let (_t, root) = canonical_tempdir();
    let (_o, outside) = canonical_tempdir();
    let sub = root.join("sub");
    write_file(&sub.join("a.pdf"), b"a");
    write_file(&sub.join("deeper/b.pdf"), b"b");
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);

    std::fs::remove_dir_all(&sub).expect("rm -r");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::Removed(sub.clone()))).await;
    assert!(
        !ev.iter().any(|x| matches!(x, FsEvent::Changed(_))),
        "{ev:?}"
    );

    // A folder moved in from outside arrives as one event: it must be rescanned.
    write_file(&outside.join("batch/c.pdf"), b"c");
    let moved_in = root.join("batch");
    std::fs::rename(outside.join("batch"), &moved_in).expect("move in");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Rescan(moved_in.clone()))).await;

    // Moved out of the watched folder: gone.
    let c = moved_in.join("c.pdf");
    std::fs::rename(&c, outside.join("c.pdf")).expect("move out");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Removed(c.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_an_ignore_file_rescans_its_folder() {
    let (_t, root) = canonical_tempdir();
    write_file(&root.join("sub/a.pdf"), b"a");
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);
    write_file(&root.join("sub/.docusearchignore"), b"a.pdf\n");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Rescan(root.join("sub")))).await;
}

/// Whether an event says that the file `path` changed (or was closed by its writer).
fn is_change_of(e: &FsEvent, path: &Path) -> bool {
    matches!(e, FsEvent::Changed(p) | FsEvent::Written(p) if p == path)
}

/// Whether an event is about `path` or something under it.
fn mentions(e: &FsEvent, path: &Path) -> bool {
    match e {
        FsEvent::Changed(p)
        | FsEvent::Written(p)
        | FsEvent::Removed(p)
        | FsEvent::Rescan(p)
        | FsEvent::RootGone(p)
        | FsEvent::RootBack(p) => p.starts_with(path),
        FsEvent::Renamed { from, to } => from.starts_with(path) || to.starts_with(path),
        FsEvent::Polling(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_deleted_and_recreated_is_watched_again() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("docs");
    write_file(&root.join("a.pdf"), b"a");
    let (_f, w, mut rx) = watcher(&root, &[], &[]);
    assert!(w.missing_at_start().is_empty());

    std::fs::remove_dir_all(&root).expect("rm -r the watched folder");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::RootGone(root.clone()))).await;
    assert!(
        !ev.contains(&FsEvent::Removed(root.clone())),
        "the folder itself is not a removal of its files: {ev:?}"
    );

    std::fs::create_dir(&root).expect("mkdir it again");
    collect_until(&mut rx, |e| e.contains(&FsEvent::RootBack(root.clone()))).await;
    let after = root.join("after.pdf");
    write_file(&after, b"written after it came back");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Changed(after.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_missing_at_start_is_watched_once_it_appears() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("not-mounted-yet");
    let (filter, w, mut rx) = watcher(&root, &[], &[]);
    assert_eq!(filter.roots(), std::slice::from_ref(&root));
    assert_eq!(w.missing_at_start(), std::slice::from_ref(&root));

    write_file(&root.join("sub/first.pdf"), b"first");
    collect_until(&mut rx, |e| e.contains(&FsEvent::RootBack(root.clone()))).await;
    let second = root.join("sub/second.pdf");
    write_file(&second, b"second");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Changed(second.clone()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_moved_away_is_not_followed_and_is_watched_again_when_back() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("docs");
    write_file(&root.join("sub/a.pdf"), b"a");
    let (_f, _w, mut rx) = watcher(&root, &[], &[]);

    let away = parent.join("docs.away");
    std::fs::rename(&root, &away).expect("move the watched folder away");
    collect_until(&mut rx, |e| e.contains(&FsEvent::RootGone(root.clone()))).await;
    // The old watch would report this under the old name; it is gone with the folder.
    write_file(&away.join("sub/stray.pdf"), b"written while away");

    std::fs::rename(&away, &root).expect("move it back");
    let ev = collect_until(&mut rx, |e| e.contains(&FsEvent::RootBack(root.clone()))).await;
    assert!(
        !ev.iter().any(|e| mentions(e, &root.join("sub/stray.pdf"))),
        "{ev:?}"
    );
    let after = root.join("sub/after.pdf");
    write_file(&after, b"after");
    collect_until(&mut rx, |e| e.contains(&FsEvent::Changed(after.clone()))).await;
}
