//! The object store behind uploads, built from `uploads.store`: a local (or
//! NFS) directory, S3 (or an S3-compatible server), GCS or Azure, through the
//! `object_store` crate. Uploads are streamed: a body that fits in one part
//! is one PUT, a larger one a multipart upload whose parts go out while the
//! next is read, so memory stays flat whatever the size. On cloud stores the
//! multipart upload's id is recorded first, so that the expiry job can abort
//! it if this host dies mid-upload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use tokio::task::JoinSet;

use crate::config::uploads::{StoreKind, UploadsConfig};

/// The size of each part of a multipart upload (and of the first read that
/// decides between one PUT and a multipart upload).
pub const PART_SIZE: usize = 8 << 20;
/// Parts in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

pub type StoreError = object_store::Error;

/// The configured store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Cloud stores, for multipart uploads whose id is recorded.
    multipart: Option<Arc<dyn MultipartStore>>,
    /// The root directory of a `file://` store.
    root: Option<PathBuf>,
    prefix: Path,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.inner)
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

/// Retries are short: an upload request fails (503) rather than hang while
/// the store is unreachable.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(10),
    }
}

impl Store {
    /// Builds the store (no request is made).
    pub fn open(config: &UploadsConfig) -> Result<Self, String> {
        let url = &config.store;
        let path_part = url.split_once("://").map(|(_, r)| r).unwrap_or("");
        match &config.kind {
            StoreKind::File(root) => {
                std::fs::create_dir_all(root)
                    .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| format!("cannot open {}: {e}", root.display()))?;
                Ok(Self {
                    inner: Arc::new(fs),
                    multipart: None,
                    root: Some(root.clone()),
                    prefix: Path::default(),
                })
            }
            kind => {
                let prefix = Path::from(path_part.split_once('/').map(|(_, p)| p).unwrap_or(""));
                let (inner, multipart): (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) = match kind
                {
                    StoreKind::S3 => {
                        let mut b = AmazonS3Builder::from_env()
                            .with_url(url)
                            .with_client_options(client_options())
                            .with_retry(retry());
                        if let Some(e) = &config.endpoint {
                            b = b.with_endpoint(e);
                        }
                        if let Some(r) = &config.region {
                            b = b.with_region(r);
                        }
                        if let Some(k) = &config.access_key_id {
                            b = b.with_access_key_id(k);
                        }
                        if let Some(s) = &config.secret_access_key {
                            b = b.with_secret_access_key(s.expose());
                        }
                        if config.allow_http {
                            b = b.with_allow_http(true);
                        }
                        let s3 = Arc::new(b.build().map_err(|e| e.to_string())?);
                        (s3.clone(), s3)
                    }
                    StoreKind::Gcs => {
                        let g = Arc::new(
                            GoogleCloudStorageBuilder::from_env()
                                .with_url(url)
                                .with_client_options(client_options())
                                .with_retry(retry())
                                .build()
                                .map_err(|e| e.to_string())?,
                        );
                        (g.clone(), g)
                    }
                    _ => {
                        let a = Arc::new(
                            MicrosoftAzureBuilder::from_env()
                                .with_url(url)
                                .with_client_options(client_options())
                                .with_retry(retry())
                                .build()
                                .map_err(|e| e.to_string())?,
                        );
                        (a.clone(), a)
                    }
                };
                Ok(Self {
                    inner,
                    multipart: Some(multipart),
                    root: None,
                    prefix,
                })
            }
        }
    }

    /// Where an upload's bytes live in the store.
    pub fn path_of(&self, id: &str) -> Path {
        self.prefix.clone().join(id)
    }

    /// The file holding an object, for a directory store.
    pub fn file_path(&self, id: &str) -> Option<PathBuf> {
        self.root.as_ref().map(|r| r.join(id))
    }

    /// Whether multipart uploads get an id to record (cloud stores).
    pub fn records_multipart(&self) -> bool {
        self.multipart.is_some()
    }

    /// The object's bytes, as a stream.
    pub async fn get(
        &self,
        id: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        Ok(self.inner.get(&self.path_of(id)).await?.into_stream())
    }

    /// Removes the object (a missing one is not an error), aborts its open
    /// multipart upload if one is named, and, for an upload that never
    /// completed (`unfinished`), removes a file store's staging files of it
    /// (a listing of the store's directory: not done for completed ones,
    /// which have none).
    pub async fn remove(
        &self,
        id: &str,
        multipart_id: Option<&str>,
        unfinished: bool,
    ) -> Result<(), StoreError> {
        let path = self.path_of(id);
        if let (Some(mp), Some(mid)) = (&self.multipart, multipart_id) {
            match mp.abort_multipart(&path, &mid.to_string()).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(root) = self.root.clone().filter(|_| unfinished) {
            let id = id.to_string();
            let _ = tokio::task::spawn_blocking(move || remove_staging(&root, &id)).await;
        }
        match self.inner.delete(&path).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts writing an object: `first` is the whole body if `last`, else
    /// the first part of a multipart upload. `record` is called with a cloud
    /// store's multipart upload id before any part is sent.
    pub async fn begin<F, Fut>(
        &self,
        id: &str,
        first: PutPayload,
        last: bool,
        record: F,
    ) -> Result<Writer, StoreError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let path = self.path_of(id);
        if last {
            self.inner.put(&path, first).await?;
            return Ok(Writer {
                kind: Kind::Done,
                parts: JoinSet::new(),
                next: 0,
                path,
            });
        }
        let kind = match &self.multipart {
            Some(mp) => {
                let upload_id = mp.create_multipart(&path).await?;
                if let Err(e) = record(upload_id.clone()).await {
                    let _ = mp.abort_multipart(&path, &upload_id).await;
                    return Err(e);
                }
                Kind::Cloud {
                    store: mp.clone(),
                    upload_id,
                    done: Vec::new(),
                }
            }
            None => Kind::Local(self.inner.put_multipart(&path).await?),
        };
        let mut w = Writer {
            kind,
            parts: JoinSet::new(),
            next: 0,
            path,
        };
        w.part(first).await?;
        Ok(w)
    }
}

