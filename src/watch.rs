//! The file-system source: which files count ([`Filter`]), what is there now ([`Filter::scan`]),
//! and what changes ([`FsWatcher`], notify + notify-debouncer-full turned into [`FsEvent`]s).
//!
//! What the OS reports is translated here once, so nothing downstream knows about inotify or
//! FSEvents quirks: an atomic save (a `Create` of a path we know) is just a change, `Name(To)`
//! a creation, `Name(From)` a removal, `Access` nothing, a lost event queue a rescan, and a
//! watched folder that goes away (deleted, moved off, its disk unmounted) [`FsEvent::RootGone`]
//! until it is back and watched again ([`FsEvent::RootBack`]).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use ignore::gitignore::Gitignore;
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};

use crate::state::FileStamp;
use crate::types::DocFormat;

/// Per-folder ignore files, in gitignore syntax.
pub const IGNORE_FILE: &str = ".docusearchignore";

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("bad glob `{glob}` in {key}: {message}")]
    Glob {
        key: &'static str,
        glob: String,
        message: String,
    },
    #[error(
        "watched folder {path} cannot be used: {source} — check that it exists and is readable"
    )]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch {path}: {message} — on Linux, raise fs.inotify.max_user_watches if the folder is large")]
    Watch { path: PathBuf, message: String },
}

/// The program's own file-system events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsEvent {
    /// A file we index was created or written (it may still be being written).
    Changed(PathBuf),
    /// A file we index was closed by a program that wrote it, or moved in whole (the last
    /// step of an atomic save or a finished download): complete, unless written again.
    Written(PathBuf),
    /// A file or a folder is gone: everything known at or under the path goes with it.
    Removed(PathBuf),
    /// A file or folder was renamed or moved within the watched folders.
    Renamed { from: PathBuf, to: PathBuf },
    /// Events may have been lost, or a folder appeared, or its ignore rules changed: the
    /// subtree must be compared with what is known.
    Rescan(PathBuf),
    /// A watched folder itself is gone (deleted, moved away, its disk unmounted): nothing under
    /// it can be watched or read until it is back. Not a deletion of its files: an unmounted
    /// disk looks the same.
    RootGone(PathBuf),
    /// A watched folder that was gone (or missing at start) is there and watched again: what
    /// it holds must be compared with what is known, as for a [`FsEvent::Rescan`].
    RootBack(PathBuf),
    /// The OS's file events cannot be had (on Linux, the inotify limits are used up): the
    /// folders are polled from now on, every [`POLL_EVERY`], and this says why.
    Polling(String),
}

/// A folder's ignore file as last read: its mtime (`None`: no file) and its rules.
type ParsedIgnoreFile = (Option<SystemTime>, Option<Arc<Gitignore>>);

/// The ignore files in effect in a folder, the watched folder's first.
type IgnoreChain = Arc<Vec<Arc<Gitignore>>>;

/// One folder as a walk read it.
#[derive(Debug)]
pub struct WalkedFolder {
    pub dir: PathBuf,
    /// The files directly in it that are indexed, by name, with their size and mtime.
    pub files: Vec<(OsString, FileStamp)>,
    /// The subfolders the walk went into, by name, sorted. Whatever is known under the
    /// others (excluded, ignored, gone) is not there as far as the walk can tell.
    pub subdirs: Vec<OsString>,
}

/// What the folders of one walk share while they are read in parallel.
struct Walk<'w, R, V> {
    filter: &'w Filter,
    root: &'w Path,
    visit: &'w V,
    results: Mutex<Vec<R>>,
    refused: Mutex<Vec<(PathBuf, String)>>,
}

impl<'w, R: Send, V: Fn(WalkedFolder) -> R + Sync> Walk<'w, R, V> {
    fn refuse(&self, path: PathBuf, why: String) {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((path, why));
    }

    /// Reads `dir`, hands its subfolders to the pool, then visits it.
    fn folder<'s>(&'s self, scope: &rayon::Scope<'s>, dir: PathBuf, chain: IgnoreChain)
    where
        'w: 's,
    {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) => {
                // Not visited: what is known under it is left as it is until it can be read.
                self.refuse(dir, unreadable(&err));
                return;
            }
        };
        let rel_dir = dir.strip_prefix(self.root).unwrap_or(Path::new(""));
        let mut files = Vec::new();
        let mut subdirs = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(err) => {
                    self.refuse(dir.clone(), unreadable(&err));
                    continue;
                }
            };
            let name = entry.file_name();
            if name.to_str().is_none() {
                self.refuse(entry.path(), NOT_UTF8.to_string());
                continue;
            }
            // Symlinks are not followed (nothing outside the watched folders is reached);
            // FIFOs, sockets and devices are not documents.
            let is_dir = match entry.file_type() {
                Ok(t) if t.is_dir() => true,
                Ok(t) if t.is_file() => false,
                Ok(_) => continue,
                Err(err) => {
                    self.refuse(entry.path(), unreadable(&err));
                    continue;
                }
            };
            if !self
                .filter
                .accepts_entry(&dir, rel_dir, &name, is_dir, &chain)
            {
                continue;
            }
            if is_dir {
                subdirs.push(name);
                continue;
            }
            // By name in the open folder (fstatat), not by a path looked up from the root.
            match entry.metadata() {
                Ok(md) => files.push((name, FileStamp::of_metadata(&md))),
                Err(err) => self.refuse(entry.path(), unreadable(&err)),
            }
        }
        subdirs.sort();
        for sub in &subdirs {
            let path = dir.join(sub);
            let mut chain = chain.clone();
            if let Some(gi) = self.filter.ignore_file(&path) {
                Arc::make_mut(&mut chain).push(gi);
            }
            scope.spawn(move |scope| self.folder(scope, path, chain));
        }
        let result = (self.visit)(WalkedFolder {
            dir,
            files,
            subdirs,
        });
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(result);
    }
}

