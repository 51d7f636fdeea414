//! One cache generation: a directory `<data_dir>/generations/g-NNNNNN`
//! holding `<cache>/<encoded key>` files, written only by the applier.
//!
//! Writes are atomic and durable per batch: a value is written to a temp file
//! in `.tmp/` (same filesystem), and at [`Generation::commit`] the temp files
//! are flushed to disk (fsync each, or one `syncfs` for larger batches), then
//! renamed into place, then the touched directories are fsynced. A reader
//! therefore only ever sees a whole old file or a whole new one, and after a
//! crash the disk holds whole files only.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::keys;
use super::memory::ValueCache;

/// Extended attribute holding a value's content type (absent means
/// [`DEFAULT_CONTENT_TYPE`]).
pub const CONTENT_TYPE_XATTR: &str = "user.tandem.content_type";

/// The content type of a value stored without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Above this many staged files, one `syncfs` replaces per-file fsyncs.
const SYNCFS_THRESHOLD: usize = 8;

/// Staged bytes above which the stage is committed early (bounds temp disk
/// use within one large batch).
const MAX_STAGED_BYTES: u64 = 64 << 20;

/// A generation directory open for writing.
pub struct Generation {
    name: String,
    root: PathBuf,
    tmp: PathBuf,
    staged: Vec<Staged>,
    staged_bytes: u64,
    dirty_dirs: BTreeSet<PathBuf>,
    next_tmp: u64,
    xattrs: bool,
    /// Change in the number of entries since the last call to
    /// [`Generation::take_entry_delta`].
    entry_delta: i64,
    /// The in-memory copies to invalidate when a file changes (the live
    /// generation only).
    memory: Option<std::sync::Arc<ValueCache>>,
}

struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    cache: String,
    key: String,
    /// Kept open for small stages, to fsync without reopening.
    file: Option<File>,
}