/// Removes `{root}/{id}#*`: the staging files a file store leaves when the
/// process dies during a multipart upload.
fn remove_staging(root: &std::path::Path, id: &str) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    let prefix = format!("{id}#");
    for entry in dir.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

enum Kind {
    /// One PUT, already done.
    Done,
    Cloud {
        store: Arc<dyn MultipartStore>,
        upload_id: String,
        done: Vec<(usize, PartId)>,
    },
    Local(Box<dyn MultipartUpload>),
}

/// An object being written part by part.
pub struct Writer {
    kind: Kind,
    parts: JoinSet<Result<Option<(usize, PartId)>, StoreError>>,
    next: usize,
    path: Path,
}

impl Writer {
    /// Sends one more part (waiting while [`PARTS_IN_FLIGHT`] are out).
    pub async fn part(&mut self, data: PutPayload) -> Result<(), StoreError> {
        while self.parts.len() >= PARTS_IN_FLIGHT {
            self.reap_one().await?;
        }
        let idx = self.next;
        self.next += 1;
        match &mut self.kind {
            Kind::Done => unreachable!("a single PUT has no parts"),
            Kind::Cloud {
                store, upload_id, ..
            } => {
                let (store, upload_id, path) =
                    (store.clone(), upload_id.clone(), self.path.clone());
                self.parts.spawn(async move {
                    let part = store.put_part(&path, &upload_id, idx, data).await?;
                    Ok(Some((idx, part)))
                });
            }
            Kind::Local(upload) => {
                let fut = upload.put_part(data);
                self.parts.spawn(async move { fut.await.map(|()| None) });
            }
        }
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), StoreError> {
        if let Some(joined) = self.parts.join_next().await {
            let result = joined.map_err(|e| StoreError::Generic {
                store: "tandem",
                source: Box::new(e),
            })??;
            if let (Some(p), Kind::Cloud { done, .. }) = (result, &mut self.kind) {
                done.push(p);
            }
        }
        Ok(())
    }

