//! From "something changed on disk" to jobs in the store: file-system events as they arrive,
//! and the reconcile scan (at start, on a lost event queue, periodically) that compares a
//! folder with what the store knows.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use crate::state::{FileStamp, JobKind, JobState, KnownFile, Store, StoreError};
use crate::telemetry::Telemetry;
use crate::types::ContentHash;
use crate::watch::{Filter, FsEvent, WalkedFolder, NOT_UTF8};

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

/// One folder compared with the store: what is settled, and what needs a closer look.
#[derive(Default)]
struct FolderComparison {
    scanned: usize,
    unchanged: usize,
    busy: usize,
    /// Known files whose size, mtime or model differ.
    changed: Vec<(PathBuf, FileStamp)>,
    new: Vec<(PathBuf, FileStamp)>,
    /// Known files not found.
    gone: Vec<PathBuf>,
}

impl FolderComparison {
    /// A file the walk found in `dir`, with what the store knows of it.
    fn walked(
        &mut self,
        dir: &Path,
        name: OsString,
        stamp: FileStamp,
        known: Option<(FileStamp, bool)>,
        busy: &HashSet<PathBuf>,
    ) {
        if !busy.is_empty() && busy.contains(&dir.join(&name)) {
            self.busy += 1;
            return;
        }
        match known {
            Some((s, true)) if s == stamp => self.unchanged += 1,
            Some(_) => self.changed.push((dir.join(name), stamp)),
            None => self.new.push((dir.join(name), stamp)),
        }
    }
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

    /// Compares one walked folder with what the store knows there (stamps only: the whole
    /// record is read later for the few files that changed or vanished). Runs on the walk's
    /// threads, a folder at a time; both sides are sorted by name and merged, so an unchanged
    /// file costs no path, no hashing and no allocation.
    fn compare_folder(
        &self,
        folder: WalkedFolder,
        busy: &HashSet<PathBuf>,
    ) -> Result<FolderComparison, StoreError> {
        let WalkedFolder {
            dir,
            mut files,
            subdirs,
        } = folder;
        files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut out = FolderComparison {
            scanned: files.len(),
            ..FolderComparison::default()
        };
        let mut walked = files.into_iter().peekable();
        self.store
            .records_in_folder(&dir, &subdirs, &self.model, |known| match known {
                KnownFile::Below(path) => out.gone.push(path),
                KnownFile::Direct {
                    name,
                    stamp,
                    same_model,
                } => {
                    while let Some((n, s)) =
                        walked.next_if(|(n, _)| n.as_encoded_bytes() < name.as_bytes())
                    {
                        out.walked(&dir, n, s, None, busy);
                    }
                    match walked.next_if(|(n, _)| n.as_encoded_bytes() == name.as_bytes()) {
                        Some((n, s)) => out.walked(&dir, n, s, Some((stamp, same_model)), busy),
                        None => out.gone.push(dir.join(name)),
                    }
                }
            })?;
        for (n, s) in walked {
            out.walked(&dir, n, s, None, busy);
        }
        if !busy.is_empty() {
            out.gone.retain(|p| !busy.contains(p));
        }
        Ok(out)
    }

    /// Compares the folder `dir` with the store and files the jobs that make them agree.
    /// Known files with unchanged size and mtime are not read; changed ones are hashed; a
    /// vanished file whose content reappears elsewhere in `dir` is a move. A watched folder
    /// that is missing is left as it is (see [`FsEvent::RootGone`]); a folder that cannot be
    /// read is left as it is, and listed in `status`.
    pub fn reconcile(&self, dir: &Path) -> Result<ReconcileReport, StoreError> {
        let mut report = ReconcileReport::default();
        if !dir.is_dir() {
            self.removed(dir)?;
            return Ok(report);
        }
        // Paths with a queued or running job are already being taken care of.
        let busy: HashSet<PathBuf> = self
            .store
            .jobs_under(dir)?
            .into_iter()
            .filter(|(_, j)| j.state != JobState::Failed)
            .map(|(p, _)| p)
            .collect();
        // Each folder is read and compared with its records on the walk's threads, so the
        // walk and the store's listing are spread over the cores together.
        let mut refused = Vec::new();
        let compared = self
            .filter
            .walk_folders(dir, &mut refused, |f| self.compare_folder(f, &busy));
        self.telemetry.refused_under(dir, refused);
        let (mut changed, mut new, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for c in compared {
            let c = c?;
            report.scanned += c.scanned;
            report.unchanged += c.unchanged;
            report.busy += c.busy;
            changed.extend(c.changed);
            new.extend(c.new);
            gone.extend(c.gone);
        }
        changed.sort_by(|a, b| a.0.cmp(&b.0));

        for (path, stamp) in changed {
            let Some(rec) = self.store.file(&path)? else {
                new.push((path, stamp));
                continue;
            };
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
        new.sort_by(|a, b| a.0.cmp(&b.0));
        let mut vanished: Vec<(PathBuf, crate::state::FileRecord)> = Vec::new();
        for p in gone {
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
