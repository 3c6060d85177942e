//! The sled store: what we know about each file, and the durable job queue.
//!
//! Three trees: `files` (path → [`FileRecord`]), `hashes` (content hash ‖ NUL ‖ path → ∅, to
//! recognise a moved file by its content) and `jobs` (path → [`Job`]: at most one job per path,
//! the latest event wins). The order in which queued jobs become due is kept in memory and
//! rebuilt from `jobs` at open, so the tree is the only durable truth.
//!
//! One process owns the store (sled locks it); inside that process every mutation goes through
//! one mutex, so a job and its in-memory index never disagree.
//!
//! The store's format has its own version ([`STORE_VERSION`]); an older store is brought
//! forward at open through `MIGRATIONS`, one version at a time, never dropped: dropping it
//! would embed every file again (hours on a CPU).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::types::{ContentHash, DocId};

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state store at {path} is in use by another docusearch-agent process (sled holds its lock) — stop that agent, or ask it through `status`")]
    Locked { path: PathBuf },
    #[error(
        "cannot open the state store at {path}: {source} — {}",
        advice(source, true)
    )]
    Open { path: PathBuf, source: sled::Error },
    #[error("the state store at {path} has schema version {found}, newer than this program's {supported} — upgrade docusearch-agent, or delete the folder to rebuild it")]
    Newer {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("the state store at {path} has schema version {found}, older than any this program can upgrade (it upgrades versions {oldest} to {supported}) — open it once with a docusearch-agent release that upgrades version {found}, then with this one; or delete the folder to rebuild it from the watched folders (every file is then embedded again)")]
    TooOld {
        path: PathBuf,
        found: u32,
        oldest: u32,
        supported: u32,
    },
    #[error("upgrading the state store at {path} from schema version {from} to {} failed, and it stays at version {from}: {source}", from + 1)]
    Upgrade {
        path: PathBuf,
        from: u32,
        source: Box<StoreError>,
    },
    #[error(
        "the state store failed while {doing}: {source} — {}",
        advice(source, false)
    )]
    Io { doing: String, source: sled::Error },
    #[error("the state store holds an unreadable {what} record for {key}: {message} — delete state_dir's state.sled to rebuild it")]
    Corrupt {
        what: &'static str,
        key: String,
        message: String,
    },
    #[error("{path} cannot be tracked: its name is not valid UTF-8 (Chroma metadata needs text) — rename the file")]
    NotUtf8 { path: PathBuf },
}

impl StoreError {
    /// The store cannot be written or read (a full or read-only disk, a failing one): nothing
    /// can be recorded until that is fixed. Not a problem with one file.
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Open { .. })
    }
}

/// What to do about a failed read or write, by its cause. A full or read-only disk is common
/// and harmless to the state once fixed: the agent starts again and catches up from the watched
/// folders, so nothing is to be deleted then.
fn advice(e: &sled::Error, opening: bool) -> &'static str {
    use std::io::ErrorKind as K;
    // sled re-wraps some errors, keeping the kind but not the OS's number.
    let kind = match e {
        sled::Error::Io(io) => match io.raw_os_error() {
            Some(libc::ENOSPC) => Some(K::StorageFull),
            Some(libc::EDQUOT) => Some(K::QuotaExceeded),
            Some(libc::EROFS) => Some(K::ReadOnlyFilesystem),
            _ => Some(io.kind()),
        },
        _ => None,
    };
    match kind {
        Some(K::StorageFull) | Some(K::QuotaExceeded) => "the disk holding state_dir is full: free space on it; the agent then starts again and catches up with the watched folders by itself",
        Some(K::ReadOnlyFilesystem) => "the file system holding state_dir is read-only: make it writable (or set state_dir to a writable folder); the agent then starts again and catches up by itself",
        Some(K::PermissionDenied) => "this user may not write to state_dir: fix its permissions or owner",
        _ if opening => "check the permissions of state_dir, or delete the folder to rebuild the state from the watched folders",
        _ => "the disk may be failing, or state_dir was removed while the agent ran: check it, then start the agent again",
    }
}

fn io(doing: impl Into<String>) -> impl FnOnce(sled::Error) -> StoreError {
    let doing = doing.into();
    move |source| StoreError::Io { doing, source }
}

/// A known file met by [`Store::records_in_folder`].
#[derive(Debug, PartialEq, Eq)]
pub enum KnownFile<'a> {
    /// Directly in the folder.
    Direct {
        name: &'a str,
        stamp: FileStamp,
        /// Whether the configured model embedded it.
        same_model: bool,
    },
    /// Under a subfolder the walk did not go into.
    Below(PathBuf),
}

/// Size and modification time: what tells us, without reading a file, that it is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub size: u64,
    /// Nanoseconds since the Unix epoch (negative before it).
    pub mtime_ns: i128,
}

