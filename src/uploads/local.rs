//! This host's local copies of uploads (`<dir>/files/<id>`): fetched from
//! the store on first read (or at once with `uploads.mirror`) and verified
//! against their sha256, removed when their upload is withdrawn, trimmed
//! to `uploads.local_cache_size` least recently used first. [`run`] is the
//! per-host task that keeps them in line with the registry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::events::Event;
use super::sink::{HashingFile, copy_hashing};
use super::store::StoreError;
use super::{Meta, UPLOADS_CACHE, UploadError, Uploads, valid_id};
use crate::app::App;

/// What one fetch found.
enum Fetched {
    /// Size and sha256 match (the bytes too, when asked for and small).
    Verified(Option<Bytes>),
    Mismatch,
}

/// How often each host reconciles its local copies with the registry.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// A local copy younger than this is not removed for being unregistered
/// (its registration may not have been applied here yet).
const YOUNG: Duration = Duration::from_secs(600);

/// Numbers the fetches of this process, so that no two write the same
/// temporary file.
static FETCHES: AtomicU64 = AtomicU64::new(0);

/// A request's turn to make the local copy of one upload: the upload's
/// lock, held. When dropped, the lock is released and forgotten unless
/// another request holds or waits for it (each holds a clone; clones are
/// only made under the map's mutex, where this is decided).
struct FetchTurn {
    uploads: Arc<Uploads>,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl FetchTurn {
    async fn take(uploads: &Arc<Uploads>, id: &str) -> Self {
        let lock = {
            let mut map = uploads.fetching.lock().expect("not poisoned");
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        Self {
            uploads: uploads.clone(),
            id: id.to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for FetchTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.uploads.fetching.lock().expect("not poisoned");
        let ours = map
            .get(&self.id)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock));
        // The map's clone and ours: nobody else.
        if ours && Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.id);
        }
    }
}

impl Uploads {
    /// The local copy of an upload, fetched from the store (and verified)
    /// when this host has none.
    pub async fn local_path(&self, app: &Arc<App>, meta: &Meta) -> Result<PathBuf, UploadError> {
        self.local_copy(app, meta, 0).await.map(|(path, _)| path)
    }

    /// Like [`Self::local_path`]; when this call fetched an upload of at
    /// most `keep` bytes, also the verified bytes themselves, so that the
    /// first read need not read the new copy back. One fetch per upload at
    /// a time; it runs to its end even if the request that started it is
    /// gone (others may be waiting for it).
    pub async fn local_copy(
        &self,
        app: &Arc<App>,
        meta: &Meta,
        keep: u64,
    ) -> Result<(PathBuf, Option<Bytes>), UploadError> {
        if !valid_id(&meta.id) {
            return Err(UploadError::Missing(meta.id.clone()));
        }
        let path = self.files.join(&meta.id);
        if self.is_verified(&meta.id) && self.usable(&path, meta) {
            return Ok((path, None));
        }
        let turn = FetchTurn::take(&app.uploads, &meta.id).await;
        if self.usable(&path, meta) && self.check(meta, &path).await {
            return Ok((path, None));
        }
        let (app, meta) = (app.clone(), meta.clone());
        tokio::spawn(async move {
            let result = app.uploads.fetch(&app, &meta, &path, keep).await;
            drop(turn);
            result
        })
        .await
        .map_err(|e| UploadError::Local(std::io::Error::other(e)))?
    }

    pub(super) fn is_verified(&self, id: &str) -> bool {
        self.verified.lock().expect("not poisoned").contains(id)
    }

    pub(super) fn mark_verified(&self, id: &str) {
        self.verified
            .lock()
            .expect("not poisoned")
            .insert(id.to_string());
    }

    /// Whether a copy this process has not checked yet (one found on disk
    /// at start) matches its sha256; a copy that does not is removed.
    async fn check(&self, meta: &Meta, path: &Path) -> bool {
        if self.is_verified(&meta.id) {
            return true;
        }
        let (p, id) = (path.to_path_buf(), meta.id.clone());
        let sha = tokio::task::spawn_blocking(move || super::sink::sha256_of(&p))
            .await
            .ok()
            .and_then(Result::ok);
        if sha.as_deref() == Some(meta.sha256.as_str()) {
            self.mark_verified(&meta.id);
            return true;
        }
        tracing::warn!(id = %id, "a local copy does not match its sha256 (torn by a crash, or changed on disk); fetching it again");
        let _ = std::fs::remove_file(path);
        false
    }

