//! The sled store, on disk, across "restarts" (close and reopen).

use std::path::{Path, PathBuf};
use std::time::Duration;

use docusearch_agent::state::{
    now_ms, FileRecord, FileStamp, Job, JobKind, JobState, KnownFile, RetryPolicy, Store,
    StoreError,
};
use docusearch_agent::types::{ContentHash, DocId, SCHEMA_VERSION};

fn p(s: &str) -> PathBuf {
    PathBuf::from("/watched").join(s)
}

fn index(s: &str) -> JobKind {
    JobKind::Index { path: p(s) }
}

fn record(path: &Path, content: &[u8]) -> FileRecord {
    FileRecord {
        stamp: FileStamp {
            size: content.len() as u64,
            mtime_ns: 1,
        },
        content_hash: ContentHash::of_bytes(content),
        doc_id: DocId::new("test", path),
        num_pages: 3,
        num_chunks: 2,
        model: "m".into(),
        schema_version: SCHEMA_VERSION,
        indexed_at: None,
        last_error: None,
    }
}

const POLICY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    base: Duration::from_secs(10),
};

#[test]
fn one_job_per_path_and_the_latest_event_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    store
        .enqueue(JobKind::Delete { path: p("a.pdf") }, None, Duration::ZERO)
        .expect("enqueue");
    let jobs = store.all_jobs().expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].1.kind, JobKind::Delete { path: p("a.pdf") });

    // A change of a file whose move is queued keeps the move (the re-key comes first).
    store
        .put_file(&p("old.pdf"), &record(&p("old.pdf"), b"x"))
        .expect("put");
    store
        .enqueue(
            JobKind::Move {
                from: p("old.pdf"),
                to: p("new.pdf"),
            },
            None,
            Duration::ZERO,
        )
        .expect("enqueue");
    store
        .enqueue(index("new.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    assert!(matches!(
        store.job(&p("new.pdf")).expect("job").map(|j| j.kind),
        Some(JobKind::Move { .. })
    ));

    // Deleting it then deletes what the old path holds.
    store
        .enqueue(JobKind::Delete { path: p("new.pdf") }, None, Duration::ZERO)
        .expect("enqueue");
    assert_eq!(
        store.job(&p("old.pdf")).expect("job").map(|j| j.kind),
        Some(JobKind::Delete { path: p("old.pdf") })
    );
    assert_eq!(
        store.job(&p("new.pdf")).expect("job").map(|j| j.kind),
        Some(JobKind::Delete { path: p("new.pdf") })
    );
}

#[test]
fn a_move_takes_over_the_job_of_the_moved_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    store
        .enqueue(
            JobKind::Move {
                from: p("a.pdf"),
                to: p("b.pdf"),
            },
            None,
            Duration::ZERO,
        )
        .expect("enqueue");
    let jobs = store.all_jobs().expect("jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].0, p("b.pdf"));
}

#[test]
fn due_order_settle_delay_and_take() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .enqueue(index("late.pdf"), None, Duration::from_secs(3600))
        .expect("enqueue");
    store
        .enqueue(index("now.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let job = store.take_due(now_ms()).expect("take").expect("a due job");
    assert_eq!(job.kind, index("now.pdf"));
    assert_eq!(job.state, JobState::InProgress);
    assert!(
        store.take_due(now_ms()).expect("take").is_none(),
        "the other one is not due"
    );
    let next = store.next_due_ms().expect("one queued");
    assert!(next >= now_ms() + 3_000_000);
}

#[test]
fn an_event_during_processing_runs_again_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let job = store.take_due(now_ms()).expect("take").expect("job");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue while running");
    assert!(
        store.take_due(now_ms()).expect("take").is_none(),
        "never two jobs on one path at once"
    );
    store.complete(&job).expect("complete");
    let again = store
        .take_due(now_ms())
        .expect("take")
        .expect("queued again");
    assert_eq!(again.kind, index("a.pdf"));
    store.complete(&again).expect("complete");
    assert!(
        store.all_jobs().expect("jobs").is_empty(),
        "done jobs leave the queue"
    );
}