/// Which paths are indexed: fixed rules for hidden, temporary and partial files, `.noindex`
/// folders, `.docusearchignore` files, the configured globs and the supported formats.
#[derive(Clone)]
pub struct Filter {
    inner: Arc<FilterInner>,
}

struct FilterInner {
    /// Canonical watched folders.
    roots: Vec<PathBuf>,
    include: Option<GlobSet>,
    exclude: GlobSet,
    /// Parsed ignore files by folder, with the mtime they were parsed at.
    ignore_files: Mutex<HashMap<PathBuf, ParsedIgnoreFile>>,
}

fn glob_set(key: &'static str, globs: &[String]) -> Result<GlobSet, WatchError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(Glob::new(g).map_err(|e| WatchError::Glob {
            key,
            glob: g.clone(),
            message: e.to_string(),
        })?);
    }
    b.build().map_err(|e| WatchError::Glob {
        key,
        glob: globs.join(", "),
        message: e.to_string(),
    })
}

/// Why a file whose name is not UTF-8 is not indexed.
pub const NOT_UTF8: &str = "its name is not valid UTF-8, and Chroma keeps names as text, so it cannot be indexed. Fix: rename it (`convmv` converts names from another encoding)";

fn unreadable(err: &dyn std::fmt::Display) -> String {
    format!("cannot be read ({err}), so it is not indexed. Fix: make it readable by the user the agent runs as, or exclude it (watch.exclude, .docusearchignore)")
}

/// Names never indexed, whatever the configuration: hidden entries, partial downloads and
/// editor or office temporary files.
pub fn is_excluded_name(name: &OsStr, is_dir: bool) -> bool {
    let Some(name) = name.to_str() else {
        // Chroma metadata is text: a name that is not UTF-8 cannot be stored faithfully.
        return true;
    };
    if name.starts_with('.') || name.starts_with("~$") {
        return true;
    }
    if is_dir {
        return name.ends_with(".noindex");
    }
    const TEMP_SUFFIXES: &[&str] = &[
        ".part",
        ".crdownload",
        ".tmp",
        ".temp",
        ".swp",
        ".swx",
        ".download",
        ".partial",
        "~",
    ];
    let name = name.as_bytes();
    TEMP_SUFFIXES.iter().any(|s| {
        name.len() >= s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
    })
}

