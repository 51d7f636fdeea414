//! One cache generation: a directory `<data_dir>/generations/g-NNNNNN`
//! holding `<cache>/<encoded key>` files, written only by the applier.
//!
//! Writes are atomic and durable per batch: a value is written to a file
//! no reader can see, and at [`Generation::commit`] those files are flushed
//! to disk (fsync each, or one `syncfs`, whichever is expected to be cheaper:
//! see [`super::flush`]), then put in
//! place, then the touched directories are fsynced. A `syncfs` may run on a
//! helper thread while the next batch is staged ([`Generation::begin_flush`]). A reader therefore only
//! ever sees a whole old file or a whole new one, and after a crash the disk
//! holds whole files only.
//!
//! The invisible file is, where the filesystem allows, an unnamed one
//! (`O_TMPFILE` in the destination directory) that is linked into place:
//! one directory operation for a new key. When the key already exists (or
//! the filesystem lacks `O_TMPFILE`) it is a named file in `.tmp/` renamed
//! over the old one.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::flush::{FlushCosts, Method};
use super::keys;
use super::memory::ValueCache;
use super::read::{list_caches, list_keys};

/// Extended attribute holding a value's content type (absent means
/// [`DEFAULT_CONTENT_TYPE`]).
pub const CONTENT_TYPE_XATTR: &str = "user.tandem.content_type";

/// The content type of a value stored without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// Named temp files of a stage up to this size stay open (to fsync them
/// without reopening them).
const KEEP_OPEN_NAMED: usize = 8;

/// Staged bytes above which the stage is committed early (bounds temp disk
/// use within one large batch).
const MAX_STAGED_BYTES: u64 = 64 << 20;

/// While building a generation, flush every this many files. Without it,
/// filesystems without a journal (ext4 `^has_journal`) slow down inode
/// allocation more and more as dirty inode-table blocks pile up.
const BUILD_FLUSH_EVERY: u64 = 8192;

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
    /// Whether unnamed files (`O_TMPFILE`) work here.
    unnamed: bool,
    /// Unnamed files staged (each holds a descriptor), those of a flush in
    /// flight, and the cap on both together.
    open_unnamed: usize,
    flushing_unnamed: usize,
    max_unnamed: usize,
    /// What flushing a stage costs, either way.
    flush_costs: FlushCosts,
    /// A stage is being flushed by [`Generation::begin_flush`].
    flushing: bool,
}

/// A stage whose `syncfs` runs on a helper thread (see
/// [`Generation::begin_flush`]); its files are not in place yet.
pub struct Flushing {
    staged: Vec<Staged>,
    sync: std::thread::JoinHandle<rustix::io::Result<std::time::Duration>>,
    synced: Arc<AtomicBool>,
}

impl Flushing {
    /// Whether the flush is done ([`Generation::finish_flush`] will not
    /// wait for it).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

struct Staged {
    dest: PathBuf,
    cache: String,
    key: String,
    /// The file, kept open: always for unnamed files, for named ones only
    /// in small stages (to fsync without reopening).
    file: Option<File>,
    /// The named temp file in `.tmp/`; `None` for an unnamed file.
    tmp: Option<PathBuf>,
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
        let unnamed = probe_unnamed(&tmp);
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let max_unnamed = usize::try_from(soft / 4)
            .unwrap_or(usize::MAX)
            .clamp(16, 4096);
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
            unnamed,
            open_unnamed: 0,
            flushing_unnamed: 0,
            max_unnamed,
            flush_costs: FlushCosts::default(),
            flushing: false,
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
        let (file, tmp) = match self.stage_unnamed(&dest, value, content_type)? {
            Some(file) => (Some(file), None),
            None => {
                let tmp = self.tmp.join(self.next_tmp.to_string());
                self.next_tmp += 1;
                let file = write_file(&tmp, value, content_type, self.xattrs)?;
                let small = self.staged.len() < KEEP_OPEN_NAMED;
                (small.then_some(file), Some(tmp))
            }
        };
        self.staged.push(Staged {
            dest,
            cache: cache.to_string(),
            key: key.to_string(),
            file,
            tmp,
        });
        self.staged_bytes += value.len() as u64;
        if self.staged_bytes > MAX_STAGED_BYTES {
            self.flush_staged()?;
        }
        Ok(())
    }

