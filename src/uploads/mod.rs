//! Shared uploads: a file uploaded to one host is readable on every host.
//!
//! The bytes go to the object store (`uploads.store`) under `<prefix>/<id>`;
//! the upload is registered in PostgreSQL and announced through the log as
//! an entry of the reserved cache `_uploads` (its metadata as JSON), in the
//! same transaction that marks it stored, so it becomes visible only once it
//! is wholly in the store and every host learns of it without listing the
//! bucket. Other hosts fetch it on first read (or at once with
//! `uploads.mirror`), verify its sha256 and keep a local copy under
//! `<dir>/files/<id>`, trimmed least recently used first.
//!
//! Layout of `uploads.dir`:
//! - `incoming/`: watched; the app drops files here ([`watch`]);
//! - `receipts/<name>.json`: the upload each taken file became;
//! - `rejected/`: watched files refused for good (too large);
//! - `files/<id>`: local copies;
//! - `tmp/`: partial copies (emptied at start).

pub mod events;
mod local;
pub mod metrics;
mod sink;
pub mod store;
pub mod watch;

pub use local::run;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::config::uploads::UploadsConfig;
use crate::db::DbError;
use events::Events;
use sink::HashingFile;
use store::{Chunker, Part, Store, StoreError};

/// The reserved cache holding the registrations (unreachable through the
/// cache API, whose names cannot start with `_`).
pub const UPLOADS_CACHE: &str = "_uploads";

/// An upload's metadata, as every host keeps it and the API answers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
    pub origin: String,
    pub created_at: String,
    pub expires_at: String,
}

impl Meta {
    fn expired(&self) -> bool {
        chrono::DateTime::parse_from_rfc3339(&self.expires_at)
            .map(|t| t <= chrono::Utc::now())
            .unwrap_or(false)
    }
}

/// Why storing or reading an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the upload is larger than uploads.max_size ({max} bytes)")]
    TooLarge { max: u64 },
    #[error("the upload's body was cut short: {0}")]
    Body(String),
    #[error("the object store failed: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the stored bytes of upload {0} do not match its sha256")]
    Checksum(String),
    #[error("upload {0} is registered but missing from the object store")]
    Missing(String),
    #[error("local copy: {0}")]
    Local(#[from] io::Error),
}

/// An upload whose bytes are in the store, not yet registered.
#[derive(Debug)]
pub struct Stored {
    pub id: String,
    pub size: u64,
    pub sha256: String,
    /// The copy made while storing (moved into `files/` once registered).
    local: TmpFile,
}

/// A file under `tmp/`, removed when dropped unless kept.
#[derive(Debug)]
pub(crate) struct TmpFile(pub PathBuf);

impl TmpFile {
    /// The file was moved away: nothing to remove.
    pub fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The uploads of this host.
pub struct Uploads {
    pub config: UploadsConfig,
    pub store: Store,
    files: PathBuf,
    tmp: PathBuf,
    pub(crate) incoming: PathBuf,
    pub(crate) receipts: PathBuf,
    pub(crate) rejected: PathBuf,
    /// One fetch per upload at a time.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Local copies written or checked against their sha256 by this
    /// process. Copies are not fsynced: one found on disk at start (a power
    /// loss may have torn it) is checked again before it is served.
    verified: Mutex<std::collections::HashSet<String>>,
    pub events: Arc<Events>,
}

/// A fresh upload id: 12 hex digits of milliseconds since the epoch, then
/// 20 random hex digits (so ids sort by creation).
pub fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let random: u128 = rand::random();
    format!("{:012x}{:020x}", ms & 0xffff_ffff_ffff, random >> 48)
}

/// Whether `id` is an upload id (32 lower-case hex digits): anything else is
/// refused before it reaches a path or a query.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A file name safe to keep and to show: its last path component, without
/// control characters, at most 255 bytes, never empty, `.` or `..`.
pub fn sanitize_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out: String = last.chars().filter(|c| !c.is_control()).collect();
    let trimmed = out.trim().to_string();
    out = trimmed;
    while out.len() > 255 {
        out.pop();
    }
    if out.is_empty() || out == "." || out == ".." {
        return "upload".to_string();
    }
    out
}