impl FileStamp {
    pub fn of_metadata(md: &std::fs::Metadata) -> FileStamp {
        let mtime_ns = match md.modified() {
            Ok(t) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i128,
                Err(e) => -(e.duration().as_nanos() as i128),
            },
            Err(_) => 0,
        };
        FileStamp {
            size: md.len(),
            mtime_ns,
        }
    }

    /// `None` when the path is missing or not a regular file (symlinks are not followed).
    pub fn of_path(path: &Path) -> Option<FileStamp> {
        let md = std::fs::symlink_metadata(path).ok()?;
        md.is_file().then(|| FileStamp::of_metadata(&md))
    }

    /// How long ago the file was last written, as seen at `now`.
    pub fn age(&self, now: SystemTime) -> Duration {
        let now_ns = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let diff = now_ns - self.mtime_ns;
        if diff <= 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(diff.min(u64::MAX as i128) as u64)
        }
    }
}

/// What the store remembers about one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub stamp: FileStamp,
    pub content_hash: ContentHash,
    pub doc_id: DocId,
    pub num_pages: u32,
    pub num_chunks: u32,
    /// The model that embedded it (a model change means a re-index).
    pub model: String,
    pub schema_version: u32,
    /// ISO 8601 UTC time of the last successful index.
    pub indexed_at: Option<String>,
    /// Why the last attempt failed; `None` when the records in Chroma match this file.
    pub last_error: Option<String>,
}

/// What a job does. The path a job is filed under is [`JobKind::path`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobKind {
    /// (Re-)index the file if its content is not what is indexed.
    Index { path: PathBuf },
    /// Remove the file's records.
    Delete { path: PathBuf },
    /// Re-key the records of `from` under `to` without the model, then index `to` if its
    /// content differs.
    Move { from: PathBuf, to: PathBuf },
}

impl JobKind {
    pub fn path(&self) -> &Path {
        match self {
            JobKind::Index { path } | JobKind::Delete { path } => path,
            JobKind::Move { to, .. } => to,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    InProgress,
    /// Out of attempts, or permanently broken; kept with its reason until the file changes
    /// or `repair` retries it.
    Failed,
}

/// A durable job. Done jobs are removed: the file record is what remains of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique and increasing, across restarts.
    pub seq: u64,
    pub kind: JobKind,
    pub state: JobState,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not to be started before this time (ms since the epoch): settle period or back-off.
    pub due_ms: u64,
    /// Size and mtime when the job was filed or last looked at: a file is processed only once
    /// it has stopped changing.
    pub seen: Option<FileStamp>,
    /// Size and mtime when the file's writer closed it (a close-after-write event) or when it
    /// was moved in whole (a rename): if the file still has them, it is complete and only
    /// needs a short check, not the whole settle period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<FileStamp>,
    /// How often the file was seen changing while this job waited: a file that keeps being
    /// rewritten must stay still longer before it is read.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub changes: u32,
    /// An event that arrived while the job was in progress; it runs next.
    pub pending: Option<JobKind>,
    pub last_error: Option<String>,
}

/// Queue sizes, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueCounts {
    pub queued: usize,
    pub in_progress: usize,
    pub failed: usize,
}

/// File counts, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FileCounts {
    /// Files whose records are in Chroma.
    pub indexed: usize,
    pub pages: u64,
    pub chunks: u64,
    /// Files whose last attempt failed.
    pub with_error: usize,
}

/// How a failure is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
}