impl Filter {
    /// `roots` are canonicalised (event paths are compared with them). A root that is not
    /// there (an unmounted disk) is kept as an absolute path, canonical as far as it exists:
    /// [`FsWatcher`] watches it from the moment it appears.
    pub fn new(
        roots: &[PathBuf],
        include: &[String],
        exclude: &[String],
    ) -> Result<Filter, WatchError> {
        let mut canon = Vec::new();
        for r in roots {
            let c = canonical_root(r);
            if !canon.contains(&c) {
                canon.push(c);
            }
        }
        Ok(Filter {
            inner: Arc::new(FilterInner {
                roots: canon,
                include: if include.is_empty() {
                    None
                } else {
                    Some(glob_set("watch.include", include)?)
                },
                exclude: glob_set("watch.exclude", exclude)?,
                ignore_files: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.inner.roots
    }

    /// Whether `path` is one of the watched folders themselves.
    pub fn is_root(&self, path: &Path) -> bool {
        self.inner.roots.iter().any(|r| r == path)
    }

    /// The watched folder `path` lies in (the deepest, if folders nest).
    pub fn root_of(&self, path: &Path) -> Option<&Path> {
        self.inner
            .roots
            .iter()
            .filter(|r| path.starts_with(r))
            .max_by_key(|r| r.as_os_str().len())
            .map(|r| r.as_path())
    }

    /// Whether a file at `path` (which need not exist any more) is one we index.
    pub fn accepts_file(&self, path: &Path) -> bool {
        self.accepts(path, false, true)
    }

    /// Whether a folder at `path` is looked into.
    pub fn accepts_dir(&self, path: &Path) -> bool {
        self.accepts(path, true, true)
    }

    fn accepts(&self, path: &Path, is_dir: bool, check_ignore_files: bool) -> bool {
        self.accepts_with(path, is_dir, check_ignore_files, &|dir| {
            self.ignore_file(dir)
        })
    }

    /// `ignore_file` finds a folder's parsed ignore file (a scan caches them for its duration).
    fn accepts_with(
        &self,
        path: &Path,
        is_dir: bool,
        check_ignore_files: bool,
        ignore_file: &dyn Fn(&Path) -> Option<Arc<Gitignore>>,
    ) -> bool {
        let Some(root) = self.root_of(path) else {
            return false;
        };
        let Ok(rel) = path.strip_prefix(root) else {
            return false;
        };
        if rel.as_os_str().is_empty() {
            return is_dir;
        }
        // Every folder on the way must be acceptable too.
        let mut comps = rel.components().peekable();
        while let Some(c) = comps.next() {
            let last = comps.peek().is_none();
            if is_excluded_name(c.as_os_str(), !last || is_dir) {
                return false;
            }
        }
        if !self.accepts_rules(rel, is_dir) {
            return false;
        }
        if check_ignore_files && Self::ignored_by_files(root, path, is_dir, ignore_file) {
            return false;
        }
        true
    }

    /// [`Filter::accepts_file`] / [`Filter::accepts_dir`] for an entry of a walk that starts at
    /// an accepted folder and does not enter folders it refused: the folders on the way were
    /// checked already, so only the entry's own name, the globs and the ignore files in
    /// `chain` count. Paths are built only for the rules that need them.
    fn accepts_entry(
        &self,
        dir: &Path,
        rel_dir: &Path,
        name: &OsStr,
        is_dir: bool,
        chain: &[Arc<Gitignore>],
    ) -> bool {
        if is_excluded_name(name, is_dir) {
            return false;
        }
        let globs = !self.inner.exclude.is_empty() || self.inner.include.is_some();
        let accepted = if globs {
            self.accepts_rules(&rel_dir.join(name), is_dir)
        } else {
            is_dir || DocFormat::from_path(Path::new(name)).is_some()
        };
        if !accepted {
            return false;
        }
        if chain.is_empty() {
            return true;
        }
        let path = dir.join(name);
        // The deepest ignore file that says something wins, as in `ignored_by_files`.
        let mut ignored = false;
        for gi in chain {
            let m = gi.matched_path_or_any_parents(&path, is_dir);
            if m.is_ignore() {
                ignored = true;
            } else if m.is_whitelist() {
                ignored = false;
            }
        }
        !ignored
    }

    /// The ignore files in effect in `dir` (its own and its ancestors' up to `root`).
    fn ignore_chain(&self, root: &Path, dir: &Path) -> IgnoreChain {
        let mut dirs: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| d.starts_with(root))
            .collect();
        dirs.reverse();
        Arc::new(
            dirs.into_iter()
                .filter_map(|d| self.ignore_file(d))
                .collect(),
        )
    }

    /// Configured globs and supported formats, on a path relative to its watched folder.
    fn accepts_rules(&self, rel: &Path, is_dir: bool) -> bool {
        if !self.inner.exclude.is_empty() && self.inner.exclude.is_match(rel) {
            return false;
        }
        if is_dir {
            return true;
        }
        if DocFormat::from_path(rel).is_none() {
            return false;
        }
        match &self.inner.include {
            Some(set) => set.is_match(rel),
            None => true,
        }
    }

    /// Whether a `.docusearchignore` between the watched folder and `path` excludes it (the
    /// deepest file that says something wins, as with git).
    fn ignored_by_files(
        root: &Path,
        path: &Path,
        is_dir: bool,
        ignore_file: &dyn Fn(&Path) -> Option<Arc<Gitignore>>,
    ) -> bool {
        let mut dirs: Vec<&Path> = path
            .ancestors()
            .skip(1)
            .take_while(|d| d.starts_with(root))
            .collect();
        dirs.reverse();
        let mut ignored = false;
        for dir in dirs {
            if let Some(gi) = ignore_file(dir) {
                let m = gi.matched_path_or_any_parents(path, is_dir);
                if m.is_ignore() {
                    ignored = true;
                } else if m.is_whitelist() {
                    ignored = false;
                }
            }
        }
        ignored
    }

    /// The parsed ignore file of `dir`, re-read when it changed.
    fn ignore_file(&self, dir: &Path) -> Option<Arc<Gitignore>> {
        let file = dir.join(IGNORE_FILE);
        let mtime = std::fs::metadata(&file)
            .ok()
            .and_then(|m| m.modified().ok());
        let mut cache = self
            .inner
            .ignore_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((t, gi)) = cache.get(dir) {
            if *t == mtime {
                return gi.clone();
            }
        }
        let gi = mtime.map(|_| {
            let (gi, err) = Gitignore::new(&file);
            if let Some(e) = err {
                tracing::warn!(file = %file.display(), "part of the ignore file was not understood: {e}");
            }
            Arc::new(gi)
        });
        cache.insert(dir.to_path_buf(), (mtime, gi.clone()));
        gi
    }

    /// Every indexable regular file under `dir` (inside a watched folder) with its size and
    /// mtime, sorted by the paths' bytes. Symlinks are not followed, so nothing outside the watched
    /// folders is reached. Unreadable folders are skipped.
    pub fn scan(&self, dir: &Path) -> Vec<(PathBuf, FileStamp)> {
        let mut out: Vec<(PathBuf, FileStamp)> = self
            .walk_folders(dir, &mut Vec::new(), |f| {
                f.files
                    .into_iter()
                    .map(|(name, stamp)| (f.dir.join(name), stamp))
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect();
        // By bytes: comparing paths component by component costs more than the walk.
        out.sort_unstable_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
        out
    }

    /// Walks `dir` (inside a watched folder) folder by folder, reading folders in parallel on
    /// rayon's pool, and calls `visit` on each folder as soon as it is read, on the thread
    /// that read it; returns what `visit` returned, in no particular order. Adds to `refused`
    /// what had to be left out, with the reason (names that are not UTF-8, folders and files
    /// that may not be read), for the user to fix.
    ///
    /// `dir` itself is visited even when its files are not indexed (it is excluded, ignored or
    /// outside the watched folders), as a folder with nothing in it, so that what is known there can be compared
    /// with nothing. A folder that cannot be read is not visited.
    pub fn walk_folders<R: Send>(
        &self,
        dir: &Path,
        refused: &mut Vec<(PathBuf, String)>,
        visit: impl Fn(WalkedFolder) -> R + Sync,
    ) -> Vec<R> {
        let root = match self.root_of(dir) {
            Some(root) if root == dir || self.accepts_dir(dir) => root,
            _ => {
                return vec![visit(WalkedFolder {
                    dir: dir.to_path_buf(),
                    files: Vec::new(),
                    subdirs: Vec::new(),
                })]
            }
        };
        let walk = Walk {
            filter: self,
            root,
            visit: &visit,
            results: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
        };
        let chain = self.ignore_chain(root, dir);
        rayon::scope(|scope| walk.folder(scope, dir.to_path_buf(), chain));
        refused.extend(walk.refused.into_inner().unwrap_or_else(|p| p.into_inner()));
        walk.results.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns one debounced OS event into ours.
    fn translate(&self, event: &notify::Event, out: &mut Vec<FsEvent>) {
        if event.need_rescan() {
            let paths: Vec<&PathBuf> = event
                .paths
                .iter()
                .filter(|p| self.root_of(p).is_some())
                .collect();
            if paths.is_empty() {
                out.extend(self.roots().iter().cloned().map(FsEvent::Rescan));
            } else {
                out.extend(paths.into_iter().cloned().map(FsEvent::Rescan));
            }
            return;
        }
        // A changed ignore file changes what its folder holds, for us.
        for p in &event.paths {
            if p.file_name() == Some(OsStr::new(IGNORE_FILE))
                && !matches!(event.kind, EventKind::Access(_))
            {
                if let Some(dir) = p.parent() {
                    if self.root_of(dir).is_some() {
                        out.push(FsEvent::Rescan(dir.to_path_buf()));
                    }
                }
                return;
            }
        }
        match event.kind {
            // inotify's IN_CLOSE_WRITE: the writer is done with it (FSEvents has no such event;
            // there the settle period decides).
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &event.paths {
                    // Only news about a file that is there (a temporary file closed and then
                    // renamed away is reported by the rename).
                    let is_file = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
                    if is_file && self.root_of(p).is_some() && self.accepts_file(p) {
                        out.push(FsEvent::Written(p.clone()));
                    }
                }
            }
            EventKind::Access(_) => {}
            // A watched folder moved away (within another watched folder).
            EventKind::Modify(ModifyKind::Name(RenameMode::Both))
                if event.paths.len() == 2 && self.is_root(&event.paths[0]) =>
            {
                out.push(FsEvent::RootGone(event.paths[0].clone()));
                self.present(&event.paths[1], out);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if event.paths.len() == 2 => {
                self.renamed(&event.paths[0], &event.paths[1], out);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                for p in &event.paths {
                    self.gone(p, out);
                }
            }
            // Moved in from outside the watched folders: whole.
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for p in &event.paths {
                    self.present_as(p, true, out);
                }
            }
            // Create, Name(To), data and metadata changes, and anything imprecise: look at
            // what is there now.
            _ => {
                for p in &event.paths {
                    self.present(p, out);
                }
            }
        }
    }

    fn gone(&self, path: &Path, out: &mut Vec<FsEvent>) {
        if self.root_of(path).is_none() {
            return;
        }
        // Even if something is there again, the watch went with the folder it was on.
        if self.is_root(path) {
            return out.push(FsEvent::RootGone(path.to_path_buf()));
        }
        // Stale: something is there again (events of an atomic save can arrive late).
        if std::fs::symlink_metadata(path).is_ok() {
            return self.present(path, out);
        }
        out.push(FsEvent::Removed(path.to_path_buf()));
    }

    fn present(&self, path: &Path, out: &mut Vec<FsEvent>) {
        self.present_as(path, false, out)
    }

    /// What is at `path` now; `complete`: a file there is whole (see [`FsEvent::Written`]).
    fn present_as(&self, path: &Path, complete: bool, out: &mut Vec<FsEvent>) {
        if self.root_of(path).is_none() {
            return;
        }
        if self.is_root(path) {
            // The watched folder itself (its permissions, say), or a reminder that it is gone.
            return out.push(if path.is_dir() {
                FsEvent::Rescan(path.to_path_buf())
            } else {
                FsEvent::RootGone(path.to_path_buf())
            });
        }
        match std::fs::symlink_metadata(path) {
            Err(_) => out.push(FsEvent::Removed(path.to_path_buf())),
            Ok(md) if md.is_dir() => {
                // A folder created or moved in: its files may have arrived with no event each.
                if self.accepts_dir(path) {
                    out.push(FsEvent::Rescan(path.to_path_buf()));
                }
            }
            Ok(md) if md.is_file() => {
                if self.accepts_file(path) {
                    out.push(if complete {
                        FsEvent::Written(path.to_path_buf())
                    } else {
                        FsEvent::Changed(path.to_path_buf())
                    });
                } else {
                    // It may have been indexed under rules that changed: harmless if not.
                    out.push(FsEvent::Removed(path.to_path_buf()));
                }
            }
            // Symlinks and special files are not indexed.
            Ok(_) => {}
        }
    }

    fn renamed(&self, from: &Path, to: &Path, out: &mut Vec<FsEvent>) {
        let from_inside = self.root_of(from).is_some();
        let to_inside = self.root_of(to).is_some();
        match std::fs::symlink_metadata(to) {
            Ok(md) if to_inside && (md.is_file() || md.is_dir()) => {
                let accepted = if md.is_dir() {
                    self.accepts_dir(to)
                } else {
                    self.accepts_file(to)
                };
                match (from_inside, accepted) {
                    (true, true) => out.push(FsEvent::Renamed {
                        from: from.to_path_buf(),
                        to: to.to_path_buf(),
                    }),
                    (true, false) => out.push(FsEvent::Removed(from.to_path_buf())),
                    (false, true) => self.present_as(to, true, out),
                    (false, false) => {}
                }
            }
            // Moved again since, or out of the watched folders.
            _ => {
                if from_inside {
                    out.push(FsEvent::Removed(from.to_path_buf()));
                }
                if to_inside {
                    self.present_as(to, true, out);
                }
            }
        }
    }
}

/// A watched folder's path made absolute and canonical: all of it when it exists, else its
/// deepest existing ancestor, with the rest as given.
fn canonical_root(path: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(path) {
        return c;
    }
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    for ancestor in abs.ancestors().skip(1) {
        if let (Ok(c), Ok(rest)) = (std::fs::canonicalize(ancestor), abs.strip_prefix(ancestor)) {
            return c.join(rest);
        }
    }
    abs
}

/// How soon a missing watched folder is looked for again: soon at first (a folder re-created
/// at once, a disk being mounted), then less and less often, up to [`RETURN_CHECK_MAX`].
const RETURN_CHECK_FIRST: Duration = Duration::from_secs(1);
const RETURN_CHECK_MAX: Duration = Duration::from_secs(30);
/// How often a watched folder is checked to still be the folder watched: an unmount, or a
/// parent folder renamed, sends no event.
const ROOT_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Which folder a path is (device and inode on Unix), to notice one replaced by another.
type FolderId = (u64, u64);

/// `None` when nothing, or no folder, is at `path` now.
fn folder_id(path: &Path) -> Option<FolderId> {
    let md = std::fs::metadata(path).ok()?;
    if !md.is_dir() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((md.dev(), md.ino()))
    }
    #[cfg(not(unix))]
    {
        Some((0, 0))
    }
}

/// How often the folders are compared with what they held when the OS's events cannot be had.
pub const POLL_EVERY: Duration = Duration::from_secs(3);

/// The watches: the OS's events, or polling once those cannot be had.
enum Watches {
    Os(Debouncer<notify::RecommendedWatcher, RecommendedCache>),
    Polling(Debouncer<notify::PollWatcher, notify_debouncer_full::FileIdMap>),
}

impl Watches {
    fn watch(&mut self, root: &Path) -> notify::Result<()> {
        match self {
            Watches::Os(d) => d.watch(root, RecursiveMode::Recursive),
            Watches::Polling(d) => d.watch(root, RecursiveMode::Recursive),
        }
    }

    fn unwatch(&mut self, root: &Path) -> notify::Result<()> {
        match self {
            Watches::Os(d) => d.unwatch(root),
            Watches::Polling(d) => d.unwatch(root),
        }
    }

    fn is_polling(&self) -> bool {
        matches!(self, Watches::Polling(_))
    }
}

/// Whether a watch failed because the OS's watch resources are used up (inotify's
/// `max_user_watches` or `max_user_instances`), which polling does not need.
fn is_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => matches!(
            io.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOSPC)
        ),
        _ => false,
    }
}

/// Why the OS cannot watch `root` but polling can, if that is why `e` happened: its limits
/// are used up, or a folder inside cannot be read (inotify needs read access to each folder,
/// and stops at the first it may not read; polling skips it). `None`: polling would not help.
fn poll_because(e: &notify::Error, root: &Path) -> Option<String> {
    if is_limit(e) {
        return Some(polling_reason(e));
    }
    let denied = matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied);
    let inside = e
        .paths
        .iter()
        .find(|p| p.as_path() != root && p.starts_with(root));
    match (denied, inside) {
        (true, Some(p)) => Some(format!(
            "{} cannot be read, and the OS's file events need every folder readable; the folders are polled every {} s instead. Fix: make it readable by the user the agent runs as, or remove it, and restart the agent",
            p.display(),
            POLL_EVERY.as_secs()
        )),
        _ => None,
    }
}

