//! The file-system source: which files count ([`Filter`]), what is there now ([`Filter::scan`]),
//! and what changes ([`FsWatcher`], notify + notify-debouncer-full turned into [`FsEvent`]s).
//!
//! What the OS reports is translated here once, so nothing downstream knows about inotify or
//! FSEvents quirks: an atomic save (a `Create` of a path we know) is just a change, `Name(To)`
//! a creation, `Name(From)` a removal, `Access` nothing, a lost event queue a rescan.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use ignore::gitignore::Gitignore;
use notify::event::{EventKind, ModifyKind, RenameMode};
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
    /// A file or a folder is gone: everything known at or under the path goes with it.
    Removed(PathBuf),
    /// A file or folder was renamed or moved within the watched folders.
    Renamed { from: PathBuf, to: PathBuf },
    /// Events may have been lost, or a folder appeared, or its ignore rules changed: the
    /// subtree must be compared with what is known.
    Rescan(PathBuf),
}

/// A folder's ignore file as last read: its mtime (`None`: no file) and its rules.
type ParsedIgnoreFile = (Option<SystemTime>, Option<Arc<Gitignore>>);

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
    let lower = name.to_ascii_lowercase();
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
    TEMP_SUFFIXES.iter().any(|s| lower.ends_with(s))
}

impl Filter {
    /// `roots` must exist; they are canonicalised (event paths are compared with them).
    pub fn new(
        roots: &[PathBuf],
        include: &[String],
        exclude: &[String],
    ) -> Result<Filter, WatchError> {
        let mut canon = Vec::new();
        for r in roots {
            let c = std::fs::canonicalize(r).map_err(|source| WatchError::Folder {
                path: r.clone(),
                source,
            })?;
            if !c.is_dir() {
                return Err(WatchError::Folder {
                    path: r.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder"),
                });
            }
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

    /// Configured globs and supported formats, on a path relative to its watched folder.
    fn accepts_rules(&self, rel: &Path, is_dir: bool) -> bool {
        if self.inner.exclude.is_match(rel) {
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
    /// mtime. Symlinks are not followed, so nothing outside the watched folders is reached.
    /// Unreadable folders are skipped with a warning.
    pub fn scan(&self, dir: &Path) -> Vec<(PathBuf, FileStamp)> {
        if self.root_of(dir).is_none() || !(self.root_of(dir) == Some(dir) || self.accepts_dir(dir))
        {
            return Vec::new();
        }
        let filter = self.clone();
        // Each folder's ignore file is looked up once per scan, not once per file.
        let seen: Mutex<HashMap<PathBuf, Option<Arc<Gitignore>>>> = Mutex::new(HashMap::new());
        let mut builder = ignore::WalkBuilder::new(dir);
        builder
            .standard_filters(false)
            .follow_links(false)
            .filter_entry(move |e| {
                let is_dir = e.file_type().is_some_and(|t| t.is_dir());
                if e.depth() == 0 {
                    return true;
                }
                let lookup = |d: &Path| {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(gi) = seen.get(d) {
                        return gi.clone();
                    }
                    let gi = filter.ignore_file(d);
                    seen.insert(d.to_path_buf(), gi.clone());
                    gi
                };
                filter.accepts_with(e.path(), is_dir, true, &lookup)
            });
        let mut out = Vec::new();
        for entry in builder.build() {
            match entry {
                Ok(e) => {
                    if !e.file_type().is_some_and(|t| t.is_file()) {
                        continue;
                    }
                    match e.metadata() {
                        Ok(md) => out.push((e.into_path(), FileStamp::of_metadata(&md))),
                        Err(err) => tracing::warn!("cannot read {}: {err}", e.path().display()),
                    }
                }
                Err(err) => tracing::warn!("skipped while scanning {}: {err}", dir.display()),
            }
        }
        out
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
            EventKind::Access(_) => {}
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if event.paths.len() == 2 => {
                self.renamed(&event.paths[0], &event.paths[1], out);
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                for p in &event.paths {
                    self.gone(p, out);
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
        // Stale: something is there again (events of an atomic save can arrive late).
        if std::fs::symlink_metadata(path).is_ok() {
            return self.present(path, out);
        }
        out.push(FsEvent::Removed(path.to_path_buf()));
    }

    fn present(&self, path: &Path, out: &mut Vec<FsEvent>) {
        if self.root_of(path).is_none() {
            return;
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
                    out.push(FsEvent::Changed(path.to_path_buf()));
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
                    (false, true) => self.present(to, out),
                    (false, false) => {}
                }
            }
            // Moved again since, or out of the watched folders.
            _ => {
                if from_inside {
                    out.push(FsEvent::Removed(from.to_path_buf()));
                }
                if to_inside {
                    self.present(to, out);
                }
            }
        }
    }
}

/// Watches the folders of a [`Filter`] recursively and sends batches of [`FsEvent`]s. Stops
/// when dropped.
pub struct FsWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl FsWatcher {
    /// `debounce` groups the events of one operation (a rename's two halves, a save's
    /// bursts); it is not the settle period, which the queue applies.
    pub fn start(
        filter: Filter,
        debounce: Duration,
        tx: tokio::sync::mpsc::UnboundedSender<Vec<FsEvent>>,
    ) -> Result<FsWatcher, WatchError> {
        let f = filter.clone();
        let handler = move |res: DebounceEventResult| {
            let mut out = Vec::new();
            match res {
                Ok(events) => {
                    for e in &events {
                        f.translate(&e.event, &mut out);
                    }
                }
                Err(errors) => {
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
            if !out.is_empty() {
                let _ = tx.send(out);
            }
        };
        // The debouncer thread wakes every tick; a tick as long as the timeout keeps an idle
        // agent nearly asleep.
        let mut debouncer =
            new_debouncer(debounce, Some(debounce), handler).map_err(|e| WatchError::Watch {
                path: PathBuf::new(),
                message: e.to_string(),
            })?;
        for root in filter.roots() {
            debouncer
                .watch(root, RecursiveMode::Recursive)
                .map_err(|e| WatchError::Watch {
                    path: root.clone(),
                    message: e.to_string(),
                })?;
        }
        Ok(FsWatcher {
            _debouncer: debouncer,
        })
    }
}