#[test]
fn failures_back_off_then_fail_with_their_reason_and_are_retried_on_change_or_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");

    let before = now_ms();
    let job = store.take_due(now_ms()).expect("take").expect("job");
    assert_eq!(
        store
            .fail(&job, "server down", false, POLICY)
            .expect("fail"),
        JobState::Queued
    );
    let j = store.job(&p("a.pdf")).expect("job").expect("kept");
    assert_eq!(j.attempts, 1);
    assert!(
        j.due_ms >= before + 10_000,
        "first retry after the base delay"
    );
    assert_eq!(POLICY.delay(2), Duration::from_secs(20));
    assert_eq!(POLICY.delay(3), Duration::from_secs(40));

    // Make it due and fail it until the attempts run out.
    for attempt in 2..=3 {
        store.enqueue(index("a.pdf"), None, Duration::ZERO).ok();
        let j = store.job(&p("a.pdf")).expect("job").expect("kept");
        // A queued job merged with an identical event keeps its back-off.
        assert!(j.due_ms > now_ms());
        let job = store.take_due(j.due_ms).expect("take").expect("job");
        let state = store
            .fail(&job, &format!("server down #{attempt}"), false, POLICY)
            .expect("fail");
        assert_eq!(
            state,
            if attempt == 3 {
                JobState::Failed
            } else {
                JobState::Queued
            }
        );
    }
    assert_eq!(
        store.failures().expect("failures"),
        vec![(p("a.pdf"), "server down #3".to_string())]
    );
    assert_eq!(store.queue_counts().expect("counts").failed, 1);
    assert!(
        store.take_due(u64::MAX).expect("take").is_none(),
        "failed jobs are not taken"
    );

    // The file changes: a fresh job.
    store
        .enqueue(index("a.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let j = store.job(&p("a.pdf")).expect("job").expect("job");
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0));

    // A permanent failure fails at once; `repair` retries it.
    let job = store.take_due(now_ms()).expect("take").expect("job");
    assert_eq!(
        store.fail(&job, "not a PDF", true, POLICY).expect("fail"),
        JobState::Failed
    );
    assert_eq!(store.retry_failed().expect("retry"), 1);
    assert!(store.take_due(now_ms()).expect("take").is_some());
}

#[test]
fn jobs_in_progress_at_a_crash_are_queued_again_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("open");
        store
            .enqueue(index("a.pdf"), None, Duration::ZERO)
            .expect("enqueue");
        store
            .enqueue(index("b.pdf"), None, Duration::ZERO)
            .expect("enqueue");
        let _running = store.take_due(now_ms()).expect("take").expect("job");
        store.flush().expect("flush");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let c = store.queue_counts().expect("counts");
    assert_eq!((c.queued, c.in_progress), (2, 0));
    let mut taken = vec![];
    while let Some(j) = store.take_due(now_ms()).expect("take") {
        taken.push(j.kind.path().to_path_buf());
    }
    taken.sort();
    assert_eq!(taken, vec![p("a.pdf"), p("b.pdf")]);
}

#[test]
fn file_records_prefix_listing_and_content_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    for (name, content) in [
        ("a/x.pdf", b"one"),
        ("a/y.pdf", b"two"),
        ("ab/z.pdf", b"one"),
    ] {
        store
            .put_file(&p(name), &record(&p(name), content))
            .expect("put");
    }
    let under_a: Vec<PathBuf> = store
        .files_under(&p("a"))
        .expect("list")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        under_a,
        vec![p("a/x.pdf"), p("a/y.pdf")],
        "a/ must not match ab/"
    );
    let mut same = store
        .paths_with_hash(&ContentHash::of_bytes(b"one"))
        .expect("hash");
    same.sort();
    assert_eq!(same, vec![p("a/x.pdf"), p("ab/z.pdf")]);

    // What a reconcile reads of each record: stamp, and whether this model embedded it; the
    // records of subfolders the walk reads itself are jumped over, the others listed whole.
    let mut other = record(&p("a/y.pdf"), b"two");
    other.model = "another model".into();
    store.put_file(&p("a/y.pdf"), &other).expect("put");
    let names = [
        "a/b/in-walked.pdf",
        "a/c/d/in-unwalked.pdf",
        "a/c0.pdf",
        "a/e/f.pdf",
        "a/e0.pdf",
    ];
    for name in names {
        store
            .put_file(&p(name), &record(&p(name), b"four"))
            .expect("put");
    }
    let mut seen = Vec::new();
    store
        .records_in_folder(&p("a"), &["b".into(), "e".into()], "m", |known| {
            seen.push(format!("{known:?}"))
        })
        .expect("records");
    let direct = |name: &str, stamp: FileStamp, same_model: bool| {
        format!(
            "{:?}",
            KnownFile::Direct {
                name,
                stamp,
                same_model
            }
        )
    };
    assert_eq!(
        seen,
        vec![
            format!("{:?}", KnownFile::Below(p("a/c/d/in-unwalked.pdf"))),
            direct("c0.pdf", record(&p("a/c0.pdf"), b"four").stamp, true),
            // Right where the jump over `a/e/` lands.
            direct("e0.pdf", record(&p("a/e0.pdf"), b"four").stamp, true),
            direct("x.pdf", record(&p("a/x.pdf"), b"one").stamp, true),
            direct("y.pdf", other.stamp, false),
        ]
    );
    for name in names {
        store.remove_file(&p(name)).expect("remove");
    }

    // New content replaces the old hash entry; removal drops it.
    store
        .put_file(&p("a/x.pdf"), &record(&p("a/x.pdf"), b"three"))
        .expect("put");
    assert_eq!(
        store
            .paths_with_hash(&ContentHash::of_bytes(b"one"))
            .expect("hash"),
        vec![p("ab/z.pdf")]
    );
    store.remove_file(&p("ab/z.pdf")).expect("remove");
    assert!(store
        .paths_with_hash(&ContentHash::of_bytes(b"one"))
        .expect("hash")
        .is_empty());

    let counts = store.file_counts().expect("counts");
    assert_eq!((counts.indexed, counts.pages, counts.chunks), (2, 6, 4));
}