impl Generation {
    /// Opens (creating if needed) the generation at `root`.
    pub fn open(root: PathBuf) -> io::Result<Self> {
        let name = root
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("generation directory has no name"))?
            .to_string();
        let tmp = root.join(".tmp");
        fs::create_dir_all(&tmp)?;
        // Temp files of a crashed batch are garbage.
        for entry in fs::read_dir(&tmp)? {
            let _ = fs::remove_file(entry?.path());
        }
        let xattrs = probe_xattrs(&tmp);
        Ok(Self {
            name,
            root,
            tmp,
            staged: Vec::new(),
            staged_bytes: 0,
            dirty_dirs: BTreeSet::new(),
            next_tmp: 0,
            xattrs,
            entry_delta: 0,
            memory: None,
        })
    }

    /// Invalidates `memory` whenever a file of this generation changes.
    pub fn attach(mut self, memory: std::sync::Arc<ValueCache>) -> Self {
        self.memory = Some(memory);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether content types can be kept (the filesystem has user xattrs).
    pub fn keeps_content_types(&self) -> bool {
        self.xattrs
    }

    fn dest(&self, cache: &str, key: &str) -> PathBuf {
        self.root.join(cache).join(keys::encode(key))
    }

    /// Stages a value; it becomes visible at the next [`Self::commit`].
    pub fn put(
        &mut self,
        cache: &str,
        key: &str,
        value: &[u8],
        content_type: &str,
    ) -> io::Result<()> {
        let dest = self.dest(cache, key);
        let tmp = self.tmp.join(self.next_tmp.to_string());
        self.next_tmp += 1;
        let file = write_file(&tmp, value, content_type, self.xattrs)?;
        let file = (self.staged.len() < SYNCFS_THRESHOLD).then_some(file);
        self.staged.push(Staged {
            tmp,
            dest,
            cache: cache.to_string(),
            key: key.to_string(),
            file,
        });
        self.staged_bytes += value.len() as u64;
        if self.staged_bytes > MAX_STAGED_BYTES {
            self.flush_staged()?;
        }
        Ok(())
    }

    /// Writes a value straight to its place, without durability: for
    /// building a fresh generation that no reader sees yet (cold boot).
    /// Call [`Self::sync_all`] before publishing it.
    pub fn put_direct(
        &mut self,
        cache: &str,
        key: &str,
        value: &[u8],
        content_type: &str,
    ) -> io::Result<()> {
        let dest = self.dest(cache, key);
        let result = write_file(&dest, value, content_type, self.xattrs);
        let result = match result {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dest.parent().expect("dest has a parent"))?;
                write_file(&dest, value, content_type, self.xattrs)
            }
            other => other,
        };
        drop(result?);
        self.entry_delta += 1;
        Ok(())
    }

    /// Removes a key's file (a staged put of the same key is committed
    /// first, so that order is kept).
    pub fn delete(&mut self, cache: &str, key: &str) -> io::Result<()> {
        let dest = self.dest(cache, key);
        if self.staged.iter().any(|s| s.dest == dest) {
            self.flush_staged()?;
        }
        match fs::remove_file(&dest) {
            Ok(()) => {
                if let Some(m) = &self.memory {
                    m.invalidate(cache, key);
                }
                self.entry_delta -= 1;
                let cache_dir = self.root.join(cache);
                let parent = dest.parent().expect("dest has a parent").to_path_buf();
                self.dirty_dirs.insert(parent.clone());
                remove_empty_parents(&parent, &cache_dir, &mut self.dirty_dirs);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every key of `cache` not in `keep`. Returns how many went.
    pub fn retain(&mut self, cache: &str, keep: &HashSet<String>) -> io::Result<usize> {
        if !self.staged.is_empty() {
            self.flush_staged()?;
        }
        let mut removed = 0;
        for key in self.keys(cache)? {
            if !keep.contains(&key) {
                self.delete(cache, &key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The keys of a cache (unordered).
    pub fn keys(&self, cache: &str) -> io::Result<Vec<String>> {
        list_keys(&self.root.join(cache))
    }

    /// The caches present (directories with a valid cache name).
    pub fn caches(&self) -> io::Result<Vec<String>> {
        list_caches(&self.root)
    }

    /// Counts every entry (for the entries gauge at start-up).
    pub fn count(&self) -> io::Result<u64> {
        let mut n = 0;
        for cache in self.caches()? {
            n += self.keys(&cache)?.len() as u64;
        }
        Ok(n)
    }

    /// Makes every staged write visible and every change durable.
    pub fn commit(&mut self) -> io::Result<()> {
        self.flush_staged()?;
        for dir in std::mem::take(&mut self.dirty_dirs) {
            match File::open(&dir) {
                Ok(f) => f.sync_all()?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Flushes everything written by [`Self::put_direct`] (one `syncfs`) and
    /// the directories.
    pub fn sync_all(&mut self) -> io::Result<()> {
        let dir = File::open(&self.root)?;
        rustix::fs::syncfs(&dir)?;
        dir.sync_all()
    }

    /// Drops staged writes (after a failed batch, which will be read again).
    pub fn discard_staged(&mut self) {
        for s in std::mem::take(&mut self.staged) {
            let _ = fs::remove_file(&s.tmp);
        }
        self.staged_bytes = 0;
    }

    /// Entries created minus entries removed since the last call.
    pub fn take_entry_delta(&mut self) -> i64 {
        std::mem::take(&mut self.entry_delta)
    }

    fn flush_staged(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        if self.staged.len() > SYNCFS_THRESHOLD {
            rustix::fs::syncfs(File::open(&self.tmp)?)?;
        } else {
            for s in &self.staged {
                match &s.file {
                    Some(f) => f.sync_data()?,
                    None => File::open(&s.tmp)?.sync_data()?,
                }
            }
        }
        for s in std::mem::take(&mut self.staged) {
            let existed = fs::symlink_metadata(&s.dest).is_ok();
            let parent = s.dest.parent().expect("dest has a parent").to_path_buf();
            if !existed && !parent.is_dir() {
                create_dirs(&parent, &self.root, &mut self.dirty_dirs)?;
            }
            fs::rename(&s.tmp, &s.dest)?;
            if let Some(m) = &self.memory {
                m.invalidate(&s.cache, &s.key);
            }
            if !existed {
                self.entry_delta += 1;
            }
            self.dirty_dirs.insert(parent);
        }
        self.staged_bytes = 0;
        Ok(())
    }
}

/// Writes a whole file with its content type; returns it still open.
fn write_file(path: &Path, value: &[u8], content_type: &str, xattrs: bool) -> io::Result<File> {
    let mut f = File::create(path)?;
    f.write_all(value)?;
    if xattrs
        && content_type != DEFAULT_CONTENT_TYPE
        && let Err(e) = rustix::fs::fsetxattr(
            &f,
            CONTENT_TYPE_XATTR,
            content_type.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
    {
        // A value without its content type beats a sync stalled on it.
        tracing::warn!(
            path = %path.display(),
            content_type_len = content_type.len(),
            error = %e,
            "cannot keep the content type; it will be served as application/octet-stream"
        );
    }
    Ok(f)
}

/// Whether the filesystem under `dir` keeps user xattrs.
fn probe_xattrs(dir: &Path) -> bool {
    let probe = dir.join("xattr-probe");
    let ok = File::create(&probe)
        .and_then(|f| {
            rustix::fs::fsetxattr(
                &f,
                CONTENT_TYPE_XATTR,
                b"text/plain",
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(io::Error::from)
        })
        .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Creates `dir` and its missing parents up to `root`, marking each parent
/// whose entries changed as dirty.
fn create_dirs(dir: &Path, root: &Path, dirty: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.is_dir() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) if p.starts_with(root) => cur = p,
            _ => break,
        }
    }
    for d in missing.into_iter().rev() {
        match fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(p) = d.parent() {
            dirty.insert(p.to_path_buf());
        }
    }
    Ok(())
}

/// Removes empty segment directories of long keys, up to the cache dir.
fn remove_empty_parents(dir: &Path, cache_dir: &Path, dirty: &mut BTreeSet<PathBuf>) {
    let mut cur = dir.to_path_buf();
    while cur != cache_dir && cur.starts_with(cache_dir) {
        if fs::remove_dir(&cur).is_err() {
            break;
        }
        dirty.remove(&cur);
        match cur.parent() {
            Some(p) => {
                dirty.insert(p.to_path_buf());
                cur = p.to_path_buf();
            }
            None => break,
        }
    }
}

/// Lists the decoded keys under a cache directory (recursing into the
/// segment directories of long keys). A missing directory has no keys.
pub fn list_keys(cache_dir: &Path) -> io::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut stack = vec![(cache_dir.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let rel = format!("{prefix}{name}");
            let ft = entry.file_type()?;
            if ft.is_dir() {
                if name.ends_with('+') {
                    stack.push((entry.path(), format!("{rel}/")));
                }
            } else if ft.is_file()
                && let Some(key) = keys::decode(&rel)
            {
                keys.push(key);
            }
        }
    }
    Ok(keys)
}

/// Lists cache directories under a generation root.
pub fn list_caches(root: &Path) -> io::Result<Vec<String>> {
    let mut caches = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string()
            && keys::check_cache(&name).is_ok()
        {
            caches.push(name);
        }
    }
    caches.sort();
    Ok(caches)
}

/// An open value file: the file, its size and its content type.
pub struct OpenValue {
    pub file: File,
    pub size: u64,
    pub content_type: String,
}

impl OpenValue {
    /// Reads the whole value. Files are replaced by rename, never written in
    /// place, so the open file keeps the size it had when opened.
    pub fn read_all(mut self) -> io::Result<Vec<u8>> {
        let mut value = vec![0; self.size as usize];
        io::Read::read_exact(&mut self.file, &mut value)?;
        Ok(value)
    }
}

/// Opens a value file: `None` when there is no such key.
pub fn open_value(path: &Path) -> io::Result<Option<OpenValue>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let content_type = content_type_of(&file);
    Ok(Some(OpenValue {
        file,
        size: meta.len(),
        content_type,
    }))
}

/// Reads a value and its content type from a file path.
pub fn read_value(path: &Path) -> io::Result<Option<(Vec<u8>, String)>> {
    match open_value(path)? {
        Some(v) => {
            let content_type = v.content_type.clone();
            Ok(Some((v.read_all()?, content_type)))
        }
        None => Ok(None),
    }
}

/// The content type kept with an open file.
pub fn content_type_of(f: &File) -> String {
    let mut buf = [0u8; 256];
    match rustix::fs::fgetxattr(f, CONTENT_TYPE_XATTR, &mut buf[..]) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => DEFAULT_CONTENT_TYPE.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> (tempfile::TempDir, Generation) {
        let dir = tempfile::tempdir().unwrap();
        let g = Generation::open(dir.path().join("g-000001")).unwrap();
        (dir, g)
    }

    #[test]
    fn put_is_invisible_until_commit() {
        let (_d, mut g) = generation();
        g.put("pages", "home", b"<h1>hi</h1>", "text/html").unwrap();
        let path = g.root().join("pages").join("home");
        assert!(!path.exists());
        g.commit().unwrap();
        let (v, ct) = read_value(&path).unwrap().unwrap();
        assert_eq!(v, b"<h1>hi</h1>");
        if g.keeps_content_types() {
            assert_eq!(ct, "text/html");
        }
        assert_eq!(g.take_entry_delta(), 1);
    }

    #[test]
    fn overwrite_delete_and_long_keys() {
        let (_d, mut g) = generation();
        let long = "x/".repeat(300);
        g.put("c", "a", b"1", DEFAULT_CONTENT_TYPE).unwrap();
        g.put("c", &long, b"long", DEFAULT_CONTENT_TYPE).unwrap();
        g.commit().unwrap();
        g.put("c", "a", b"2", DEFAULT_CONTENT_TYPE).unwrap();
        g.commit().unwrap();
        let mut keys = g.keys("c").unwrap();
        keys.sort();
        assert_eq!(keys, vec!["a".to_string(), long.clone()]);
        assert_eq!(read_value(&g.root().join("c/a")).unwrap().unwrap().0, b"2");
        assert_eq!(g.take_entry_delta(), 2);
        g.delete("c", &long).unwrap();
        g.delete("c", "missing").unwrap();
        g.commit().unwrap();
        assert_eq!(g.keys("c").unwrap(), vec!["a".to_string()]);
        // the segment directories of the long key are gone too
        assert_eq!(fs::read_dir(g.root().join("c")).unwrap().count(), 1);
        assert_eq!(g.take_entry_delta(), -1);
    }

    #[test]
    fn retain_removes_the_rest() {
        let (_d, mut g) = generation();
        for k in ["a", "b", "c"] {
            g.put("x", k, k.as_bytes(), DEFAULT_CONTENT_TYPE).unwrap();
        }
        g.put("y", "a", b"other cache", DEFAULT_CONTENT_TYPE)
            .unwrap();
        g.commit().unwrap();
        let keep: HashSet<String> = ["b".to_string()].into();
        assert_eq!(g.retain("x", &keep).unwrap(), 2);
        g.commit().unwrap();
        assert_eq!(g.keys("x").unwrap(), vec!["b".to_string()]);
        assert_eq!(g.keys("y").unwrap(), vec!["a".to_string()]);
        assert_eq!(g.count().unwrap(), 2);
    }

    #[test]
    fn many_puts_use_syncfs_and_stay_whole() {
        let (_d, mut g) = generation();
        for i in 0..100 {
            g.put("c", &format!("k{i}"), &[b'v'; 1024], DEFAULT_CONTENT_TYPE)
                .unwrap();
        }
        g.commit().unwrap();
        assert_eq!(g.keys("c").unwrap().len(), 100);
        assert_eq!(fs::read_dir(g.root().join(".tmp")).unwrap().count(), 0);
    }

    #[test]
    fn stray_files_are_not_keys() {
        let (_d, mut g) = generation();
        g.put("c", "real", b"1", DEFAULT_CONTENT_TYPE).unwrap();
        g.commit().unwrap();
        fs::write(g.root().join("c/.hidden"), b"x").unwrap();
        fs::write(g.root().join("c/not.canonical"), b"x").unwrap();
        fs::create_dir(g.root().join("Bad-Cache")).unwrap();
        assert_eq!(g.keys("c").unwrap(), vec!["real".to_string()]);
        assert_eq!(g.caches().unwrap(), vec!["c".to_string()]);
    }

    #[test]
    fn reading_missing_things() {
        let (_d, g) = generation();
        assert!(read_value(&g.root().join("nope/key")).unwrap().is_none());
        assert!(read_value(g.root()).unwrap().is_none());
    }
}
