//! The local cache directory that apps read.
//!
//! `cache_dir` is a symlink that tandem manages, pointing at the current
//! generation under `<data_dir>/generations/`. Normal batches are applied in
//! place (atomic per file, see [`generation`]); a cold boot builds a whole new
//! generation and swaps the symlink in one `rename`, so a reader never sees a
//! half-built cache. Reads go through the symlink, exactly as the app's own
//! reads do.

pub mod flush;
pub mod generation;
pub mod keys;
pub mod memory;
pub mod read;
pub mod versions;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memory::ValueCache;
use versions::Versions;

pub use generation::{DEFAULT_CONTENT_TYPE, Generation};

/// The cache directory: its symlink and its generations.
#[derive(Clone, Debug)]
pub struct CacheDir {
    link: PathBuf,
    generations: PathBuf,
    memory: Arc<ValueCache>,
    versions: Arc<Versions>,
    upload_events: Arc<crate::uploads::events::Events>,
}

/// Why the cache directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "cache_dir {0} exists and is not a symlink managed by tandem; move it away or choose another cache_dir"
    )]
    Foreign(PathBuf),
    #[error("cannot prepare the cache directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl CacheDir {
    /// Opens the cache directory, creating an empty first generation when
    /// there is none, and removes generations left over by an interrupted
    /// cold boot.
    /// `memory_budget` sizes the in-memory copy of small values used by the
    /// HTTP read path (0 disables it).
    pub fn open(
        link: &Path,
        data_dir: &Path,
        memory_budget: u64,
    ) -> Result<(Self, Generation), OpenError> {
        let generations = data_dir.join("generations");
        fs::create_dir_all(&generations).map_err(io_err(&generations))?;
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let dir = Self {
            link: link.to_path_buf(),
            generations,
            memory: Arc::new(ValueCache::new(memory_budget)),
            versions: Arc::default(),
            upload_events: Arc::default(),
        };
        let current = match fs::symlink_metadata(link) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(link).map_err(io_err(link))?;
                match target.strip_prefix(&dir.generations) {
                    Ok(rel) if rel.components().count() == 1 && target.is_dir() => {
                        Some(rel.to_string_lossy().into_owned())
                    }
                    _ if target.starts_with(&dir.generations) || !target.exists() => None,
                    _ => return Err(OpenError::Foreign(link.to_path_buf())),
                }
            }
            Ok(meta) if meta.is_dir() => {
                // An empty directory (e.g. made by a package) is taken over.
                if fs::read_dir(link).map_err(io_err(link))?.next().is_some() {
                    return Err(OpenError::Foreign(link.to_path_buf()));
                }
                fs::remove_dir(link).map_err(io_err(link))?;
                None
            }
            Ok(_) => return Err(OpenError::Foreign(link.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(link)(e)),
        };
        let generation = match current {
            Some(name) => Generation::open(dir.generations.join(name))
                .map_err(io_err(link))?
                .attach(dir.memory.clone()),
            None => {
                let g = dir.new_generation().map_err(io_err(link))?;
                dir.publish(&g).map_err(io_err(link))?;
                dir.sync_link_parent();
                g
            }
        };
        dir.remove_others(generation.name());
        dir.versions.reload(generation.root());
        Ok((dir, generation))
    }

    /// The in-memory copies of small values.
    pub fn memory(&self) -> &ValueCache {
        &self.memory
    }

    /// The in-memory copy of the version counters.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Registrations and withdrawals of uploads, as the applier meets them.
    pub fn upload_events(&self) -> &Arc<crate::uploads::events::Events> {
        &self.upload_events
    }

    /// The path apps read (the symlink).
    pub fn link(&self) -> &Path {
        &self.link
    }

    /// The path of a key's file, through the symlink.
    pub fn path_of(&self, cache: &str, key: &str) -> PathBuf {
        self.link.join(cache).join(keys::encode(key))
    }

    /// Reads a key through the symlink: `None` when absent.
    pub fn read(&self, cache: &str, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        read::read_value(&self.path_of(cache, key))
    }

    /// The keys of one cache, sorted.
    pub fn list(&self, cache: &str) -> io::Result<Vec<String>> {
        let mut keys = read::list_keys(&self.link.join(cache))?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// The caches that exist locally, sorted.
    pub fn caches(&self) -> io::Result<Vec<String>> {
        read::list_caches(&self.link)
    }

    /// Creates a fresh, empty generation (not yet visible).
    pub fn new_generation(&self) -> io::Result<Generation> {
        let mut highest = 0u64;
        for entry in fs::read_dir(&self.generations)? {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("g-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                highest = highest.max(n);
            }
        }
        let root = self.generations.join(format!("g-{:06}", highest + 1));
        fs::create_dir(&root)?;
        Ok(Generation::open(root)?.attach(self.memory.clone()))
    }

    /// Points the symlink at `generation` atomically (then call
    /// [`Self::sync_link_parent`] to make it durable).
    pub fn publish(&self, generation: &Generation) -> io::Result<()> {
        let parent = self.link.parent().unwrap_or(Path::new("/"));
        let file_name = self
            .link
            .file_name()
            .ok_or_else(|| io::Error::other("cache_dir has no file name"))?;
        let tmp = parent.join(format!(".{}.swap", file_name.to_string_lossy()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(generation.root(), &tmp)?;
        fs::rename(&tmp, &self.link)?;
        self.memory.clear();
        Ok(())
    }

    /// Makes the last [`Self::publish`] durable. A failure is logged: the
    /// swap has happened either way, and if a crash undid it the position
    /// (which names the generation) would no longer match and the host
    /// would cold-boot.
    pub fn sync_link_parent(&self) {
        let parent = self.link.parent().unwrap_or(Path::new("/"));
        if let Err(e) = fs::File::open(parent).and_then(|f| f.sync_all()) {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot sync the cache directory's parent");
        }
    }

    /// Deletes every generation but `keep`, in the background.
    pub fn remove_others(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.generations) else {
            return;
        };
        let doomed: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str() != Some(keep))
            .map(|e| e.path())
            .collect();
        if doomed.is_empty() {
            return;
        }
        std::thread::spawn(move || {
            for path in doomed {
                if let Err(e) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove old cache generation");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_a_published_generation_and_reopens_it() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("cache");
        let (dir, mut g) = CacheDir::open(&link, d.path(), 1 << 20).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        g.put("c", "k", b"v", "text/plain").unwrap();
        g.commit().unwrap();
        assert_eq!(dir.read("c", "k").unwrap().unwrap().0, b"v");
        let name = g.name().to_string();
        drop(g);
        let (_dir, g2) = CacheDir::open(&link, d.path(), 1 << 20).unwrap();
        assert_eq!(g2.name(), name);
    }

    #[test]
    fn swap_replaces_everything_at_once() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("cache");
        let (dir, mut old) = CacheDir::open(&link, d.path(), 1 << 20).unwrap();
        old.put("c", "old", b"1", DEFAULT_CONTENT_TYPE).unwrap();
        old.commit().unwrap();
        let mut fresh = dir.new_generation().unwrap();
        fresh
            .put_direct("c", "new", b"2", DEFAULT_CONTENT_TYPE)
            .unwrap();
        fresh.sync_all().unwrap();
        assert_eq!(dir.list("c").unwrap(), vec!["old".to_string()]);
        dir.publish(&fresh).unwrap();
        assert_eq!(dir.list("c").unwrap(), vec!["new".to_string()]);
        assert_ne!(old.name(), fresh.name());
    }

    #[test]
    fn refuses_a_foreign_directory() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("cache");
        fs::create_dir(&link).unwrap();
        fs::write(link.join("precious"), b"x").unwrap();
        assert!(matches!(
            CacheDir::open(&link, d.path(), 1 << 20),
            Err(OpenError::Foreign(_))
        ));
        // an empty directory is taken over
        fs::remove_file(link.join("precious")).unwrap();
        assert!(CacheDir::open(&link, d.path(), 1 << 20).is_ok());
    }
}
