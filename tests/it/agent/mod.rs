//! The agent: changes on disk become the right jobs (reconcile and live events), on real
//! folders with real file-system events and a real sled store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use docusearch_agent::agent::changes::ChangeTracker;
use docusearch_agent::state::{FileRecord, FileStamp, Job, JobKind, Store};
use docusearch_agent::types::{ContentHash, DocId, SCHEMA_VERSION};
use docusearch_agent::watch::{Filter, FsWatcher};

use crate::common::{canonical_tempdir, write_file};

fn tracker(root: &Path, store: &Store) -> ChangeTracker {
    ChangeTracker {
        store: store.clone(),
        filter: Filter::new(&[root.to_path_buf()], &[], &[]).expect("filter"),
        settle: Duration::from_millis(200),
        check: Duration::from_millis(200),
        model: "tiny".into(),
        telemetry: std::sync::Arc::new(docusearch_agent::telemetry::Telemetry::new("tiny")),
    }
}

/// What the pipeline records once a file's records are in Chroma.
fn mark_indexed(store: &Store, path: &Path) {
    let rec = FileRecord {
        stamp: FileStamp::of_path(path).expect("file exists"),
        content_hash: ContentHash::of_file(path).expect("hash"),
        doc_id: DocId::new("test", path),
        num_pages: 1,
        num_chunks: 1,
        model: "tiny".into(),
        schema_version: SCHEMA_VERSION,
        indexed_at: None,
        last_error: None,
    };
    store.put_file(path, &rec).expect("put");
}

fn jobs(store: &Store) -> Vec<JobKind> {
    let mut v: Vec<JobKind> = store
        .all_jobs()
        .expect("jobs")
        .into_iter()
        .map(|(_, j): (PathBuf, Job)| j.kind)
        .collect();
    v.sort_by(|a, b| a.path().cmp(b.path()));
    v
}

fn drain_jobs(store: &Store) {
    for (p, j) in store.all_jobs().expect("jobs") {
        if let JobKind::Index { .. } = j.kind {
            mark_indexed(store, &p);
        }
    }
    while let Some(j) = store.take_due(u64::MAX).expect("take") {
        store.complete(&j).expect("complete");
    }
}

#[test]
fn reconcile_at_start_catches_up_what_happened_while_stopped() {
    let (_t, root) = canonical_tempdir();
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    for name in [
        "a.pdf",
        "b.pdf",
        "c.pdf",
        "same.pdf",
        "sub/u.pdf",
        "gone/deep/g.pdf",
    ] {
        write_file(&root.join(name), format!("content of {name}").as_bytes());
    }
    let r = t.reconcile_all().expect("reconcile");
    assert_eq!((r.scanned, r.new, r.hashed), (6, 6, 0));
    drain_jobs(&store);

    // Nothing changed: nothing is read, nothing queued.
    let r = t.reconcile_all().expect("reconcile");
    assert_eq!((r.unchanged, r.hashed), (6, 0));
    assert!(jobs(&store).is_empty());

    // While stopped: an edit, a deletion, a rename, a new file, a touch with the same bytes,
    // a folder deleted whole.
    write_file(&root.join("a.pdf"), b"new content of a.pdf, longer");
    std::fs::remove_file(root.join("b.pdf")).expect("rm");
    std::fs::remove_dir_all(root.join("gone")).expect("rm -r");
    std::fs::rename(root.join("c.pdf"), root.join("sub/c-renamed.pdf")).expect("mv");
    write_file(&root.join("e.pdf"), b"brand new");
    let same = root.join("same.pdf");
    let f = std::fs::File::options()
        .write(true)
        .open(&same)
        .expect("open");
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .expect("touch");
    drop(f);

    drop(t);
    drop(store);
    let store = Store::open(state.path()).expect("reopen");
    let t = tracker(&root, &store);
    let r = t.reconcile_all().expect("reconcile");
    assert_eq!(
        (r.unchanged, r.touched, r.changed, r.new, r.moved, r.deleted),
        (1, 1, 1, 1, 1, 2),
        "{r:?}"
    );
    assert_eq!(
        jobs(&store),
        vec![
            JobKind::Index {
                path: root.join("a.pdf")
            },
            JobKind::Delete {
                path: root.join("b.pdf")
            },
            JobKind::Index {
                path: root.join("e.pdf")
            },
            JobKind::Delete {
                path: root.join("gone/deep/g.pdf")
            },
            JobKind::Move {
                from: root.join("c.pdf"),
                to: root.join("sub/c-renamed.pdf")
            },
        ]
    );
    // The touched file's new mtime is remembered, so the next start does not hash it again.
    let r = t.reconcile_all().expect("reconcile");
    assert_eq!(r.hashed, 0, "{r:?}");
}