    /// Writes `value` into an unnamed file in `dest`'s directory, when
    /// possible.
    fn stage_unnamed(
        &mut self,
        dest: &Path,
        value: &[u8],
        content_type: &str,
    ) -> io::Result<Option<File>> {
        if !self.unnamed || self.open_unnamed + self.flushing_unnamed >= self.max_unnamed {
            return Ok(None);
        }
        let parent = dest.parent().expect("dest has a parent");
        let open = || {
            rustix::fs::open(
                parent,
                rustix::fs::OFlags::TMPFILE
                    | rustix::fs::OFlags::WRONLY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o644),
            )
        };
        // The directory almost always exists: create it only when the open
        // says it does not (a stat per value cost 1.5 % of a host's CPU).
        let fd = match open() {
            Err(rustix::io::Errno::NOENT) => {
                create_dirs(parent, &self.root, &mut self.dirty_dirs)?;
                open()
            }
            other => other,
        };
        let Ok(fd) = fd else {
            return Ok(None);
        };
        let mut file = File::from(fd);
        file.write_all(value)?;
        set_content_type(&file, dest, content_type, self.xattrs);
        self.open_unnamed += 1;
        Ok(Some(file))
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
        if (self.entry_delta as u64).is_multiple_of(BUILD_FLUSH_EVERY) {
            rustix::fs::syncfs(File::open(&self.root)?)?;
        }
        Ok(())
    }

    /// Removes a key's file (a staged put of the same key is committed
    /// first, so that order is kept).
    pub fn delete(&mut self, cache: &str, key: &str) -> io::Result<()> {
        debug_assert!(!self.flushing, "the in-flight flush comes first");
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

    /// The directories changed since the last call, to fsync.
    pub fn take_dirty_dirs(&mut self) -> BTreeSet<PathBuf> {
        std::mem::take(&mut self.dirty_dirs)
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
        let staged = self.take_stage();
        drop_stage(staged);
    }

    /// Entries created minus entries removed since the last call.
    pub fn take_entry_delta(&mut self) -> i64 {
        std::mem::take(&mut self.entry_delta)
    }

    /// Whether staging `len` more bytes would commit the stage early
    /// (see [`Self::put`]).
    pub fn flush_due(&self, len: usize) -> bool {
        self.staged_bytes + len as u64 > MAX_STAGED_BYTES
    }

    /// Starts making the stage durable without waiting for it, when one
    /// `syncfs` is the expected cheaper way: the `syncfs` runs on a helper
    /// thread while the caller stages the next batch, and
    /// [`Self::finish_flush`] puts the files in place. Answers `None` when
    /// it did everything at once instead (an empty stage, or one flushed
    /// file by file): then the stage is visible.
    ///
    /// Until `finish_flush`, only [`Self::put`]s that do not commit the
    /// stage early (see [`Self::flush_due`]) may follow: anything that
    /// changes what readers see must wait for the in-flight files first.
    /// `wake` is called on the helper thread once the flush is done
    /// ([`Flushing::synced`] is true by then).
    pub fn begin_flush(
        &mut self,
        wake: impl FnOnce() + Send + 'static,
    ) -> io::Result<Option<Flushing>> {
        debug_assert!(!self.flushing, "one flush in flight at a time");
        if self.staged.is_empty() {
            return Ok(None);
        }
        if self.flush_costs.choose(self.staged.len()) == Method::PerFile {
            return self.flush_now(Method::PerFile).map(|()| None);
        }
        let dir = File::open(&self.tmp)?;
        let synced = Arc::new(AtomicBool::new(false));
        let flag = synced.clone();
        let sync = std::thread::Builder::new()
            .name("tandem-syncfs".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let result = rustix::fs::syncfs(&dir).map(|()| started.elapsed());
                flag.store(true, Ordering::Release);
                wake();
                result
            });
        let Ok(sync) = sync else {
            // No thread to spare: flush here.
            return self.flush_now(Method::Syncfs).map(|()| None);
        };
        self.flushing = true;
        self.flushing_unnamed = self.open_unnamed;
        Ok(Some(Flushing {
            staged: self.take_stage(),
            sync,
            synced,
        }))
    }

    /// Waits for a flush started by [`Self::begin_flush`] and puts its
    /// files in place, in order. If the flush fails, none of them is; if
    /// putting one in place fails, those before it stay.
    pub fn finish_flush(&mut self, f: Flushing) -> io::Result<()> {
        self.flushing = false;
        self.flushing_unnamed = 0;
        let synced = f.sync.join().unwrap_or(Err(rustix::io::Errno::IO));
        match synced {
            Ok(took) => {
                self.flush_costs
                    .record(Method::Syncfs, f.staged.len(), took);
                self.link_all(f.staged)
            }
            Err(e) => {
                drop_stage(f.staged);
                Err(e.into())
            }
        }
    }

    fn flush_staged(&mut self) -> io::Result<()> {
        debug_assert!(!self.flushing, "the in-flight flush comes first");
        if self.staged.is_empty() {
            return Ok(());
        }
        let method = self.flush_costs.choose(self.staged.len());
        self.flush_now(method)
    }

    /// Flushes the stage with `method` and puts it in place.
    fn flush_now(&mut self, method: Method) -> io::Result<()> {
        let files = self.staged.len();
        let started = std::time::Instant::now();
        match method {
            Method::Syncfs => rustix::fs::syncfs(File::open(&self.tmp)?)?,
            Method::PerFile => {
                for s in &self.staged {
                    match (&s.file, &s.tmp) {
                        (Some(f), _) => f.sync_data()?,
                        (None, Some(tmp)) => File::open(tmp)?.sync_data()?,
                        (None, None) => unreachable!("unnamed files stay open"),
                    }
                }
            }
        }
        self.flush_costs.record(method, files, started.elapsed());
        let staged = self.take_stage();
        self.link_all(staged)
    }

    /// Takes the stage out, leaving an empty one.
    fn take_stage(&mut self) -> Vec<Staged> {
        self.open_unnamed = 0;
        self.staged_bytes = 0;
        std::mem::take(&mut self.staged)
    }

    /// Puts flushed files in place, in order.
    fn link_all(&mut self, staged: Vec<Staged>) -> io::Result<()> {
        let mut staged = staged.into_iter();
        for s in staged.by_ref() {
            if let Err(e) = self.link_one(&s) {
                drop_stage(staged);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Puts one flushed file in place.
    fn link_one(&mut self, s: &Staged) -> io::Result<()> {
        let parent = s.dest.parent().expect("dest has a parent").to_path_buf();
        let created = match (&s.tmp, &s.file) {
            (None, Some(file)) => self.link_unnamed(file, &s.dest)?,
            (Some(tmp), _) => {
                let existed = fs::symlink_metadata(&s.dest).is_ok();
                if !existed && !parent.is_dir() {
                    create_dirs(&parent, &self.root, &mut self.dirty_dirs)?;
                }
                fs::rename(tmp, &s.dest)?;
                !existed
            }
            (None, None) => unreachable!("unnamed files stay open"),
        };
        if let Some(m) = &self.memory {
            m.invalidate(&s.cache, &s.key);
        }
        if created {
            self.entry_delta += 1;
        }
        self.dirty_dirs.insert(parent);
        Ok(())
    }

    /// Puts a flushed unnamed file in place. True when the key is new.
    fn link_unnamed(&mut self, file: &File, dest: &Path) -> io::Result<bool> {
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(file));
        let link = |to: &Path| {
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc.as_str(),
                rustix::fs::CWD,
                to,
                rustix::fs::AtFlags::SYMLINK_FOLLOW,
            )
        };
        match link(dest) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => {
                // Replace atomically: give it a name, rename that over.
                let tmp = self.tmp.join(self.next_tmp.to_string());
                self.next_tmp += 1;
                link(&tmp)?;
                fs::rename(&tmp, dest)?;
                Ok(false)
            }
            Err(rustix::io::Errno::NOENT) => {
                // Its directory went away (the last long key under it was
                // deleted in this batch): recreate it and link again.
                let parent = dest.parent().expect("dest has a parent");
                create_dirs(parent, &self.root, &mut self.dirty_dirs)?;
                link(dest)?;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Drops staged files that will not be put in place (unnamed ones vanish
/// when closed; named ones are removed).
fn drop_stage(staged: impl IntoIterator<Item = Staged>) {
    for s in staged {
        if let Some(tmp) = &s.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes a whole file with its content type; returns it still open.
fn write_file(path: &Path, value: &[u8], content_type: &str, xattrs: bool) -> io::Result<File> {
    let mut f = File::create(path)?;
    f.write_all(value)?;
    set_content_type(&f, path, content_type, xattrs);
    Ok(f)
}

/// Keeps the content type in an xattr (absent means the default).
fn set_content_type(f: &File, path: &Path, content_type: &str, xattrs: bool) {
    if xattrs
        && content_type != DEFAULT_CONTENT_TYPE
        && let Err(e) = rustix::fs::fsetxattr(
            f,
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
}

/// Whether unnamed files can be made in `dir` and linked into place.
fn probe_unnamed(dir: &Path) -> bool {
    let link = dir.join("unnamed-probe");
    let _ = fs::remove_file(&link);
    let ok = rustix::fs::open(
        dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .and_then(|fd| {
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc.as_str(),
            rustix::fs::CWD,
            &link,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
    })
    .is_ok();
    let _ = fs::remove_file(&link);
    ok
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::read::read_value;

    fn generation() -> (tempfile::TempDir, Generation) {
        let dir = tempfile::tempdir().unwrap();
        let g = Generation::open(dir.path().join("g-000001")).unwrap();
        (dir, g)
    }

    /// The same generation, with named temp files only (as on filesystems
    /// without `O_TMPFILE`).
    fn named_only() -> (tempfile::TempDir, Generation) {
        let (d, mut g) = generation();
        g.unnamed = false;
        (d, g)
    }

    #[test]
    fn both_staging_paths_write_whole_files() {
        for (d, mut g) in [generation(), named_only()] {
            let long = "y/".repeat(200);
            for round in 0..3u8 {
                // new keys, overwrites, a long key whose directories come and go
                for k in ["a", "b", long.as_str()] {
                    g.put("c", k, &[round; 100], "text/plain").unwrap();
                }
                g.commit().unwrap();
                g.delete("c", &long).unwrap();
                g.commit().unwrap();
                g.put("c", &long, &[round; 7], DEFAULT_CONTENT_TYPE)
                    .unwrap();
                g.commit().unwrap();
            }
            let mut keys = g.keys("c").unwrap();
            keys.sort();
            assert_eq!(keys.len(), 3);
            assert_eq!(
                read_value(&g.root().join("c/a")).unwrap().unwrap().0,
                vec![2; 100]
            );
            assert_eq!(g.take_entry_delta(), 3);
            assert_eq!(fs::read_dir(g.root().join(".tmp")).unwrap().count(), 0);
            drop(d);
        }
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
    fn a_flush_in_flight_shows_nothing_until_finished() {
        for (_d, mut g) in [generation(), named_only()] {
            for i in 0..100 {
                g.put("c", &format!("k{i}"), b"old", DEFAULT_CONTENT_TYPE)
                    .unwrap();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let flushing = g
                .begin_flush(move || tx.send(()).unwrap())
                .unwrap()
                .expect("a stage of 100 files is flushed with syncfs");
            // The next batch stages meanwhile, invisible too.
            g.put("c", "k0", b"new", DEFAULT_CONTENT_TYPE).unwrap();
            rx.recv().unwrap();
            assert!(flushing.synced());
            assert!(g.keys("c").unwrap().is_empty(), "nothing in place yet");
            g.finish_flush(flushing).unwrap();
            assert_eq!(g.keys("c").unwrap().len(), 100);
            assert_eq!(value(&g, "k0"), b"old");
            g.commit().unwrap();
            assert_eq!(value(&g, "k0"), b"new");
            assert_eq!(value(&g, "k99"), b"old");
            assert_eq!(g.take_entry_delta(), 100);
            assert_eq!(fs::read_dir(g.root().join(".tmp")).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_small_stage_is_flushed_at_once() {
        let (_d, mut g) = generation();
        g.put("c", "k", b"v", DEFAULT_CONTENT_TYPE).unwrap();
        let flushing = g.begin_flush(|| {}).unwrap();
        assert!(flushing.is_none());
        assert_eq!(value(&g, "k"), b"v");
    }

    fn value(g: &Generation, key: &str) -> Vec<u8> {
        read_value(&g.dest("c", key)).unwrap().unwrap().0
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