impl RetryPolicy {
    /// Exponential back-off: base, 2×base, 4×base, ... capped at a day.
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 1u64 << attempts.saturating_sub(1).min(20);
        (self.base.saturating_mul(factor as u32)).min(Duration::from_secs(86_400))
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The on-disk format of this store. Independent of [`crate::types::SCHEMA_VERSION`], the
/// format of the Chroma records: a change to one does not touch the other. Bumped together
/// with a `Migration` from the version before, appended to `MIGRATIONS`.
pub const STORE_VERSION: u32 = 1;

/// Where the store's version is kept (big-endian u32, in sled's default tree).
const META_VERSION: &[u8] = b"schema_version";

/// One step of the format forward: turns a store at version `from` into one at `from + 1`.
/// It runs over the whole database before the store is used. A crash after the step and before
/// its version is written runs it again, so a step must be safe to repeat.
struct Migration {
    from: u32,
    /// What changes, for the log.
    what: &'static str,
    apply: fn(&sled::Db) -> Result<(), StoreError>,
}

/// Every step, oldest first, each starting where the one before ends, the last ending at
/// [`STORE_VERSION`]. The first step's `from` is the oldest store this program opens. Empty:
/// version 1 is the first format (the one every release so far has written).
const MIGRATIONS: &[Migration] = &[];

fn read_version(db: &sled::Db) -> Result<Option<u32>, StoreError> {
    Ok(db
        .get(META_VERSION)
        .map_err(io("reading the schema version"))?
        .map(|v| {
            let mut b = [0u8; 4];
            if v.len() == 4 {
                b.copy_from_slice(&v);
            }
            u32::from_be_bytes(b)
        }))
}

fn write_version(db: &sled::Db, version: u32) -> Result<(), StoreError> {
    db.insert(META_VERSION, &version.to_be_bytes())
        .map_err(io("writing the schema version"))?;
    db.flush().map_err(io("flushing the schema version"))?;
    Ok(())
}

/// Whether any tree holds a record (a new store holds none).
fn holds_data(db: &sled::Db) -> Result<bool, StoreError> {
    for name in db.tree_names() {
        let tree = db.open_tree(&name).map_err(io("listing trees"))?;
        if !tree.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Brings the store to `target` through `steps`, one version at a time, as meilisearch's
/// index-scheduler `upgrade/` does: each step logged, and the version written (and flushed)
/// after it, so an interrupted upgrade goes on from the step that did not finish. Nothing is
/// changed when there is no path from the store's version to `target`.
fn upgrade(db: &sled::Db, dir: &Path, target: u32, steps: &[Migration]) -> Result<(), StoreError> {
    let found = match read_version(db)? {
        Some(v) => v,
        None if !holds_data(db)? => return write_version(db, target),
        // Records without a version: older than any format we know.
        None => 0,
    };
    if found > target {
        return Err(StoreError::Newer {
            path: dir.to_path_buf(),
            found,
            supported: target,
        });
    }
    let plan: Option<Vec<&Migration>> = (found..target)
        .map(|v| steps.iter().find(|s| s.from == v))
        .collect();
    let Some(plan) = plan else {
        return Err(StoreError::TooOld {
            path: dir.to_path_buf(),
            found,
            oldest: steps.first().map_or(target, |s| s.from),
            supported: target,
        });
    };
    for step in plan {
        let to = step.from + 1;
        tracing::info!(
            store = %dir.display(),
            from = step.from,
            to,
            "upgrading the state store: {}",
            step.what
        );
        (step.apply)(db).map_err(|e| StoreError::Upgrade {
            path: dir.to_path_buf(),
            from: step.from,
            source: Box::new(e),
        })?;
        write_version(db, to)?;
    }
    if found < target {
        tracing::info!(store = %dir.display(), from = found, to = target, "state store upgraded");
    }
    Ok(())
}

struct Inner {
    /// Queued jobs by (due, seq): the dispatcher takes the first one that is due.
    due: BTreeMap<(u64, u64), PathBuf>,
}

/// The store. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    files: sled::Tree,
    hashes: sled::Tree,
    jobs: sled::Tree,
    inner: Arc<Mutex<Inner>>,
    /// Woken whenever a job is queued, so the dispatcher never polls.
    queued: Arc<tokio::sync::Notify>,
    path: PathBuf,
}

fn key(path: &Path) -> Result<Vec<u8>, StoreError> {
    path.to_str()
        .map(|s| s.as_bytes().to_vec())
        .ok_or_else(|| StoreError::NotUtf8 {
            path: path.to_path_buf(),
        })
}

fn path_of_key(k: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(k).into_owned())
}

/// Keys of everything strictly under `dir`.
fn dir_prefix(dir: &Path) -> Result<Vec<u8>, StoreError> {
    let mut k = key(dir)?;
    if !k.ends_with(std::path::MAIN_SEPARATOR_STR.as_bytes()) {
        k.extend_from_slice(std::path::MAIN_SEPARATOR_STR.as_bytes());
    }
    Ok(k)
}

fn hash_key(hash: &ContentHash, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut k = hash.0.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&key(path)?);
    Ok(k)
}