/// Why polling, for a person: the limit and how to raise it.
fn polling_reason(e: &notify::Error) -> String {
    format!(
        "the OS's file events cannot be had ({e}); the folders are polled every {} s instead. Fix: on Linux raise the inotify limits (sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512) and restart the agent",
        POLL_EVERY.as_secs()
    )
}

/// What the root keeper hears from the event handler and from [`FsWatcher`]'s drop.
enum KeeperMsg {
    /// The OS reported the watched folder itself removed or moved: its watch is dead.
    Gone(PathBuf),
    /// A watch could not be added (the OS's limit is reached): poll instead.
    Limit(String),
    Stop,
}

/// A watched folder, as the root keeper knows it.
enum RootState {
    Watched { id: FolderId, next_check: Instant },
    Missing { next_check: Instant, wait: Duration },
}

impl RootState {
    fn next_check(&self) -> Instant {
        match self {
            RootState::Watched { next_check, .. } | RootState::Missing { next_check, .. } => {
                *next_check
            }
        }
    }

    fn missing(now: Instant) -> RootState {
        RootState::Missing {
            next_check: now + RETURN_CHECK_FIRST,
            wait: RETURN_CHECK_FIRST,
        }
    }
}

/// Owns the OS watches: drops a watched folder's watch when the folder goes, looks for its
/// return with back-off, and watches it again when it is back. The one thread that says
/// [`FsEvent::RootGone`] and [`FsEvent::RootBack`], so they alternate for each folder.
struct RootKeeper {
    debouncer: Watches,
    roots: Vec<(PathBuf, RootState)>,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<FsEvent>>,
    /// Makes the polling watches, should the OS's give out.
    poller: Box<dyn Fn() -> Result<Watches, notify::Error> + Send>,
}