    /// Whether a local copy exists with the right size (touching it for the
    /// least-recently-used trimming).
    fn usable(&self, path: &Path, meta: &Meta) -> bool {
        let Ok(m) = std::fs::metadata(path) else {
            return false;
        };
        if m.len() != meta.size {
            return false;
        }
        let stale = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age > Duration::from_secs(60));
        if stale && let Ok(f) = std::fs::File::options().append(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
        true
    }

    async fn fetch(
        &self,
        app: &App,
        meta: &Meta,
        path: &Path,
        keep: u64,
    ) -> Result<(PathBuf, Option<Bytes>), UploadError> {
        let m = &app.metrics.uploads;
        let started = Instant::now();
        let mut last = None;
        for attempt in 0..2 {
            let n = FETCHES.fetch_add(1, Ordering::Relaxed);
            let tmp = self.tmp.join(format!("{}.{n}.get", meta.id));
            match self.fetch_once(meta, &tmp, keep).await {
                Ok(Fetched::Verified(bytes)) => {
                    tokio::fs::rename(&tmp, path).await?;
                    self.mark_verified(&meta.id);
                    m.fetched.inc();
                    m.fetched_bytes.inc_by(meta.size);
                    m.fetch_duration.observe(started.elapsed().as_secs_f64());
                    return Ok((path.to_path_buf(), bytes));
                }
                Ok(Fetched::Mismatch) => {
                    m.checksum_mismatches.inc();
                    tracing::error!(id = %meta.id, attempt, "fetched upload does not match its sha256; not served");
                    last = Some(UploadError::Checksum(meta.id.clone()));
                }
                Err(UploadError::Store(StoreError::NotFound { .. }) | UploadError::Missing(_)) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(UploadError::Missing(meta.id.clone()));
                }
                Err(e) => {
                    if matches!(e, UploadError::Store(_)) {
                        m.store_errors.with_label_values(&["get"]).inc();
                    }
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            }
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        Err(last.expect("two attempts failed"))
    }

    /// Fetches into `tmp`; answers whether size and sha256 match, with the
    /// bytes when there are at most `keep`.
    async fn fetch_once(&self, meta: &Meta, tmp: &Path, keep: u64) -> Result<Fetched, UploadError> {
        let verified = |size: u64, sha: &str, bytes: Option<Bytes>| {
            if size == meta.size && sha == meta.sha256 {
                Fetched::Verified(bytes)
            } else {
                Fetched::Mismatch
            }
        };
        if let Some(src) = self.store.file_path(&meta.id) {
            // A directory store: one blocking copy with large reads.
            return match copy_hashing(src, tmp.to_path_buf(), keep).await {
                Ok((size, sha, bytes)) => Ok(verified(size, &sha, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(UploadError::Missing(meta.id.clone()))
                }
                Err(e) => Err(e.into()),
            };
        }
        let mut stream = self.store.get(&meta.id).await?;
        let mut file = HashingFile::create(tmp).await?;
        let mut kept = (meta.size <= keep).then(Vec::new);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if file.size + chunk.len() as u64 > meta.size {
                return Ok(Fetched::Mismatch);
            }
            if let Some(k) = kept.as_mut() {
                k.push(chunk.clone());
            }
            file.push(chunk).await?;
        }
        let (size, sha) = file.finish().await?;
        let bytes = kept.map(|chunks| match <[Bytes; 1]>::try_from(chunks) {
            Ok([one]) => one,
            Err(chunks) => Bytes::from(chunks.concat()),
        });
        Ok(verified(size, &sha, bytes))
    }

    pub(super) fn remove_local(&self, id: &str) {
        if valid_id(id) {
            let _ = std::fs::remove_file(self.files.join(id));
            self.verified.lock().expect("not poisoned").remove(id);
        }
    }

    /// Brings the local copies in line with the registry: removes copies
    /// of withdrawn uploads, trims to `uploads.local_cache_size` (least
    /// recently used first), drops old receipts, and (with `mirror`) lists
    /// what to prefetch.
    fn reconcile(&self, app: &App) -> Vec<Meta> {
        let m = &app.metrics.uploads;
        // Only a host caught up knows every registration: before that (at
        // start, during a cold boot) a copy missing from the list is kept.
        let registered: Option<std::collections::HashSet<String>> = match app.ready() {
            Ok(()) => app
                .cache
                .list(UPLOADS_CACHE)
                .ok()
                .map(|l| l.into_iter().collect()),
            Err(_) => None,
        };
        let mut copies = Vec::new();
        let mut total = 0u64;
        for e in std::fs::read_dir(&self.files)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(md) = e.metadata() else { continue };
            let modified = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let young = modified.elapsed().map(|a| a < YOUNG).unwrap_or(true);
            let withdrawn = registered
                .as_ref()
                .is_some_and(|r| !r.contains(&name) && !young);
            if !valid_id(&name) || withdrawn {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            total += md.len();
            copies.push((modified, md.len(), name));
        }
        let limit = self.config.local_cache_size;
        let mut evicted = std::collections::HashSet::new();
        if total > limit {
            copies.sort();
            let mut keep = Vec::new();
            for (t, len, name) in copies {
                if total > limit {
                    let _ = std::fs::remove_file(self.files.join(&name));
                    total -= len;
                    m.evicted.inc();
                    evicted.insert(name);
                } else {
                    keep.push((t, len, name));
                }
            }
            copies = keep;
        }
        m.local_bytes.set(total as i64);
        m.local_files.set(copies.len() as i64);
        for e in std::fs::read_dir(&self.receipts)
            .into_iter()
            .flatten()
            .flatten()
        {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > self.config.ttl);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let Some(registered) = registered.filter(|_| self.config.mirror) else {
            return Vec::new();
        };
        // Mirroring fills the cache up to its limit, newest uploads first,
        // and never fetches again what the limit has just evicted.
        let have: std::collections::HashSet<&String> = copies.iter().map(|c| &c.2).collect();
        let mut todo: Vec<Meta> = registered
            .iter()
            .filter(|id| !have.contains(id) && !evicted.contains(*id))
            .filter_map(|id| app.cache.read(UPLOADS_CACHE, id).ok().flatten())
            .filter_map(|(v, _)| serde_json::from_slice::<Meta>(&v).ok())
            .collect();
        todo.sort_by(|a, b| b.id.cmp(&a.id));
        let mut room = limit.saturating_sub(total);
        todo.retain(|meta| {
            let fits = meta.size <= room;
            if fits {
                room -= meta.size;
            }
            fits
        });
        todo
    }

    /// Fetches uploads ahead of reads (`uploads.mirror`), one at a time.
    async fn prefetch(&self, app: &Arc<App>, metas: Vec<Meta>) {
        for meta in metas {
            if meta.expired() {
                continue;
            }
            if let Err(e) = self.local_path(app, &meta).await {
                tracing::warn!(id = %meta.id, error = %e, "cannot mirror an upload");
            }
        }
    }
}

/// The per-host uploads task: applies withdrawals to the local copies as
/// they arrive through the log, reconciles periodically, mirrors (in a
/// task of its own, so that withdrawals do not wait behind downloads).
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let uploads = app.uploads.clone();
    let mut next = Instant::now();
    let mut queued: Vec<Meta> = Vec::new();
    let mut mirroring: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let mut fresh = Vec::new();
        for event in uploads.events.take() {
            match event {
                Event::Withdrawn(id) => uploads.remove_local(&id),
                Event::Registered(id) if uploads.config.mirror => fresh.push(id),
                Event::Registered(_) => {}
            }
        }
        for id in fresh {
            if let Ok(Some(m)) = uploads.meta(&app, &id).await
                && m.size <= uploads.config.local_cache_size
            {
                queued.push(m);
            }
        }
        if Instant::now() >= next {
            let (a, u) = (app.clone(), uploads.clone());
            let todo = tokio::task::spawn_blocking(move || u.reconcile(&a))
                .await
                .unwrap_or_default();
            queued.extend(todo);
            next = Instant::now() + RECONCILE_EVERY;
        }
        if mirroring.as_ref().is_none_or(|t| t.is_finished()) && !queued.is_empty() {
            let (a, metas) = (app.clone(), std::mem::take(&mut queued));
            mirroring = Some(tokio::spawn(async move {
                a.uploads.prefetch(&a, metas).await;
            }));
        }
        let mirrored = async {
            match mirroring.as_mut() {
                Some(t) if !t.is_finished() => {
                    let _ = t.await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Some(t) = mirroring {
                    t.abort();
                }
                return;
            }
            _ = uploads.events.wait() => {}
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = mirrored => {}
        }
    }
}
