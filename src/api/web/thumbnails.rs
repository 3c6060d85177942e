//! Page thumbnails for the web page: rendered on demand by the isolated extraction worker,
//! kept as PNG files under the state directory, named by document, page and content hash (a
//! changed file gets new names, and its old thumbnails are deleted), the least recently used
//! deleted once the folder is above its size cap.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::types::{ContentHash, DocId};

#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("the thumbnail cache {dir} cannot be written: {source}. Fix: check the state directory's permissions and free space")]
    Cache {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the page could not be encoded as PNG: {0}")]
    Encode(#[from] image::ImageError),
}

/// PNG thumbnails on disk, below a size cap.
#[derive(Debug)]
pub struct ThumbnailCache {
    dir: PathBuf,
    cap_bytes: u64,
    /// One writer at a time keeps the size accounting simple; renders run outside it.
    write: Mutex<()>,
}

impl ThumbnailCache {
    pub fn new(dir: PathBuf, cap_bytes: u64) -> ThumbnailCache {
        ThumbnailCache {
            dir,
            cap_bytes,
            write: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a page of this content is cached in.
    fn file(&self, doc: &DocId, page: u32, hash: &ContentHash) -> PathBuf {
        let short: String = hash.0.chars().take(16).collect();
        self.dir
            .join(format!("{}-{page:05}-{short}.png", doc.as_str()))
    }

    /// The cached PNG of this page of this content, marked as just used.
    pub fn get(&self, doc: &DocId, page: u32, hash: &ContentHash) -> Option<Vec<u8>> {
        let path = self.file(doc, page, hash);
        let bytes = std::fs::read(&path).ok()?;
        // The modification time orders the cache for eviction.
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(bytes)
    }

    /// Encodes `image` as PNG; when `keep` (the file on disk is still the content the store
    /// knows), stores it in place of this page's older thumbnails and trims the cache to its cap.
    pub fn put(
        &self,
        doc: &DocId,
        page: u32,
        hash: &ContentHash,
        image: &image::RgbImage,
        keep: bool,
    ) -> Result<Vec<u8>, ThumbnailError> {
        let mut png = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
        if !keep {
            return Ok(png);
        }
        let cache_err = |source| ThumbnailError::Cache {
            dir: self.dir.clone(),
            source,
        };
        let _one = self.write.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::create_dir_all(&self.dir).map_err(cache_err)?;
        let path = self.file(doc, page, hash);
        // Another content's thumbnails of this page are stale now.
        let prefix = format!("{}-{page:05}-", doc.as_str());
        for (old, _, _) in self.entries().map_err(cache_err)? {
            let stale = old
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix));
            if stale && old != path {
                let _ = std::fs::remove_file(&old);
            }
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(cache_err)?;
        f.write_all(&png).map_err(cache_err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(cache_err)?;
        self.trim().map_err(cache_err)?;
        Ok(png)
    }

    /// Deletes the least recently used thumbnails until the cache is below its cap.
    fn trim(&self) -> std::io::Result<()> {
        let mut entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
        if total <= self.cap_bytes {
            return Ok(());
        }
        entries.sort_by_key(|(_, _, used)| *used);
        for (path, size, _) in entries {
            if total <= self.cap_bytes {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= size;
        }
        Ok(())
    }

    /// The cached PNGs: path, size, last use.
    fn entries(&self) -> std::io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        let dir = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in dir {
            let entry = entry?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "png") {
                continue;
            }
            let md = entry.metadata()?;
            if md.is_file() {
                let used = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((path, md.len(), used));
            }
        }
        Ok(out)
    }
}
