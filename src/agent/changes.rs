//! From "something changed on disk" to jobs in the store: file-system events as they arrive,
//! and the reconcile scan (at start, on a lost event queue, periodically) that compares a
//! folder with what the store knows.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::state::{FileStamp, JobKind, JobState, Store, StoreError};
use crate::telemetry::Telemetry;
use crate::types::ContentHash;
use crate::watch::{Filter, FsEvent, NOT_UTF8};

/// Turns changes into jobs. Cheap to clone.
#[derive(Clone)]
pub struct ChangeTracker {
    pub store: Store,
    pub filter: Filter,
    /// How long a file must stay unchanged before it is processed, unless its writer was
    /// seen closing it (then [`ChangeTracker::check`] is enough). Deletions wait twice this.
    pub settle: Duration,
    /// How soon a changed file is looked at again: a file closed by its writer (or moved in
    /// whole) whose size and mtime held still over this long is read.
    pub check: Duration,
    /// The configured model: files embedded by another model are re-indexed.
    pub model: String,
    /// Where files that cannot be indexed whatever they hold are listed, for `status`.
    pub telemetry: Arc<Telemetry>,
}

/// What a reconcile found.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    /// Files seen in the folder.
    pub scanned: usize,
    pub unchanged: usize,
    /// Files whose mtime moved but whose content is the same.
    pub touched: usize,
    pub new: usize,
    pub changed: usize,
    pub moved: usize,
    pub deleted: usize,
    /// Files read in full (blake3) to decide.
    pub hashed: usize,
    /// Files left alone because a job for them is already queued or running.
    pub busy: usize,
}

impl ChangeTracker {
    /// Applies one event from the watcher.
    pub fn apply(&self, event: FsEvent) -> Result<(), StoreError> {
        match event {
            FsEvent::Changed(p) => self.changed(&p, false),
            FsEvent::Written(p) => self.changed(&p, true),
            FsEvent::Removed(p) => self.removed(&p),
            FsEvent::Renamed { from, to } => self.renamed(&from, &to),
            FsEvent::Rescan(dir) | FsEvent::RootBack(dir) => self.reconcile(&dir).map(|_| ()),
            // Nothing under it is known to be deleted (an unmounted disk looks the same): its
            // files keep their entries until it is back and compared again.
            FsEvent::RootGone(_) => Ok(()),
            // The watcher's own news: the runtime reports it.
            FsEvent::Polling(_) => Ok(()),
        }
    }

    /// Whether `path` lies in a watched folder that is not there now. Nothing under such a
    /// folder is deleted: once it is back, [`FsEvent::RootBack`] compares it with the store.
    fn in_missing_root(&self, path: &Path) -> bool {
        self.filter.root_of(path).is_some_and(|root| !root.is_dir())
    }