/// A content type as given, or `application/octet-stream` when it is
/// missing or not printable ASCII.
pub fn sanitize_content_type(ct: Option<&str>) -> String {
    match ct {
        Some(c)
            if !c.is_empty() && c.len() <= 255 && c.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            c.to_string()
        }
        _ => "application/octet-stream".to_string(),
    }
}

impl Uploads {
    /// Opens the store and the local directories (emptying `tmp/`).
    pub fn open(config: &UploadsConfig, events: Arc<Events>) -> Result<Self, String> {
        let store = Store::open(config)?;
        let d = &config.dir;
        let u = Self {
            config: config.clone(),
            store,
            files: d.join("files"),
            tmp: d.join("tmp"),
            incoming: d.join("incoming"),
            receipts: d.join("receipts"),
            rejected: d.join("rejected"),
            fetching: Mutex::default(),
            verified: Mutex::default(),
            events,
        };
        for dir in [&u.files, &u.tmp, &u.incoming, &u.receipts, &u.rejected] {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        if let Ok(entries) = std::fs::read_dir(&u.tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(u)
    }

    /// The metadata of a live upload: from this host's copy of the
    /// registry, or (not applied here yet) from the database.
    pub async fn meta(&self, app: &App, id: &str) -> Result<Option<Meta>, DbError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let local = app
            .cache
            .read(UPLOADS_CACHE, id)
            .ok()
            .flatten()
            .and_then(|(v, _)| serde_json::from_slice::<Meta>(&v).ok());
        if let Some(m) = local {
            return Ok((!m.expired()).then_some(m));
        }
        let rows = app.db.query(&app.queries.upload_get, &[&id]).await?;
        Ok(rows
            .first()
            .and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok()))
    }