fn decode<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    k: &[u8],
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        what,
        key: String::from_utf8_lossy(k).into_owned(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own plain structs: serialisation cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `dir`. An older store is upgraded through
    /// `MIGRATIONS`; one newer than this program, or too old for any step, is refused. Jobs
    /// that were in progress when the last process died are queued again.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, STORE_VERSION, MIGRATIONS)
    }

    fn open_with(dir: &Path, version: u32, steps: &[Migration]) -> Result<Store, StoreError> {
        let db = open_sled(dir)?;
        upgrade(&db, dir, version, steps)?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(io(format!("opening tree {name}")))
        };
        let files = tree("files")?;
        let hashes = tree("hashes")?;
        let jobs = tree("jobs")?;
        let store = Store {
            db,
            files,
            hashes,
            jobs,
            inner: Arc::new(Mutex::new(Inner {
                due: BTreeMap::new(),
            })),
            queued: Arc::new(tokio::sync::Notify::new()),
            path: dir.to_path_buf(),
        };
        store.recover()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write is one insert).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-queues jobs left in progress and rebuilds the due-order index.
    fn recover(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.due.clear();
        for item in self.jobs.iter() {
            let (k, v) = item.map_err(io("reading jobs"))?;
            let mut job: Job = decode("job", &k, &v)?;
            if job.state == JobState::InProgress {
                if let Some(next) = job.pending.take() {
                    job.kind = next;
                    job.attempts = 0;
                }
                job.state = JobState::Queued;
                self.jobs
                    .insert(&k, encode(&job))
                    .map_err(io("re-queueing a job"))?;
            }
            if job.state == JobState::Queued {
                inner.due.insert((job.due_ms, job.seq), path_of_key(&k));
            }
        }
        Ok(())
    }

    /// Woken whenever a job becomes queued.
    pub fn queued_signal(&self) -> Arc<tokio::sync::Notify> {
        self.queued.clone()
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(io("flushing"))?;
        Ok(())
    }

    // ---- files ----

    pub fn file(&self, path: &Path) -> Result<Option<FileRecord>, StoreError> {
        let k = key(path)?;
        match self.files.get(&k).map_err(io("reading a file record"))? {
            Some(v) => Ok(Some(decode("file", &k, &v)?)),
            None => Ok(None),
        }
    }

    pub fn put_file(&self, path: &Path, rec: &FileRecord) -> Result<(), StoreError> {
        let k = key(path)?;
        let old = self
            .files
            .insert(&k, encode(rec))
            .map_err(io("writing a file record"))?;
        if let Some(old) = old {
            let old: FileRecord = decode("file", &k, &old)?;
            if old.content_hash != rec.content_hash {
                self.hashes
                    .remove(hash_key(&old.content_hash, path)?)
                    .map_err(io("updating the hash index"))?;
            }
        }
        self.hashes
            .insert(hash_key(&rec.content_hash, path)?, &[])
            .map_err(io("updating the hash index"))?;
        Ok(())
    }

    pub fn remove_file(&self, path: &Path) -> Result<Option<FileRecord>, StoreError> {
        let k = key(path)?;
        let Some(old) = self
            .files
            .remove(&k)
            .map_err(io("removing a file record"))?
        else {
            return Ok(None);
        };
        let old: FileRecord = decode("file", &k, &old)?;
        self.hashes
            .remove(hash_key(&old.content_hash, path)?)
            .map_err(io("updating the hash index"))?;
        Ok(Some(old))
    }

    /// Known files strictly under `dir` (every file when `dir` is a filesystem root).
    pub fn files_under(&self, dir: &Path) -> Result<Vec<(PathBuf, FileRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.files.scan_prefix(dir_prefix(dir)?) {
            let (k, v) = item.map_err(io("listing file records"))?;
            out.push((path_of_key(&k), decode("file", &k, &v)?));
        }
        Ok(out)
    }

    /// What a reconcile compares one walked folder with, handed to `each` in key order: the
    /// known files directly in `dir` (their size and mtime, read without decoding the rest of
    /// each record, and whether `model` embedded them; sorted by name), and the known files
    /// under those subfolders of `dir` that are not in `walked` (sorted names). The walk reads
    /// the folders in `walked` itself, and their records are jumped over here, so each record
    /// is listed once in a whole walk.
    pub fn records_in_folder(
        &self,
        dir: &Path,
        walked: &[OsString],
        model: &str,
        mut each: impl FnMut(KnownFile<'_>),
    ) -> Result<(), StoreError> {
        /// The part of a [`FileRecord`] read here; serde skips the other fields.
        #[derive(Deserialize)]
        struct StampView<'a> {
            stamp: FileStamp,
            #[serde(borrow)]
            model: std::borrow::Cow<'a, str>,
        }
        const SEP: u8 = std::path::MAIN_SEPARATOR as u8;
        let prefix = dir_prefix(dir)?;
        let mut from = prefix.clone();
        'range: loop {
            for item in self.files.range(from.as_slice()..) {
                let (k, v) = item.map_err(io("listing file records"))?;
                let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                    break 'range;
                };
                if let Some(i) = rest.iter().position(|&b| b == SEP) {
                    let sub = &rest[..i];
                    if walked
                        .binary_search_by(|w| w.as_encoded_bytes().cmp(sub))
                        .is_ok()
                    {
                        // `dir/sub/…` are contiguous keys: go on after `dir/sub0`.
                        from = [prefix.as_slice(), sub, &[SEP + 1]].concat();
                        continue 'range;
                    }
                    each(KnownFile::Below(path_of_key(&k)));
                    continue;
                }
                let view: StampView =
                    serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                        what: "file",
                        key: String::from_utf8_lossy(&k).into_owned(),
                        message: e.to_string(),
                    })?;
                each(KnownFile::Direct {
                    name: &String::from_utf8_lossy(rest),
                    stamp: view.stamp,
                    same_model: view.model == model,
                });
            }
            break;
        }
        Ok(())
    }

    /// Paths of known files with this content.
    pub fn paths_with_hash(&self, hash: &ContentHash) -> Result<Vec<PathBuf>, StoreError> {
        let mut prefix = hash.0.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.hashes.scan_prefix(&prefix) {
            let (k, _) = item.map_err(io("reading the hash index"))?;
            out.push(path_of_key(&k[prefix.len()..]));
        }
        Ok(out)
    }

    pub fn file_counts(&self) -> Result<FileCounts, StoreError> {
        let mut c = FileCounts::default();
        for item in self.files.iter() {
            let (k, v) = item.map_err(io("counting files"))?;
            let rec: FileRecord = decode("file", &k, &v)?;
            if rec.last_error.is_some() {
                c.with_error += 1;
            } else {
                c.indexed += 1;
                c.pages += rec.num_pages as u64;
                c.chunks += rec.num_chunks as u64;
            }
        }
        Ok(c)
    }

    // ---- jobs ----

    pub fn job(&self, path: &Path) -> Result<Option<Job>, StoreError> {
        let k = key(path)?;
        match self.jobs.get(&k).map_err(io("reading a job"))? {
            Some(v) => Ok(Some(decode("job", &k, &v)?)),
            None => Ok(None),
        }
    }

    fn write_job(&self, inner: &mut Inner, old: Option<&Job>, job: &Job) -> Result<(), StoreError> {
        let path = job.kind.path().to_path_buf();
        if let Some(old) = old {
            inner.due.remove(&(old.due_ms, old.seq));
        }
        self.jobs
            .insert(key(&path)?, encode(job))
            .map_err(io("writing a job"))?;
        if job.state == JobState::Queued {
            inner.due.insert((job.due_ms, job.seq), path);
            self.queued.notify_one();
        }
        Ok(())
    }

    fn drop_job(&self, inner: &mut Inner, job: &Job) -> Result<(), StoreError> {
        inner.due.remove(&(job.due_ms, job.seq));
        self.jobs
            .remove(key(job.kind.path())?)
            .map_err(io("removing a job"))?;
        Ok(())
    }

    fn new_seq(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(io("numbering a job"))
    }

    /// Files a job; the latest event for a path wins. `delay` is how long the file must stay
    /// still first (the settle period); `seen` its size and mtime now, if known.
    pub fn enqueue(
        &self,
        kind: JobKind,
        seen: Option<FileStamp>,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        self.enqueue_locked(&mut inner, kind, seen, None, delay)
    }

    /// [`Store::enqueue`] for a file its writer has closed (or that was moved in whole) with
    /// size and mtime `stamp`: see [`Job::closed`].
    pub fn enqueue_closed(
        &self,
        kind: JobKind,
        stamp: FileStamp,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        self.enqueue_locked(&mut inner, kind, Some(stamp), Some(stamp), delay)
    }

    fn enqueue_locked(
        &self,
        inner: &mut Inner,
        kind: JobKind,
        seen: Option<FileStamp>,
        closed: Option<FileStamp>,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let due_ms = now_ms() + delay.as_millis() as u64;
        let path = kind.path().to_path_buf();
        // A move takes over the job of the file it moves.
        if let JobKind::Move { from, .. } = &kind {
            if let Some(old) = self.job(from)? {
                match old.state {
                    JobState::InProgress => {
                        // It finishes first; its records are then deleted (the move re-indexes
                        // if there is nothing left to re-key).
                        let mut old2 = old.clone();
                        old2.pending = Some(JobKind::Delete { path: from.clone() });
                        self.write_job(inner, Some(&old), &old2)?;
                    }
                    JobState::Queued | JobState::Failed => self.drop_job(inner, &old)?,
                }
            }
        }
        let existing = self.job(&path)?;
        let fresh = |kind: JobKind, seq: u64| Job {
            seq,
            kind,
            state: JobState::Queued,
            attempts: 0,
            due_ms,
            seen,
            closed,
            changes: 0,
            pending: None,
            last_error: None,
        };
        let Some(old) = existing else {
            let job = fresh(kind, self.new_seq()?);
            return self.write_job(inner, None, &job);
        };
        match old.state {
            JobState::InProgress => {
                let mut job = old.clone();
                job.pending = Some(merge(old.pending.clone(), kind));
                self.write_job(inner, Some(&old), &job)
            }
            JobState::Failed => {
                let job = fresh(kind, self.new_seq()?);
                self.write_job(inner, Some(&old), &job)
            }
            JobState::Queued => {
                // Deleting a file whose move is queued: the records still live under the old
                // path, so that is what must be deleted.
                if let (JobKind::Move { from, .. }, JobKind::Delete { .. }) = (&old.kind, &kind) {
                    let from = from.clone();
                    let job = fresh(kind, self.new_seq()?);
                    self.write_job(inner, Some(&old), &job)?;
                    return self.enqueue_locked(
                        inner,
                        JobKind::Delete { path: from },
                        None,
                        None,
                        delay,
                    );
                }
                let merged = merge(Some(old.kind.clone()), kind);
                let mut job = old.clone();
                job.kind = merged;
                if seen.is_some() && old.seen.is_some() && seen != old.seen {
                    job.changes = job.changes.saturating_add(1);
                }
                job.seen = seen.or(old.seen);
                job.closed = closed.or(old.closed);
                // A writer closing the file ends the wait for it; a retry's back-off stays.
                job.due_ms = if closed.is_some() && old.attempts == 0 {
                    due_ms
                } else {
                    old.due_ms.max(due_ms)
                };
                job.seq = self.new_seq()?;
                self.write_job(inner, Some(&old), &job)
            }
        }
    }

    /// Takes the first queued job that is due at `now_ms`, marking it in progress.
    pub fn take_due(&self, now: u64) -> Result<Option<Job>, StoreError> {
        let mut inner = self.lock();
        let Some((&(due, seq), path)) = inner.due.iter().next() else {
            return Ok(None);
        };
        if due > now {
            return Ok(None);
        }
        let path = path.clone();
        inner.due.remove(&(due, seq));
        let Some(mut job) = self.job(&path)? else {
            return Ok(None);
        };
        job.state = JobState::InProgress;
        self.jobs
            .insert(key(&path)?, encode(&job))
            .map_err(io("starting a job"))?;
        Ok(Some(job))
    }

    /// When the next queued job becomes due (ms since the epoch), if any is queued.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.lock().due.keys().next().map(|(d, _)| *d)
    }

    /// The job finished; a job filed meanwhile for the same path runs next.
    pub fn complete(&self, job: &Job) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(cur) = self.job(job.kind.path())? else {
            return Ok(());
        };
        if cur.seq != job.seq {
            return Ok(());
        }
        match cur.pending.clone() {
            Some(next) => {
                let mut j = cur.clone();
                j.kind = next;
                j.pending = None;
                j.state = JobState::Queued;
                j.attempts = 0;
                j.last_error = None;
                j.seq = self.new_seq()?;
                j.due_ms = now_ms();
                self.write_job(&mut inner, Some(&cur), &j)
            }
            None => self.drop_job(&mut inner, &cur),
        }
    }

    /// The file is not ready yet (still being written): look again after `delay`, without
    /// counting an attempt. A `seen` that differs from the job's counts as a change.
    pub fn defer(
        &self,
        job: &Job,
        seen: Option<FileStamp>,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Some(cur) = self.job(job.kind.path())? else {
            return Ok(());
        };
        if cur.seq != job.seq {
            return Ok(());
        }
        let mut j = cur.clone();
        if let Some(next) = j.pending.take() {
            j.kind = next;
        }
        j.state = JobState::Queued;
        if seen.is_some() && cur.seen.is_some() && seen != cur.seen {
            j.changes = j.changes.saturating_add(1);
        }
        j.seen = seen;
        j.due_ms = now_ms() + delay.as_millis() as u64;
        self.write_job(&mut inner, Some(&cur), &j)
    }

    /// The job failed. A transient failure is retried with back-off until the attempts run
    /// out; a permanent one fails at once. A job filed meanwhile replaces it (the file changed).
    /// Returns the job's new state.
    pub fn fail(
        &self,
        job: &Job,
        reason: &str,
        permanent: bool,
        policy: RetryPolicy,
    ) -> Result<JobState, StoreError> {
        let mut inner = self.lock();
        let Some(cur) = self.job(job.kind.path())? else {
            return Ok(JobState::Failed);
        };
        if cur.seq != job.seq {
            return Ok(cur.state);
        }
        let mut j = cur.clone();
        if let Some(next) = j.pending.take() {
            j.kind = next;
            j.attempts = 0;
            j.state = JobState::Queued;
            j.last_error = Some(reason.to_string());
            j.due_ms = now_ms();
            j.seq = self.new_seq()?;
        } else {
            j.attempts += 1;
            j.last_error = Some(reason.to_string());
            if permanent || j.attempts >= policy.max_attempts {
                j.state = JobState::Failed;
            } else {
                j.state = JobState::Queued;
                j.due_ms = now_ms() + policy.delay(j.attempts).as_millis() as u64;
            }
        }
        self.write_job(&mut inner, Some(&cur), &j)?;
        Ok(j.state)
    }

    /// Queues every failed job again (what `repair` asks for). Returns how many.
    pub fn retry_failed(&self) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let mut n = 0;
        for (_, job) in self.all_jobs()? {
            if job.state == JobState::Failed {
                let mut j = job.clone();
                j.state = JobState::Queued;
                j.attempts = 0;
                j.due_ms = now_ms();
                j.seq = self.new_seq()?;
                self.write_job(&mut inner, Some(&job), &j)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn all_jobs(&self) -> Result<Vec<(PathBuf, Job)>, StoreError> {
        let mut out = Vec::new();
        for item in self.jobs.iter() {
            let (k, v) = item.map_err(io("listing jobs"))?;
            out.push((path_of_key(&k), decode("job", &k, &v)?));
        }
        Ok(out)
    }

    /// Jobs strictly under `dir`.
    pub fn jobs_under(&self, dir: &Path) -> Result<Vec<(PathBuf, Job)>, StoreError> {
        let mut out = Vec::new();
        for item in self.jobs.scan_prefix(dir_prefix(dir)?) {
            let (k, v) = item.map_err(io("listing jobs"))?;
            out.push((path_of_key(&k), decode("job", &k, &v)?));
        }
        Ok(out)
    }

    pub fn queue_counts(&self) -> Result<QueueCounts, StoreError> {
        let mut c = QueueCounts::default();
        for (_, job) in self.all_jobs()? {
            match job.state {
                JobState::Queued => c.queued += 1,
                JobState::InProgress => c.in_progress += 1,
                JobState::Failed => c.failed += 1,
            }
        }
        Ok(c)
    }

    /// Failed jobs and their reasons.
    pub fn failures(&self) -> Result<Vec<(PathBuf, String)>, StoreError> {
        Ok(self
            .all_jobs()?
            .into_iter()
            .filter(|(_, j)| j.state == JobState::Failed)
            .map(|(p, j)| (p, j.last_error.unwrap_or_default()))
            .collect())
    }
}

/// The latest event wins, except that a change to a file whose move is queued keeps the move
/// (the move re-checks the content after re-keying).
fn merge(old: Option<JobKind>, new: JobKind) -> JobKind {
    match (old, new) {
        (Some(m @ JobKind::Move { .. }), JobKind::Index { .. }) => m,
        (_, new) => new,
    }
}

/// Opens the sled database in `dir`. sled lets go of its directory lock from a background
/// thread a moment after the last handle is dropped, so a reopen in the same process (an agent
/// restarted in place, tests) can find it still held: a lock is waited for up to 200 ms before
/// it is taken to mean another process (a running agent) owns the store.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let mut tries = 0;
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(source) => {
                let locked = matches!(&source, sled::Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    || source.to_string().contains("could not acquire lock");
                if !locked {
                    return Err(StoreError::Open {
                        path: dir.to_path_buf(),
                        source,
                    });
                }
                tries += 1;
                if tries >= 10 {
                    return Err(StoreError::Locked {
                        path: dir.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn store_errors_say_what_to_do_by_their_cause() {
        use std::io::{Error, ErrorKind};
        let msg = |e: Error| {
            StoreError::Io {
                doing: "writing a job".into(),
                source: sled::Error::Io(e),
            }
            .to_string()
        };
        assert!(msg(Error::from_raw_os_error(libc::ENOSPC)).contains("is full: free space"));
        // sled re-wraps some errors with their kind only.
        assert!(msg(Error::new(ErrorKind::StorageFull, "full")).contains("is full: free space"));
        assert!(msg(Error::from_raw_os_error(libc::EROFS)).contains("read-only: make it writable"));
        assert!(msg(Error::from_raw_os_error(libc::EACCES)).contains("fix its permissions"));
        assert!(msg(Error::other("disk on fire")).contains("may be failing"));
        let open = StoreError::Open {
            path: PathBuf::from("/s"),
            source: sled::Error::Io(Error::from_raw_os_error(libc::ENOSPC)),
        };
        // A full disk is no reason to delete the state.
        assert!(!open.to_string().contains("delete"), "{open}");
    }

    use super::*;

    fn set_version(dir: &Path, v: u32) {
        let db = open_sled(dir).expect("open raw");
        write_version(&db, v).expect("write version");
    }

    fn version_of(dir: &Path) -> Option<u32> {
        read_version(&open_sled(dir).expect("open raw")).expect("read version")
    }

    /// How often each test step ran, kept in the store itself (a step is a plain `fn`).
    fn ran(db: &sled::Db, step: &str) -> u32 {
        let tree = db.open_tree("test-steps").expect("tree");
        tree.get(step).expect("read").map_or(0, |v| {
            u32::from_be_bytes(v.as_ref().try_into().expect("u32"))
        })
    }

    fn count_run(db: &sled::Db, step: &str) {
        let n = ran(db, step) + 1;
        let tree = db.open_tree("test-steps").expect("tree");
        tree.insert(step, &n.to_be_bytes()).expect("write");
    }

    /// A step of the kind a real one is: every file record rewritten in place.
    fn v1_to_v2(db: &sled::Db) -> Result<(), StoreError> {
        count_run(db, "1→2");
        let files = db.open_tree("files").map_err(io("opening files"))?;
        for item in files.iter() {
            let (k, v) = item.map_err(io("reading files"))?;
            let mut rec: serde_json::Value = decode("file", &k, &v)?;
            rec["model"] = "upgraded".into();
            files.insert(k, encode(&rec)).map_err(io("writing files"))?;
        }
        Ok(())
    }

    fn v2_to_v3(db: &sled::Db) -> Result<(), StoreError> {
        count_run(db, "2→3");
        Ok(())
    }

    fn v2_to_v3_fails(db: &sled::Db) -> Result<(), StoreError> {
        count_run(db, "2→3 (fails)");
        Err(StoreError::Corrupt {
            what: "test",
            key: "k".into(),
            message: "this step fails".into(),
        })
    }

    const STEP_1: Migration = Migration {
        from: 1,
        what: "test: every file's model rewritten",
        apply: v1_to_v2,
    };
    const STEP_2: Migration = Migration {
        from: 2,
        what: "test: nothing",
        apply: v2_to_v3,
    };
    const STEP_2_FAILS: Migration = Migration {
        from: 2,
        what: "test: fails",
        apply: v2_to_v3_fails,
    };

    fn record(content: &[u8]) -> FileRecord {
        FileRecord {
            stamp: FileStamp {
                size: content.len() as u64,
                mtime_ns: 1,
            },
            content_hash: ContentHash::of_bytes(content),
            doc_id: DocId::from_string("d"),
            num_pages: 2,
            num_chunks: 1,
            model: "m".into(),
            schema_version: crate::types::SCHEMA_VERSION,
            indexed_at: None,
            last_error: None,
        }
    }

    /// A version-1 store with one file and one queued job.
    fn v1_store(dir: &Path) {
        let s = Store::open_with(dir, 1, &[]).expect("open");
        s.put_file(Path::new("/w/a.pdf"), &record(b"a"))
            .expect("put");
        s.enqueue(
            JobKind::Index {
                path: "/w/b.pdf".into(),
            },
            None,
            Duration::ZERO,
        )
        .expect("enqueue");
        s.flush().expect("flush");
    }

    #[test]
    fn the_steps_lead_from_the_oldest_version_to_store_version() {
        for pair in MIGRATIONS.windows(2) {
            assert_eq!(
                pair[1].from,
                pair[0].from + 1,
                "{} follows {}",
                pair[1].what,
                pair[0].what
            );
        }
        if let Some(last) = MIGRATIONS.last() {
            assert_eq!(
                last.from + 1,
                STORE_VERSION,
                "the last step ends at STORE_VERSION"
            );
        }
    }

    #[test]
    fn a_new_store_gets_the_current_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Store::open(dir.path()).expect("open"));
        assert_eq!(version_of(dir.path()), Some(STORE_VERSION));
    }

    #[test]
    fn an_older_store_is_upgraded_through_its_step_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        v1_store(dir.path());
        let s = Store::open_with(dir.path(), 2, &[STEP_1]).expect("upgraded");
        let rec = s.file(Path::new("/w/a.pdf")).expect("read").expect("kept");
        assert_eq!(rec.model, "upgraded", "the step ran over the records");
        assert_eq!(
            rec.content_hash,
            ContentHash::of_bytes(b"a"),
            "nothing else changed"
        );
        assert_eq!(s.all_jobs().expect("jobs").len(), 1, "the queue is kept");
        assert_eq!(ran(&s.db, "1→2"), 1);
        drop(s);
        assert_eq!(version_of(dir.path()), Some(2));

        let s = Store::open_with(dir.path(), 2, &[STEP_1]).expect("reopened");
        assert_eq!(
            ran(&s.db, "1→2"),
            1,
            "an upgraded store is not upgraded again"
        );
    }

    #[test]
    fn the_version_is_written_after_each_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        v1_store(dir.path());
        match Store::open_with(dir.path(), 3, &[STEP_1, STEP_2_FAILS]) {
            Err(StoreError::Upgrade { from: 2, .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a failed step was ignored"),
        }
        assert_eq!(
            version_of(dir.path()),
            Some(2),
            "the step that finished counts"
        );

        let s = Store::open_with(dir.path(), 3, &[STEP_1, STEP_2]).expect("goes on");
        assert_eq!(ran(&s.db, "1→2"), 1, "the finished step is not repeated");
        assert_eq!(ran(&s.db, "2→3"), 1);
        drop(s);
        assert_eq!(version_of(dir.path()), Some(3));
    }

    #[test]
    fn a_newer_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        v1_store(dir.path());
        set_version(dir.path(), STORE_VERSION + 1);
        match Store::open(dir.path()) {
            Err(StoreError::Newer { found, .. }) => assert_eq!(found, STORE_VERSION + 1),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a store from a newer version was opened"),
        }
        assert_eq!(
            version_of(dir.path()),
            Some(STORE_VERSION + 1),
            "left as it was"
        );
    }

    #[test]
    fn a_store_too_old_for_any_step_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        v1_store(dir.path());
        set_version(dir.path(), 0);
        let err = match Store::open_with(dir.path(), 3, &[STEP_1, STEP_2]) {
            Err(
                e @ StoreError::TooOld {
                    found: 0,
                    oldest: 1,
                    supported: 3,
                    ..
                },
            ) => e,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a store with no path forward was opened"),
        };
        assert!(err.to_string().contains("delete the folder"), "{err}");
        assert_eq!(version_of(dir.path()), Some(0));
        let s = Store::open_with(dir.path(), 0, &[]).expect("still readable as it was");
        assert_eq!(s.all_jobs().expect("jobs").len(), 1, "nothing was dropped");
        assert!(s.file(Path::new("/w/a.pdf")).expect("read").is_some());
        assert_eq!(ran(&s.db, "1→2"), 0, "no step ran");
    }

    #[test]
    fn records_without_a_version_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        v1_store(dir.path());
        {
            let db = open_sled(dir.path()).expect("open raw");
            db.remove(META_VERSION).expect("remove");
            db.flush().expect("flush");
        }
        match Store::open(dir.path()) {
            Err(StoreError::TooOld { found: 0, .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("records of an unknown format were opened"),
        }
    }
}