impl RootKeeper {
    fn run(mut self, rx: Receiver<KeeperMsg>) {
        loop {
            let next = self.roots.iter().map(|(_, s)| s.next_check()).min();
            let msg = match next {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match msg {
                Ok(KeeperMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(KeeperMsg::Gone(root)) => self.reported_gone(&root),
                Ok(KeeperMsg::Limit(why)) => self.poll_instead(why),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.check_due();
        }
    }

    fn send(&self, event: FsEvent) {
        let _ = self.tx.send(vec![event]);
    }

    /// Replaces the OS's watches with polling ones: a folder the OS could not watch would
    /// otherwise be blind. What changed meanwhile is found by a rescan.
    fn poll_instead(&mut self, why: String) {
        if self.debouncer.is_polling() {
            return;
        }
        match (self.poller)() {
            Ok(mut polling) => {
                for (root, state) in &mut self.roots {
                    if matches!(state, RootState::Watched { .. }) && polling.watch(root).is_err() {
                        *state = RootState::missing(Instant::now());
                    }
                }
                self.debouncer = polling;
                tracing::warn!("{why}");
                let mut events = vec![FsEvent::Polling(why)];
                events.extend(
                    self.roots
                        .iter()
                        .filter(|(_, s)| matches!(s, RootState::Watched { .. }))
                        .map(|(r, _)| FsEvent::Rescan(r.clone())),
                );
                let _ = self.tx.send(events);
            }
            Err(e) => tracing::error!("{why}; and polling could not be started either: {e}"),
        }
    }

    /// The OS said so: the watch is dead even if a folder is there again, so it is dropped and
    /// the folder looked for at once.
    fn reported_gone(&mut self, root: &Path) {
        let Some(i) = self.roots.iter().position(|(r, _)| r == root) else {
            return;
        };
        if matches!(self.roots[i].1, RootState::Watched { .. }) {
            self.lose(i);
        }
        self.roots[i].1 = RootState::Missing {
            next_check: Instant::now(),
            wait: RETURN_CHECK_FIRST,
        };
    }

    /// A watched folder is no longer watched: its watch goes (notify may have dropped it
    /// already) and the consumer is told.
    fn lose(&mut self, i: usize) {
        let root = self.roots[i].0.clone();
        let _ = self.debouncer.unwatch(&root);
        self.roots[i].1 = RootState::missing(Instant::now());
        tracing::warn!(
            "watched folder {} is gone (deleted, moved or unmounted): what was indexed from it stays in the index, and it is watched again once it is back",
            root.display()
        );
        self.send(FsEvent::RootGone(root));
    }

    fn check_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.roots.len() {
            if self.roots[i].1.next_check() > now {
                continue;
            }
            let root = self.roots[i].0.clone();
            let found = folder_id(&root);
            match (&self.roots[i].1, found) {
                (RootState::Watched { id, .. }, Some(found)) if *id == found => {
                    self.roots[i].1 = RootState::Watched {
                        id: found,
                        next_check: now + ROOT_CHECK_EVERY,
                    };
                }
                // Replaced by another folder under the same name (re-created, or a disk
                // mounted over it) with no event for the old one: watch the new one.
                (RootState::Watched { .. }, Some(_)) => {
                    tracing::warn!(
                        "watched folder {} was replaced by another folder of the same name; watching the new one",
                        root.display()
                    );
                    self.lose(i);
                    self.check_missing(i, now);
                }
                (RootState::Watched { .. }, None) => self.lose(i),
                (RootState::Missing { .. }, _) => self.check_missing(i, now),
            }
        }
    }

    /// Watches a missing folder if it is there, else looks again later, less often each time.
    fn check_missing(&mut self, i: usize, now: Instant) {
        let RootState::Missing { wait, .. } = self.roots[i].1 else {
            return;
        };
        let root = self.roots[i].0.clone();
        if let Some(id) = folder_id(&root) {
            match self.debouncer.watch(&root) {
                Ok(()) => {
                    self.roots[i].1 = RootState::Watched {
                        id,
                        next_check: now + ROOT_CHECK_EVERY,
                    };
                    tracing::info!("watched folder {} is there: watching it", root.display());
                    // After the watch, so that nothing written from now on is missed.
                    return self.send(FsEvent::RootBack(root));
                }
                Err(e) if poll_because(&e, &root).is_some() && !self.debouncer.is_polling() => {
                    let _ = self.debouncer.unwatch(&root);
                    self.poll_instead(poll_because(&e, &root).unwrap_or_default());
                    // Looked at again soon, now with polling.
                    self.roots[i].1 = RootState::missing(now);
                    return;
                }
                Err(e) => {
                    let _ = self.debouncer.unwatch(&root);
                    tracing::warn!(
                        "watched folder {} is back but cannot be watched yet: {e}",
                        root.display()
                    );
                }
            }
        }
        let wait = (wait * 3 / 2).min(RETURN_CHECK_MAX);
        self.roots[i].1 = RootState::Missing {
            next_check: now + wait,
            wait,
        };
    }
}

fn watch_error(path: &Path, e: &notify::Error) -> WatchError {
    WatchError::Watch {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Turns the debouncer's batches into ours; errors mean a rescan, and a watch the OS has no
/// room for means polling from now on.
fn event_handler(
    f: Filter,
    events_tx: tokio::sync::mpsc::UnboundedSender<Vec<FsEvent>>,
    keeper_tx: Sender<KeeperMsg>,
    polling: bool,
) -> impl FnMut(DebounceEventResult) + Send + 'static {
    move |res: DebounceEventResult| {
        let mut out = Vec::new();
        match res {
            Ok(events) => {
                for e in &events {
                    f.translate(&e.event, &mut out);
                }
            }
            // The poller reports what it cannot read on every pass (a locked folder, a link
            // loop); it loses no events, and the scans list those paths as refused.
            Err(errors) if polling => {
                for e in &errors {
                    tracing::debug!("poller: {e}");
                }
            }
            Err(errors) => {
                if let Some(limit) = errors.iter().find(|e| is_limit(e)) {
                    let _ = keeper_tx.send(KeeperMsg::Limit(polling_reason(limit)));
                }
                // The kernel queue overflowed or a watch broke: compare everything again.
                for e in &errors {
                    tracing::warn!("file watcher error, rescanning: {e}");
                }
                let roots: Vec<PathBuf> = errors
                    .iter()
                    .flat_map(|e| e.paths.iter().filter(|p| f.root_of(p).is_some()).cloned())
                    .collect();
                if roots.is_empty() {
                    out.extend(f.roots().iter().cloned().map(FsEvent::Rescan));
                } else {
                    out.extend(roots.into_iter().map(FsEvent::Rescan));
                }
            }
        }
        // A watched folder gone is the keeper's to say, after it has dropped the watch.
        let mut gone = Vec::new();
        out.retain(|e| match e {
            FsEvent::RootGone(root) => {
                gone.push(root.clone());
                false
            }
            _ => true,
        });
        if !out.is_empty() {
            let _ = events_tx.send(out);
        }
        for root in gone {
            let _ = keeper_tx.send(KeeperMsg::Gone(root));
        }
    }
}

/// Watches the folders of a [`Filter`] recursively and sends batches of [`FsEvent`]s. A
/// watched folder that goes away, or is missing at start, is watched from the moment it is
/// there ([`FsEvent::RootGone`], [`FsEvent::RootBack`]). Stops when dropped.
pub struct FsWatcher {
    keeper: Option<std::thread::JoinHandle<()>>,
    keeper_tx: Sender<KeeperMsg>,
    missing_at_start: Vec<PathBuf>,
    polling_at_start: Option<String>,
}

impl FsWatcher {
    /// `debounce` groups the events of one operation (a rename's two halves, a save's
    /// bursts); it is not the settle period, which the queue applies.
    pub fn start(
        filter: Filter,
        debounce: Duration,
        tx: tokio::sync::mpsc::UnboundedSender<Vec<FsEvent>>,
    ) -> Result<FsWatcher, WatchError> {
        let (keeper_tx, keeper_rx) = std::sync::mpsc::channel();
        let handler = {
            let (filter, tx, keeper_tx) = (filter.clone(), tx.clone(), keeper_tx.clone());
            move |polling: bool| {
                event_handler(filter.clone(), tx.clone(), keeper_tx.clone(), polling)
            }
        };
        let poller = {
            let handler = handler.clone();
            move || -> Result<Watches, notify::Error> {
                let config = notify::Config::default().with_poll_interval(POLL_EVERY);
                notify_debouncer_full::new_debouncer_opt(
                    debounce,
                    Some(debounce),
                    handler(true),
                    notify_debouncer_full::FileIdMap::new(),
                    config,
                )
                .map(Watches::Polling)
            }
        };
        // The debouncer thread wakes every tick; a tick as long as the timeout keeps an idle
        // agent nearly asleep.
        let (mut debouncer, mut polling) =
            match new_debouncer(debounce, Some(debounce), handler(false)) {
                Ok(d) => (Watches::Os(d), None),
                Err(e) if is_limit(&e) => {
                    let why = polling_reason(&e);
                    tracing::warn!("{why}");
                    (
                        poller().map_err(|e| watch_error(Path::new(""), &e))?,
                        Some(why),
                    )
                }
                Err(e) => return Err(watch_error(Path::new(""), &e)),
            };
        let now = Instant::now();
        let mut roots: Vec<(PathBuf, RootState)> = Vec::new();
        let mut missing_at_start = Vec::new();
        for root in filter.roots() {
            let state = match folder_id(root) {
                Some(id) => {
                    let mut watched = debouncer.watch(root);
                    if let Err(e) = &watched {
                        if let (Some(why), None) = (poll_because(e, root), &polling) {
                            // Every folder is polled then, not just this one: one mode is
                            // simpler to reason about, and the limit is per user anyway.
                            let _ = debouncer.unwatch(root);
                            tracing::warn!("{why}");
                            debouncer = poller().map_err(|e| watch_error(root, &e))?;
                            for (r, s) in &mut roots {
                                if matches!(s, RootState::Watched { .. })
                                    && debouncer.watch(r).is_err()
                                {
                                    *s = RootState::missing(now);
                                }
                            }
                            polling = Some(why);
                            watched = debouncer.watch(root);
                        }
                    }
                    match watched {
                        Ok(()) => RootState::Watched {
                            id,
                            next_check: now + ROOT_CHECK_EVERY,
                        },
                        // Gone in the meantime.
                        Err(_) if !root.is_dir() => RootState::missing(now),
                        Err(e) => return Err(watch_error(root, &e)),
                    }
                }
                None => RootState::missing(now),
            };
            if matches!(state, RootState::Missing { .. }) {
                missing_at_start.push(root.clone());
            }
            roots.push((root.clone(), state));
        }
        let keeper = RootKeeper {
            debouncer,
            roots,
            tx,
            poller: Box::new(poller),
        };
        let thread = std::thread::Builder::new()
            .name("watched folders".into())
            .spawn(move || keeper.run(keeper_rx))
            .map_err(|e| WatchError::Watch {
                path: PathBuf::new(),
                message: format!("cannot start the thread that keeps the watches: {e}"),
            })?;
        Ok(FsWatcher {
            keeper: Some(thread),
            keeper_tx,
            missing_at_start,
            polling_at_start: polling,
        })
    }

    /// Why the folders are polled from the start (the OS's events could not be had), if so.
    /// A switch later is sent as [`FsEvent::Polling`].
    pub fn polling_at_start(&self) -> Option<&str> {
        self.polling_at_start.as_deref()
    }

    /// The watched folders that were not there at start: each is watched once it appears
    /// ([`FsEvent::RootBack`]).
    pub fn missing_at_start(&self) -> &[PathBuf] {
        &self.missing_at_start
    }
}

impl Drop for FsWatcher {
    fn drop(&mut self) {
        let _ = self.keeper_tx.send(KeeperMsg::Stop);
        if let Some(t) = self.keeper.take() {
            let _ = t.join();
        }
    }
}