    /// Streams `body` into the store (and a local copy), hashing it; the
    /// upload is recorded as pending before any byte is stored, so that a crash leaves nothing
    /// the expiry job does not remove. Nothing is visible until
    /// [`Uploads::register`]. On failure everything is undone ([`Self::undo`]).
    pub async fn store_body<S, E>(
        &self,
        app: &Arc<App>,
        name: &str,
        content_type: &str,
        ttl: Duration,
        body: S,
    ) -> Result<Stored, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let id = new_id();
        let ttl = ttl.as_secs_f64();
        let started = app.started_secs();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &id,
            &name,
            &content_type,
            &app.config.host_id,
            &ttl,
            &started,
        ];
        let begin = async {
            app.db.query(&app.queries.upload_begin, &params).await?;
            Ok::<_, UploadError>(())
        };
        let local = self.tmp.join(format!("{id}.up"));
        // Removed however this ends, the request dropped mid-body included.
        let copy = TmpFile(local);
        let result = self.stream_to_store(app, &id, &copy.0, begin, body).await;
        match result {
            Ok((size, sha256)) => Ok(Stored {
                id,
                size,
                sha256,
                local: copy,
            }),
            Err(e) => {
                if matches!(e, UploadError::Store(_)) {
                    app.metrics
                        .uploads
                        .store_errors
                        .with_label_values(&["put"])
                        .inc();
                }
                self.undo(app, id).await;
                Err(e)
            }
        }
    }

    /// Undoes an upload that failed before it was registered. Its row is
    /// first marked abandoned (only if still pending: a registration whose
    /// answer was lost may have committed, and then the upload is kept;
    /// once abandoned, it can no longer be registered); its bytes, staging
    /// files and multipart upload are then removed from the store in the
    /// background, so that the answer does not wait on a store that may be
    /// away, and the row last. Whatever cannot be removed now is left to the
    /// expiry job, which retries abandoned uploads on every run (and
    /// abandons a pending row itself if this cannot even be marked).
    async fn undo(&self, app: &Arc<App>, id: String) {
        let rows = match app.db.query(&app.queries.upload_abandon, &[&id]).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "cannot mark a failed upload abandoned; the expiry job will");
                return;
            }
        };
        let Some(row) = rows.first() else {
            return;
        };
        let multipart: Option<String> = row.get(0);
        let app = app.clone();
        tokio::spawn(async move {
            match app
                .uploads
                .store
                .remove(&id, multipart.as_deref(), true)
                .await
            {
                Ok(()) => {
                    let _ = app.db.query(&app.queries.upload_forget, &[&id]).await;
                }
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "cannot remove a failed upload's bytes from the store; the expiry job will retry")
                }
            }
        });
    }

    async fn stream_to_store<S, E>(
        &self,
        app: &App,
        id: &str,
        local: &Path,
        begin: impl Future<Output = Result<(), UploadError>>,
        body: S,
    ) -> Result<(u64, String), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let max = self.config.max_size;
        // The bytes are hashed as they arrive until the first part is
        // complete (overlapping the pending row's round trip); the local
        // copy hashes the rest off the runtime.
        let early: Arc<Mutex<Option<(Sha256, u64)>>> =
            Arc::new(Mutex::new(Some((Sha256::new(), 0))));
        let feed = early.clone();
        let body = body.map(move |r| {
            if let Ok(c) = &r
                && let Some((h, n)) = feed.lock().expect("not poisoned").as_mut()
            {
                h.update(c);
                *n += c.len() as u64;
            }
            r.map_err(|e| e.to_string())
        });
        let mut chunks = Chunker::new(body);
        let too_large = |size: u64| {
            if size > max {
                Err(UploadError::TooLarge { max })
            } else {
                Ok(())
            }
        };
        // The pending row is written while the first part arrives; it is
        // there before any byte reaches the store.
        let (first, began) = tokio::join!(chunks.next_part(), begin);
        began?;
        let (first, last) = match first.map_err(UploadError::Body)? {
            Some(p) => p,
            None => (Part::default(), true),
        };
        too_large(first.len as u64)?;
        let (hasher, hashed) = early
            .lock()
            .expect("not poisoned")
            .take()
            .expect("taken once");
        let mut copy = HashingFile::resume(local, hasher, hashed).await?;
        for c in &first.chunks {
            copy.push(c.clone()).await?;
        }
        let db = &app.db;
        let sql = &app.queries.upload_multipart;
        let record = |upload_id: String| async move {
            let err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Generic {
                store: "tandem",
                source,
            };
            let rows = db
                .query(sql, &[&id, &upload_id])
                .await
                .map_err(|e| err(Box::new(e)))?;
            if rows.is_empty() {
                // Abandoned meanwhile: the id would be recorded nowhere.
                return Err(err("the upload is no longer pending".into()));
            }
            Ok(())
        };
        // The store writes each part while the local copy hashes it.
        let mut writer = self.store.begin(id, first.payload(), last, record).await?;
        let outcome: Result<(), UploadError> = async {
            while let Some((part, _)) = chunks.next_part().await.map_err(UploadError::Body)? {
                too_large(copy.size + part.len as u64)?;
                writer.part(part.payload()).await?;
                for c in part.chunks {
                    copy.push(c).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            writer.abort().await;
            return Err(e);
        }
        // On failure, finish aborts the multipart upload itself.
        writer.finish().await?;
        Ok(copy.finish().await?)
    }

    /// Makes a stored upload visible everywhere and keeps its local copy;
    /// answers the write's token and the metadata. `ack` also asks every
    /// host to report when it has applied it (`?wait=cluster`); `via`
    /// labels the metrics (`http`, `watch`). If it cannot be registered,
    /// the stored bytes are removed.
    pub async fn register(
        &self,
        app: &Arc<App>,
        stored: Stored,
        via: &str,
        ack: bool,
    ) -> Result<(String, Meta), UploadError> {
        let q = &app.queries;
        let sql = if ack {
            &q.upload_register_ack
        } else {
            &q.upload_register
        };
        let size = stored.size as i64;
        let row = match app
            .db
            .query_one(sql, &[&stored.id, &size, &stored.sha256])
            .await
        {
            Ok(row) => row,
            Err(e) => {
                self.undo(app, stored.id).await;
                return Err(e.into());
            }
        };
        let meta: Meta = serde_json::from_str(row.get::<_, &str>(1))
            .map_err(|e| io::Error::other(format!("unexpected metadata: {e}")))?;
        self.keep_local(stored);
        app.metrics.uploads.stored.with_label_values(&[via]).inc();
        app.metrics.uploads.stored_bytes.inc_by(meta.size);
        Ok((row.get(0), meta))
    }

    /// Moves the copy made while storing into the local copies.
    fn keep_local(&self, stored: Stored) {
        let to = self.files.join(&stored.id);
        match std::fs::rename(&stored.local.0, to) {
            Ok(()) => {
                stored.local.keep();
                self.mark_verified(&stored.id);
            }
            Err(e) => {
                tracing::warn!(id = %stored.id, error = %e, "cannot keep the local copy of an upload")
            }
        }
    }

    /// After a delete committed: removes the bytes from the store and then
    /// the row (if the store fails, the expiry job retries).
    pub async fn remove_deleted(&self, app: &App, id: &str) {
        match self.store.remove(id, None, false).await {
            Ok(()) => {
                let _ = app.db.query(&app.queries.upload_forget, &[&id]).await;
            }
            Err(e) => {
                app.metrics
                    .uploads
                    .store_errors
                    .with_label_values(&["delete"])
                    .inc();
                tracing::warn!(id, error = %e, "cannot delete an upload from the store; the expiry job will retry");
            }
        }
        self.remove_local(id);
    }

    /// The expiry job (one host per scheduled time): withdraws expired
    /// uploads, cleans abandoned ones (aborting their multipart uploads) and
    /// retries deletions the store refused.
    pub async fn expire(&self, app: &App) -> Result<String, String> {
        let m = &app.metrics.uploads;
        let missed = app.config.cluster.stale_after as i32;
        let abandon = self.config.abandon_after.as_secs_f64();
        let (mut expired, mut abandoned, mut failed, mut retried) = (0, 0, 0, 0);
        loop {
            let rows = app
                .db
                .query(
                    &app.queries.upload_expire,
                    &[&abandon, &missed, &500i32, &app.config.host_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            let n = rows.len();
            for row in rows {
                let id: String = row.get(0);
                let state: String = row.get(1);
                let multipart: Option<String> = row.get(2);
                let unfinished = state == "abandoned";
                match self
                    .store
                    .remove(&id, multipart.as_deref(), unfinished)
                    .await
                {
                    Ok(()) => {
                        app.db
                            .query(&app.queries.upload_forget, &[&id])
                            .await
                            .map_err(|e| e.to_string())?;
                        if row.get::<_, bool>(3) {
                            expired += 1;
                            m.expired.inc();
                        } else if state == "abandoned" {
                            abandoned += 1;
                            m.abandoned.inc();
                        } else {
                            retried += 1;
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        m.store_errors.with_label_values(&["delete"]).inc();
                        tracing::warn!(id = %id, error = %e, "cannot remove an upload from the store");
                    }
                }
            }
            if n < 500 || failed > 0 {
                break;
            }
        }
        let summary = format!(
            "expired {expired}, abandoned {abandoned}, deletions retried {retried}, failed {failed}"
        );
        if failed > 0 {
            Err(summary)
        } else {
            Ok(summary)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_sorted() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_id();
        assert!(valid_id(&a) && valid_id(&b), "{a} {b}");
        assert!(a < b);
        for bad in [
            "",
            "../etc/passwd",
            &"A".repeat(32),
            &"0".repeat(31),
            &"0".repeat(33),
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("photo.jpg"), "photo.jpg");
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("C:\\Users\\x\\report.pdf"), "report.pdf");
        assert_eq!(sanitize_name("a\nb\0c\u{7f}.txt"), "abc.txt");
        assert_eq!(sanitize_name(".."), "upload");
        assert_eq!(sanitize_name("dir/"), "upload");
        assert_eq!(sanitize_name(""), "upload");
        let long = "é".repeat(200);
        assert!(sanitize_name(&long).len() <= 255);
        assert_eq!(sanitize_name("café ☕.png"), "café ☕.png");
    }

    #[test]
    fn content_types_are_checked() {
        assert_eq!(sanitize_content_type(Some("image/png")), "image/png");
        assert_eq!(
            sanitize_content_type(Some("bad\ntype")),
            "application/octet-stream"
        );
        assert_eq!(sanitize_content_type(None), "application/octet-stream");
    }
}
