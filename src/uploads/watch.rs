//! The second way in: the app writes a file into `<uploads.dir>/incoming/`
//! and tandem stores and registers it.
//!
//! Only complete files are taken: a file is taken when it is renamed (moved)
//! into `incoming/`, or when it is closed after writing. Names starting with
//! `.` or ending in `.tmp`, `.part` or `~` are ignored, so the app can write
//! `.photo.jpg.tmp` and rename it to `photo.jpg`. A periodic rescan takes
//! files that have not changed for [`QUIET`] (files present at start, or
//! missed events). Symlinks and other non-regular files are never followed.
//!
//! Once stored, the file leaves `incoming/` and `receipts/<name>.json` holds
//! its upload (id, size, sha256, …). A file larger than `uploads.max_size`
//! is moved to `rejected/`; one that cannot be stored (store or database
//! unreachable) is retried with backoff, and each failure is counted.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{UploadError, sanitize_name};
use crate::app::App;

/// How long a file must be unchanged to be taken by a rescan.
const QUIET: Duration = Duration::from_secs(5);
const RESCAN: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Whether a name in `incoming/` is one the app is still writing.
fn ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with('~')
}

/// A content type from the file's extension (the common web ones).
pub fn guess_content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("avif") => "image/avif",
        Some("pdf") => "application/pdf",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("csv") => "text/csv",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("xml") => "application/xml",
        Some("zip") => "application/zip",
        Some("mp4") => "video/mp4",
        Some("mp3") => "audio/mpeg",
        Some("docx") => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// What became of a taken file.
enum Taken {
    Done,
    /// Gone or not a regular file: nothing to do.
    Skipped,
    /// Try again later.
    Retry(String),
}

struct Pending {
    attempts: u32,
    at: Instant,
}

/// Watches `incoming/` until `cancel`.
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let incoming = app.uploads.incoming.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let path = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => event.paths.first(),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => event.paths.first(),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event.paths.get(1),
            _ => None,
        };
        if let Some(p) = path {
            let _ = tx.send(p.clone());
        }
    });
    // Kept alive for as long as the loop runs.
    let _watcher = match watcher.and_then(|mut w| {
        w.watch(&incoming, RecursiveMode::NonRecursive)?;
        Ok(w)
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(dir = %incoming.display(), error = %e,
                "cannot watch the uploads directory; files are taken by the periodic rescan only");
            None
        }
    };
    let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
    let mut stuck = HashSet::new();
    let mut next_scan = Instant::now();
    loop {
        if Instant::now() >= next_scan {
            for path in quiet_files(&incoming) {
                pending.entry(path).or_insert(Pending {
                    attempts: 0,
                    at: Instant::now(),
                });
            }
            next_scan = Instant::now() + RESCAN;
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, p)| p.at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for path in due {
            if cancel.is_cancelled() {
                return;
            }
            match take(&app, &path, &mut stuck).await {
                Taken::Done | Taken::Skipped => {
                    pending.remove(&path);
                }
                Taken::Retry(why) => {
                    app.metrics.uploads.watch_failures.inc();
                    let p = pending.get_mut(&path).expect("due");
                    let delay = FIRST_RETRY
                        .saturating_mul(1 << p.attempts.min(6))
                        .min(MAX_RETRY);
                    p.attempts += 1;
                    p.at = Instant::now() + delay;
                    tracing::warn!(file = %path.display(), attempt = p.attempts, retry_in = ?delay,
                        error = %why, "cannot store a watched file; will retry");
                }
            }
        }
        app.metrics.uploads.watch_pending.set(pending.len() as i64);
        let wake = pending
            .values()
            .map(|p| p.at)
            .min()
            .unwrap_or(next_scan)
            .min(next_scan);
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(path) = rx.recv() => {
                if path.parent() == Some(incoming.as_path()) {
                    pending.insert(path, Pending { attempts: 0, at: Instant::now() });
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Regular files of `dir` unchanged for [`QUIET`].
fn quiet_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !ignored(&e.file_name().to_string_lossy()))
        .filter(|e| {
            e.metadata().is_ok_and(|m| {
                m.is_file()
                    && m.modified()
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age >= QUIET)
            })
        })
        .map(|e| e.path())
        .collect()
}