    /// Waits for every part and completes the object; if that fails, the
    /// multipart upload is aborted.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        let mut done = Ok(());
        while done.is_ok() && !self.parts.is_empty() {
            done = self.reap_one().await;
        }
        if let Err(e) = done {
            self.abort().await;
            return Err(e);
        }
        let completed = match &mut self.kind {
            Kind::Done => return Ok(()),
            Kind::Cloud {
                store,
                upload_id,
                done,
            } => {
                done.sort_by_key(|(i, _)| *i);
                let parts = done.drain(..).map(|(_, p)| p).collect();
                store
                    .complete_multipart(&self.path, upload_id, parts)
                    .await
                    .map(|_| ())
            }
            Kind::Local(upload) => upload.complete().await.map(|_| ()),
        };
        if completed.is_err() {
            self.abort().await;
        }
        completed
    }

    /// Gives up: stops the parts in flight and aborts the multipart upload.
    pub async fn abort(mut self) {
        self.parts.abort_all();
        while self.parts.join_next().await.is_some() {}
        let result = match &mut self.kind {
            Kind::Done => Ok(()),
            Kind::Cloud {
                store, upload_id, ..
            } => store.abort_multipart(&self.path, upload_id).await,
            Kind::Local(upload) => upload.abort().await,
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path, error = %e, "cannot abort a multipart upload; the expiry job will");
        }
    }
}

/// One part: the chunks as they arrived (no copy into one buffer, so no
/// large allocation per part).
#[derive(Default)]
pub struct Part {
    pub chunks: Vec<Bytes>,
    pub len: usize,
}

impl Part {
    pub fn payload(&self) -> PutPayload {
        self.chunks.iter().cloned().collect()
    }
}

/// Reads a stream of chunks into parts of exactly [`PART_SIZE`] bytes (the
/// last one shorter).
pub struct Chunker<S> {
    stream: S,
    buf: std::collections::VecDeque<Bytes>,
    buffered: usize,
    ended: bool,
}

impl<S, E> Chunker<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Default::default(),
            buffered: 0,
            ended: false,
        }
    }

    async fn fill(&mut self, want: usize) -> Result<(), E> {
        while !self.ended && self.buffered < want {
            match self.stream.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    self.buffered += chunk.len();
                    self.buf.push_back(chunk);
                }
                None => self.ended = true,
            }
        }
        Ok(())
    }

    /// The next part, and whether it is the last one; `None` once the
    /// stream has ended and everything was returned.
    pub async fn next_part(&mut self) -> Result<Option<(Part, bool)>, E> {
        self.fill(PART_SIZE).await?;
        if self.ended && self.buffered == 0 {
            return Ok(None);
        }
        let mut part = Part::default();
        while part.len < PART_SIZE {
            let Some(mut chunk) = self.buf.pop_front() else {
                break;
            };
            let room = PART_SIZE - part.len;
            if chunk.len() > room {
                self.buf.push_front(chunk.split_off(room));
            }
            part.len += chunk.len();
            part.chunks.push(chunk);
        }
        self.buffered -= part.len;
        // Peek whether more follows, so the caller knows the last part.
        self.fill(1).await?;
        let last = self.ended && self.buffered == 0;
        Ok(Some((part, last)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_are_exact() {
        let chunks: Vec<Result<Bytes, String>> = (0..20)
            .map(|i| Ok(Bytes::from(vec![i as u8; 1 << 20])))
            .collect();
        let mut c = Chunker::new(futures_util::stream::iter(chunks));
        let mut sizes = Vec::new();
        let mut bytes = Vec::new();
        while let Some((p, last)) = c.next_part().await.unwrap() {
            sizes.push((p.len, last));
            for ch in &p.chunks {
                bytes.extend_from_slice(ch);
            }
        }
        assert_eq!(
            sizes,
            vec![(PART_SIZE, false), (PART_SIZE, false), (4 << 20, true)]
        );
        assert_eq!(bytes.len(), 20 << 20);
        assert!(
            bytes
                .chunks(1 << 20)
                .enumerate()
                .all(|(i, c)| c.iter().all(|b| *b == i as u8))
        );
        let empty: Vec<Result<Bytes, String>> = Vec::new();
        assert!(
            Chunker::new(futures_util::stream::iter(empty))
                .next_part()
                .await
                .unwrap()
                .is_none()
        );
    }
}