#[test]
fn one_process_owns_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path()).expect("open");
    match Store::open(dir.path()) {
        Err(StoreError::Locked { .. }) => {}
        Err(e) => panic!("expected a lock error, got {e}"),
        Ok(_) => panic!("a second open of a locked store succeeded"),
    }
}

// ---- a store written by an earlier release ----

/// A state store as release 1 (store format version 1) wrote it; see its README.
fn fixture_v1() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-store-v1/state.sled")
}

/// The file records the version-1 fixture holds, by path.
fn v1_files() -> Vec<(PathBuf, FileRecord)> {
    let indexed = |name: &str, content: &[u8], size, pages, chunks| {
        let path = p(name);
        let rec = FileRecord {
            stamp: FileStamp {
                size,
                mtime_ns: 1_717_236_000_123_456_789,
            },
            content_hash: ContentHash::of_bytes(content),
            doc_id: DocId::new("fixture-host", &path),
            num_pages: pages,
            num_chunks: chunks,
            model: "vidore/colpali-v1.2-merged".into(),
            schema_version: 1,
            indexed_at: Some("2024-06-01T10:00:00Z".into()),
            last_error: None,
        };
        (path, rec)
    };
    let mut files = vec![
        indexed("report.pdf", b"report", 482_113, 12, 31),
        // A copy: two paths under one content hash.
        indexed("archive/report copy.pdf", b"report", 482_113, 12, 31),
        indexed("scan.png", b"scan", 90_210, 1, 0),
        indexed("notes.md", b"notes", 2_048, 1, 3),
        indexed("Überblick 2024.pdf", b"overview", 1_000_000, 40, 120),
    ];
    let (path, mut broken) = indexed("broken.pdf", b"broken", 17, 0, 0);
    broken.indexed_at = None;
    broken.last_error = Some("not a PDF: PDFium could not open it — check the file".into());
    files.push((path, broken));
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// Writes a store the way the version-1 fixture was written (by release 1): the files of
/// [`v1_files`] and one job in each state, through the public API.
fn write_v1_store(out: &Path) -> Store {
    assert!(!out.exists(), "{} exists: remove it first", out.display());
    let store = Store::open(out).expect("open");
    for (path, rec) in v1_files() {
        store.put_file(&path, &rec).expect("put");
    }
    store
        .enqueue(index("broken.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let job = store.take_due(now_ms()).expect("take").expect("job");
    let reason = "not a PDF: PDFium could not open it — check the file";
    store.fail(&job, reason, true, POLICY).expect("fail");
    store
        .enqueue(index("big.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let _in_progress = store.take_due(now_ms()).expect("take").expect("job");
    let seen = FileStamp {
        size: 4_096,
        mtime_ns: 1_717_236_100_000_000_000,
    };
    store
        .enqueue(index("new.pdf"), Some(seen), Duration::from_secs(2))
        .expect("enqueue");
    store
        .enqueue(
            JobKind::Delete {
                path: p("gone.pdf"),
            },
            None,
            Duration::from_secs(4),
        )
        .expect("enqueue");
    let moved = JobKind::Move {
        from: p("old name.pdf"),
        to: p("new name.pdf"),
    };
    store
        .enqueue(moved, None, Duration::from_secs(4))
        .expect("enqueue");
    store.flush().expect("flush");
    store
}

/// The fixture holds what the writer writes (and `STATE_STORE_FIXTURE=DIR` writes a new one
/// there, printing its jobs, whose sequence numbers and due times
/// [`a_store_written_by_release_1_opens_with_every_file_and_job_as_it_was`] holds).
#[test]
fn the_state_store_fixture_is_what_its_writer_writes() {
    if let Some(out) = std::env::var_os("STATE_STORE_FIXTURE").map(PathBuf::from) {
        let store = write_v1_store(&out);
        for (path, job) in store.all_jobs().expect("jobs") {
            println!("{path:?}: {job:?}");
        }
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let written = write_v1_store(&dir.path().join("state.sled"));
    let fixture_copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture_v1(), fixture_copy.path());
    let fixture = Store::open(fixture_copy.path()).expect("the fixture opens");
    let files = |s: &Store| s.files_under(Path::new("/")).expect("files");
    assert_eq!(files(&written), files(&fixture));
    let kinds = |s: &Store| {
        s.all_jobs()
            .expect("jobs")
            .into_iter()
            .map(|(p, j)| (p, j.kind, j.attempts, j.last_error))
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&written), kinds(&fixture));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// After an upgrade the agent finds every file unchanged (same hash, doc id, page counts: it
/// embeds nothing again) and the queue as it was (the job that was running is queued again).
#[test]
fn a_store_written_by_release_1_opens_with_every_file_and_job_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture_v1(), dir.path());
    let store = Store::open(dir.path()).expect("the release-1 store opens");

    assert_eq!(
        store.files_under(Path::new("/")).expect("files"),
        v1_files()
    );
    for (path, rec) in v1_files() {
        assert!(
            store
                .paths_with_hash(&rec.content_hash)
                .expect("hash index")
                .contains(&path),
            "{} is found by its content",
            path.display()
        );
    }

    let job = |seq, kind, state, attempts, due_ms, seen, last_error: Option<&str>| Job {
        seq,
        kind,
        state,
        attempts,
        due_ms,
        seen,
        closed: None,
        changes: 0,
        pending: None,
        last_error: last_error.map(String::from),
    };
    let written_at = 1_796_166_262_664;
    let failed = "not a PDF: PDFium could not open it — check the file";
    let seen = FileStamp {
        size: 4_096,
        mtime_ns: 1_717_236_100_000_000_000,
    };
    let moved = JobKind::Move {
        from: p("old name.pdf"),
        to: p("new name.pdf"),
    };
    let delete = JobKind::Delete {
        path: p("gone.pdf"),
    };
    #[rustfmt::skip]
    let expected = vec![
        // In progress when the store was closed: queued again.
        (p("big.pdf"), job(1, index("big.pdf"), JobState::Queued, 0, written_at, None, None)),
        (p("broken.pdf"), job(0, index("broken.pdf"), JobState::Failed, 1, written_at, None, Some(failed))),
        (p("gone.pdf"), job(3, delete, JobState::Queued, 0, written_at + 4_000, None, None)),
        (p("new name.pdf"), job(4, moved, JobState::Queued, 0, written_at + 4_000, None, None)),
        (p("new.pdf"), job(2, index("new.pdf"), JobState::Queued, 0, written_at + 2_000, Some(seen), None)),
    ];
    assert_eq!(store.all_jobs().expect("jobs"), expected);
    assert_eq!(
        store.failures().expect("failures"),
        vec![(p("broken.pdf"), failed.to_string())]
    );
    let due: Vec<PathBuf> = std::iter::from_fn(|| store.take_due(u64::MAX).expect("take"))
        .map(|j| j.kind.path().to_path_buf())
        .collect();
    assert_eq!(
        due,
        vec![p("big.pdf"), p("new.pdf"), p("gone.pdf"), p("new name.pdf")],
        "queued jobs come due in the order they were filed"
    );

    // Sequence numbers go on increasing after the upgrade.
    store
        .enqueue(index("later.pdf"), None, Duration::ZERO)
        .expect("enqueue");
    let later = store.job(&p("later.pdf")).expect("job").expect("queued");
    assert!(later.seq > 4, "seq {} after the fixture's 4", later.seq);
}