/// Which file this is, and which version of it: device, inode, size and
/// modification time.
type Identity = (u64, u64, u64, i64, i64);

fn identity(m: &std::fs::Metadata) -> Identity {
    (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
}

/// Stores and registers one watched file, then removes it from
/// `incoming/` (unless another file took its name meanwhile). `stuck` holds
/// the files stored whose removal failed, so that they are not stored again.
async fn take(app: &Arc<App>, path: &Path, stuck: &mut HashSet<Identity>) -> Taken {
    let uploads = &app.uploads;
    let raw_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if ignored(&raw_name) {
        return Taken::Skipped;
    }
    // Never follow a symlink out of the directory, never block on a FIFO:
    // the file is opened without following a link, and what was opened is
    // checked (not the name, which could change in between).
    let opened = std::fs::File::options()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .and_then(|f| f.metadata().map(|m| (f, m)));
    let (file, meta) = match opened {
        Ok((f, m)) if m.is_file() => (f, m),
        Ok(_) => return Taken::Skipped,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) =>
        {
            return Taken::Skipped;
        }
        Err(e) => return Taken::Retry(e.to_string()),
    };
    let taken = identity(&meta);
    if stuck.contains(&taken) {
        return Taken::Skipped;
    }
    let name = sanitize_name(&raw_name);
    if meta.len() > uploads.config.max_size {
        let to = uploads.rejected.join(&name);
        tracing::error!(file = %path.display(), size = meta.len(), max = uploads.config.max_size,
            moved_to = %to.display(), "watched file is larger than uploads.max_size; not stored");
        let _ = tokio::fs::rename(path, &to).await;
        return Taken::Skipped;
    }
    let body =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 << 10);
    let ttl = uploads.config.ttl;
    let stored = match uploads
        .store_body(app, &name, guess_content_type(&name), ttl, body)
        .await
    {
        Ok(s) => s,
        Err(UploadError::TooLarge { .. }) => {
            let _ = tokio::fs::rename(path, uploads.rejected.join(&name)).await;
            return Taken::Skipped;
        }
        Err(e) => return Taken::Retry(e.to_string()),
    };
    let meta = match uploads.register(app, stored, "watch", false).await {
        Ok((_, m)) => m,
        Err(e) => return Taken::Retry(e.to_string()),
    };
    let receipt = uploads.receipts.join(format!("{name}.json"));
    let tmp = uploads.receipts.join(format!(".{}.tmp", meta.id));
    let text = serde_json::to_vec_pretty(&meta).expect("serialisable");
    let written = match tokio::fs::write(&tmp, text).await {
        Ok(()) => tokio::fs::rename(&tmp, &receipt).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        tracing::warn!(file = %receipt.display(), error = %e, "cannot write an upload receipt");
    }
    // The name may hold another file by now (the app renamed a new one over
    // it, or wrote to it again): that one is taken on its own, not removed.
    let unchanged = tokio::fs::symlink_metadata(path)
        .await
        .is_ok_and(|m| identity(&m) == taken);
    if !unchanged {
        tracing::info!(file = %path.display(), id = %meta.id,
            "stored a watched file that was replaced or changed meanwhile; the new one is taken on its own");
    } else if let Err(e) = tokio::fs::remove_file(path).await {
        app.metrics.uploads.watch_failures.inc();
        tracing::error!(file = %path.display(), id = %meta.id, error = %e,
            "stored, but cannot remove the watched file; it is not stored again while it stays unchanged");
        stuck.insert(taken);
    }
    tracing::info!(id = %meta.id, name = %meta.name, size = meta.size, "stored a watched file");
    Taken::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignores_files_being_written() {
        for name in [".photo.jpg", "photo.jpg.tmp", "a.part", "notes~"] {
            assert!(ignored(name), "{name}");
        }
        assert!(!ignored("photo.jpg"));
        assert_eq!(guess_content_type("A.JPG"), "image/jpeg");
        assert_eq!(guess_content_type("noext"), "application/octet-stream");
    }
}