#[test]
fn an_ignore_file_or_a_noindex_rename_removes_what_it_now_excludes() {
    let (_t, root) = canonical_tempdir();
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    write_file(&root.join("keep.pdf"), b"k");
    write_file(&root.join("private/x.pdf"), b"x");
    t.reconcile_all().expect("reconcile");
    drain_jobs(&store);
    write_file(&root.join(".docusearchignore"), b"private/\n");
    t.reconcile_all().expect("reconcile");
    assert_eq!(
        jobs(&store),
        vec![JobKind::Delete {
            path: root.join("private/x.pdf")
        }]
    );
}

/// Runs the watcher into the tracker until dropped.
struct Live {
    _watcher: FsWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn live(t: &ChangeTracker) -> Live {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let w = FsWatcher::start(t.filter.clone(), Duration::from_millis(100), tx).expect("watcher");
    let t = t.clone();
    let task = tokio::spawn(async move {
        while let Some(batch) = rx.recv().await {
            for e in batch {
                t.apply(e).expect("apply event");
            }
        }
    });
    Live { _watcher: w, task }
}

/// Waits (with a generous guard) until the jobs are exactly `want`.
async fn until_jobs(store: &Store, want: Vec<JobKind>) {
    for _ in 0..200 {
        if jobs(store) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(jobs(store), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_become_jobs() {
    let (_t, root) = canonical_tempdir();
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    for name in ["a.pdf", "dir/b.pdf", "dir/deep/c.pdf", "d.pdf"] {
        write_file(&root.join(name), name.as_bytes());
    }
    t.reconcile_all().expect("reconcile");
    drain_jobs(&store);
    let _live = live(&t);

    // Renamed: a move (the records are re-keyed, not re-embedded).
    std::fs::rename(root.join("a.pdf"), root.join("renamed.pdf")).expect("mv");
    until_jobs(
        &store,
        vec![JobKind::Move {
            from: root.join("a.pdf"),
            to: root.join("renamed.pdf"),
        }],
    )
    .await;
    drain_jobs(&store);
    store
        .remove_file(&root.join("a.pdf"))
        .expect("as the pipeline does");
    mark_indexed(&store, &root.join("renamed.pdf"));

    // rm -r: every document under the folder goes.
    std::fs::remove_dir_all(root.join("dir")).expect("rm -r");
    until_jobs(
        &store,
        vec![
            JobKind::Delete {
                path: root.join("dir/b.pdf"),
            },
            JobKind::Delete {
                path: root.join("dir/deep/c.pdf"),
            },
        ],
    )
    .await;
    drain_jobs(&store);
    store
        .remove_file(&root.join("dir/b.pdf"))
        .expect("as the pipeline does");
    store
        .remove_file(&root.join("dir/deep/c.pdf"))
        .expect("as the pipeline does");

    // Atomic save over a known file: one change of that file.
    let tmp = root.join(".d.pdf.swp");
    write_file(&tmp, b"saved again");
    std::fs::rename(&tmp, root.join("d.pdf")).expect("rename over");
    until_jobs(
        &store,
        vec![JobKind::Index {
            path: root.join("d.pdf"),
        }],
    )
    .await;
    drain_jobs(&store);

    // Moved out of the watched folder: deleted.
    let (_o, outside) = canonical_tempdir();
    std::fs::rename(root.join("renamed.pdf"), outside.join("renamed.pdf")).expect("mv out");
    until_jobs(
        &store,
        vec![JobKind::Delete {
            path: root.join("renamed.pdf"),
        }],
    )
    .await;
}
mod failures;
mod faults;
pub(crate) mod pipeline;
mod telemetry;

/// A watched folder deleted and created again is watched again: what it holds when it is
/// back is compared with the store, and a file written into it afterwards becomes a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_deleted_and_recreated_is_watched_again() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("docs");
    write_file(&root.join("old.pdf"), b"old");
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    t.reconcile_all().expect("reconcile");
    drain_jobs(&store);
    let _live = live(&t);

    std::fs::remove_dir_all(&root).expect("rm -r the watched folder");
    write_file(&root.join("back.pdf"), b"back");
    // Its old file went with it; the new folder's file is found.
    until_jobs(
        &store,
        vec![
            JobKind::Index {
                path: root.join("back.pdf"),
            },
            JobKind::Delete {
                path: root.join("old.pdf"),
            },
        ],
    )
    .await;
    drain_jobs(&store);
    store
        .remove_file(&root.join("old.pdf"))
        .expect("as the pipeline does");

    // Watched again: a file written now is seen.
    write_file(&root.join("after.pdf"), b"after");
    until_jobs(
        &store,
        vec![JobKind::Index {
            path: root.join("after.pdf"),
        }],
    )
    .await;
}

/// A watched folder that does not exist at start (a disk not mounted yet) is watched from the
/// moment it appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_missing_at_start_is_watched_once_it_appears() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("not-mounted-yet");
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    assert_eq!(
        t.reconcile_all().expect("a missing folder is no error"),
        Default::default()
    );
    let _live = live(&t);

    write_file(&root.join("first.pdf"), b"first");
    until_jobs(
        &store,
        vec![JobKind::Index {
            path: root.join("first.pdf"),
        }],
    )
    .await;
    drain_jobs(&store);
    write_file(&root.join("sub/second.pdf"), b"second");
    until_jobs(
        &store,
        vec![JobKind::Index {
            path: root.join("sub/second.pdf"),
        }],
    )
    .await;
}

/// A watched folder that goes away as a whole (an unmounted disk, a folder moved off) keeps its
/// files' entries while it is missing, and nothing is re-queued when it comes back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_moved_away_keeps_its_files_until_it_is_back() {
    let (_t, parent) = canonical_tempdir();
    let root = parent.join("docs");
    write_file(&root.join("a.pdf"), b"a");
    write_file(&root.join("sub/b.pdf"), b"b");
    let state = tempfile::tempdir().expect("state dir");
    let store = Store::open(state.path()).expect("store");
    let t = tracker(&root, &store);
    t.reconcile_all().expect("reconcile");
    drain_jobs(&store);
    let _live = live(&t);

    let away = parent.join("docs.away");
    std::fs::rename(&root, &away).expect("move the watched folder away");
    // A reconcile while it is missing (the periodic one, `POST /rescan`) deletes nothing.
    t.reconcile_all().expect("reconcile");
    assert_eq!(jobs(&store), vec![]);

    std::fs::rename(&away, &root).expect("move it back");
    write_file(&root.join("new.pdf"), b"new");
    until_jobs(
        &store,
        vec![JobKind::Index {
            path: root.join("new.pdf"),
        }],
    )
    .await;
    assert!(store.file(&root.join("a.pdf")).expect("file").is_some());
    assert!(store.file(&root.join("sub/b.pdf")).expect("file").is_some());
}