    /// `complete`: its writer closed it, or it was moved in whole (see [`FsEvent::Written`]).
    fn changed(&self, path: &Path, complete: bool) -> Result<(), StoreError> {
        if path.to_str().is_none() {
            // The store and Chroma key files by their name as text.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                self.telemetry
                    .refuse(path.to_path_buf(), NOT_UTF8.to_string());
            }
            return Ok(());
        }
        let Some(stamp) = FileStamp::of_path(path) else {
            return self.removed(path);
        };
        if !self.filter.accepts_file(path) {
            return self.removed(path);
        }
        // A metadata-only event on a file we indexed as it is now: nothing to do.
        if let Some(rec) = self.store.file(path)? {
            if rec.stamp == stamp
                && rec.last_error.is_none()
                && rec.model == self.model
                && self.store.job(path)?.is_none()
            {
                return Ok(());
            }
        }
        let kind = JobKind::Index {
            path: path.to_path_buf(),
        };
        // Looked at again soon either way: the dispatcher decides from the file's size and
        // mtime how much longer it must hold still.
        if complete {
            self.store.enqueue_closed(kind, stamp, self.check)
        } else {
            self.store.enqueue(kind, Some(stamp), self.check)
        }
    }

    /// Everything known at or under `path` goes. The deletion waits a little, so that the
    /// other half of a move reported as two events can still turn it into a re-key.
    fn removed(&self, path: &Path) -> Result<(), StoreError> {
        if self.in_missing_root(path) {
            return Ok(());
        }
        self.telemetry.clear_refused(path);
        if path.to_str().is_none() {
            // Nothing under a name that is not text was ever recorded; it may have become a
            // folder with files (reported as they are found).
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                self.telemetry
                    .refuse(path.to_path_buf(), NOT_UTF8.to_string());
            }
            return Ok(());
        }
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.is_file() && self.filter.accepts_file(path) => {
                return self.changed(path, false)
            }
            Ok(md) if md.is_dir() => {
                self.reconcile(path)?;
                return Ok(());
            }
            _ => {}
        }
        for p in self.known_at_or_under(path)? {
            self.store
                .enqueue(JobKind::Delete { path: p }, None, self.settle * 2)?;
        }
        Ok(())
    }

    fn renamed(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
        if from.to_str().is_none() || to.to_str().is_none() {
            // Not a re-key the store can do: the old name goes, the new one is looked at.
            self.removed(from)?;
            return match std::fs::symlink_metadata(to) {
                Ok(md) if md.is_dir() => self.reconcile(to).map(|_| ()),
                _ => self.changed(to, true),
            };
        }
        match std::fs::symlink_metadata(to) {
            Ok(md) if md.is_dir() => {
                for old in self.known_at_or_under(from)? {
                    let Ok(rel) = old.strip_prefix(from) else {
                        continue;
                    };
                    let new = to.join(rel);
                    if self.filter.accepts_file(&new) {
                        let kind = JobKind::Move {
                            from: old,
                            to: new.clone(),
                        };
                        // Moved with its folder: as complete as it was there.
                        match FileStamp::of_path(&new) {
                            Some(stamp) => self.store.enqueue_closed(kind, stamp, self.check)?,
                            None => self.store.enqueue(kind, None, self.check)?,
                        }
                    } else {
                        self.store
                            .enqueue(JobKind::Delete { path: old }, None, self.settle)?;
                    }
                }
                // Anything the old folder did not hold yet.
                self.reconcile(to)?;
                Ok(())
            }
            Ok(md) if md.is_file() => {
                let known = self.store.file(from)?.is_some() || self.store.job(from)?.is_some();
                if known {
                    self.store.enqueue_closed(
                        JobKind::Move {
                            from: from.to_path_buf(),
                            to: to.to_path_buf(),
                        },
                        FileStamp::of_metadata(&md),
                        self.check,
                    )
                } else {
                    // A rename is the last step of an atomic save or a finished download.
                    self.changed(to, true)
                }
            }
            _ => {
                self.removed(from)?;
                self.removed(to)
            }
        }
    }

    /// Known files and jobs at `path` or under it.
    fn known_at_or_under(&self, path: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let mut set: HashSet<PathBuf> = HashSet::new();
        if self.store.file(path)?.is_some() || self.store.job(path)?.is_some() {
            set.insert(path.to_path_buf());
        }
        set.extend(self.store.files_under(path)?.into_iter().map(|(p, _)| p));
        set.extend(self.store.jobs_under(path)?.into_iter().map(|(p, _)| p));
        let mut v: Vec<PathBuf> = set.into_iter().collect();
        v.sort();
        Ok(v)
    }

    /// Known files under `dir` by their stamps (stamps only: the whole record is read for the
    /// few files that changed or vanished) and whether this model embedded them; and the paths
    /// with a queued or running job, which are already being taken care of.
    #[allow(clippy::type_complexity)]
    fn known_and_busy(
        &self,
        dir: &Path,
    ) -> Result<(HashMap<PathBuf, (FileStamp, bool)>, HashSet<PathBuf>), StoreError> {
        let known = self
            .store
            .stamps_under(dir, &self.model)?
            .into_iter()
            .map(|(p, stamp, same_model)| (p, (stamp, same_model)))
            .collect();
        let busy = self
            .store
            .jobs_under(dir)?
            .into_iter()
            .filter(|(_, j)| j.state != JobState::Failed)
            .map(|(p, _)| p)
            .collect();
        Ok((known, busy))
    }

    /// Compares the folder `dir` with the store and files the jobs that make them agree.
    /// Known files with unchanged size and mtime are not read; changed ones are hashed; a
    /// vanished file whose content reappears elsewhere in `dir` is a move. A watched folder
    /// that is missing is left as it is (see [`FsEvent::RootGone`]).
    pub fn reconcile(&self, dir: &Path) -> Result<ReconcileReport, StoreError> {
        let mut report = ReconcileReport::default();
        if !dir.is_dir() {
            self.removed(dir)?;
            return Ok(report);
        }
        // The walk and the store's listing side by side: each takes about as long.
        let (found, refused, listed) = std::thread::scope(|s| {
            let listing = s.spawn(|| self.known_and_busy(dir));
            let mut refused = Vec::new();
            let found = self.filter.scan_reporting(dir, &mut refused);
            let listed = listing
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (found, refused, listed)
        });
        self.telemetry.refused_under(dir, refused);
        report.scanned = found.len();
        let (mut known, busy) = listed?;

        let mut new = Vec::new();
        for (path, stamp) in found {
            let known_stamp = known.remove(&path);
            if busy.contains(&path) {
                report.busy += 1;
                continue;
            }
            let rec = match known_stamp {
                Some((s, true)) if s == stamp => {
                    report.unchanged += 1;
                    continue;
                }
                Some(_) => self.store.file(&path)?,
                None => None,
            };
            match rec {
                Some(rec) => {
                    let same = rec.model == self.model
                        && rec.last_error.is_none()
                        && match ContentHash::of_file(&path) {
                            Ok(h) => {
                                report.hashed += 1;
                                h == rec.content_hash
                            }
                            Err(_) => false,
                        };
                    if same {
                        let mut rec = rec;
                        rec.stamp = stamp;
                        self.store.put_file(&path, &rec)?;
                        report.touched += 1;
                    } else {
                        self.store
                            .enqueue(JobKind::Index { path }, Some(stamp), Duration::ZERO)?;
                        report.changed += 1;
                    }
                }
                None => new.push((path, stamp)),
            }
        }
        let mut vanished: Vec<(PathBuf, crate::state::FileRecord)> = Vec::new();
        for p in known.into_keys().filter(|p| !busy.contains(p)) {
            if let Some(rec) = self.store.file(&p)? {
                vanished.push((p, rec));
            }
        }
        vanished.sort_by(|a, b| a.0.cmp(&b.0));

        // Moves: the content of a vanished file, found again under a new name.
        if !vanished.is_empty() && !new.is_empty() {
            let mut by_hash: HashMap<ContentHash, Vec<PathBuf>> = HashMap::new();
            for (p, rec) in &vanished {
                if rec.last_error.is_none() {
                    by_hash
                        .entry(rec.content_hash.clone())
                        .or_default()
                        .push(p.clone());
                }
            }
            let mut moved_from = HashSet::new();
            let mut still_new = Vec::new();
            for (path, stamp) in new {
                let hash = ContentHash::of_file(&path).ok();
                report.hashed += 1;
                let from = hash.and_then(|h| by_hash.get_mut(&h).and_then(|v| v.pop()));
                match from {
                    Some(from) => {
                        moved_from.insert(from.clone());
                        self.store.enqueue(
                            JobKind::Move { from, to: path },
                            Some(stamp),
                            Duration::ZERO,
                        )?;
                        report.moved += 1;
                    }
                    None => still_new.push((path, stamp)),
                }
            }
            new = still_new;
            vanished.retain(|(p, _)| !moved_from.contains(p));
        }
        for (path, stamp) in new {
            self.store
                .enqueue(JobKind::Index { path }, Some(stamp), Duration::ZERO)?;
            report.new += 1;
        }
        for (path, _) in vanished {
            self.store
                .enqueue(JobKind::Delete { path }, None, Duration::ZERO)?;
            report.deleted += 1;
        }
        Ok(report)
    }

    /// Reconciles every watched folder (those missing now are skipped).
    pub fn reconcile_all(&self) -> Result<ReconcileReport, StoreError> {
        let mut total = ReconcileReport::default();
        for root in self.filter.roots().to_vec() {
            let r = self.reconcile(&root)?;
            total.scanned += r.scanned;
            total.unchanged += r.unchanged;
            total.touched += r.touched;
            total.new += r.new;
            total.changed += r.changed;
            total.moved += r.moved;
            total.deleted += r.deleted;
            total.hashed += r.hashed;
            total.busy += r.busy;
        }
        Ok(total)
    }
}
