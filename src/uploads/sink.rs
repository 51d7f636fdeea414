//! Writing a local copy while computing its sha256, off the async runtime.
//!
//! Small chunks (from a socket or a store's stream) are gathered into
//! batches of [`BATCH`] bytes, and each batch is hashed and written on a
//! blocking thread while the next one is gathered: one batch in flight, so
//! memory stays bounded and hashing overlaps receiving.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::hex;

/// The bytes handed to the blocking thread at once.
const BATCH: usize = 1 << 20;

/// The hasher, the file, and how many bytes still to write are already in
/// the hasher (hashed as they arrived).
type Held = (Sha256, std::fs::File, u64);

/// A file being written and hashed.
pub struct HashingFile {
    /// The hasher and the file, while no batch is in flight.
    held: Option<Held>,
    in_flight: Option<JoinHandle<io::Result<Held>>>,
    batch: Vec<Bytes>,
    batched: usize,
    /// Bytes pushed so far.
    pub size: u64,
}

impl HashingFile {
    pub async fn create(path: &Path) -> io::Result<Self> {
        Self::resume(path, Sha256::new(), 0).await
    }

    /// Like [`HashingFile::create`], with the first `hashed` bytes to be
    /// pushed already fed to `hasher`.
    pub async fn resume(path: &Path, hasher: Sha256, hashed: u64) -> io::Result<Self> {
        let file = tokio::fs::File::create(path).await?.into_std().await;
        Ok(Self {
            held: Some((hasher, file, hashed)),
            in_flight: None,
            batch: Vec::new(),
            batched: 0,
            size: 0,
        })
    }

    /// Adds a chunk (cheap: `Bytes` is reference counted).
    pub async fn push(&mut self, chunk: Bytes) -> io::Result<()> {
        self.size += chunk.len() as u64;
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched >= BATCH {
            self.send().await?;
        }
        Ok(())
    }

    /// Waits for the batch in flight.
    async fn settle(&mut self) -> io::Result<()> {
        if let Some(h) = self.in_flight.take() {
            self.held = Some(h.await.map_err(io::Error::other)??);
        }
        Ok(())
    }

    /// Hands the gathered chunks to a blocking thread.
    async fn send(&mut self) -> io::Result<()> {
        self.settle().await?;
        let (mut hasher, mut file, mut skip) = self.held.take().expect("settled");
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            for c in &batch {
                let done = (skip as usize).min(c.len());
                hasher.update(&c[done..]);
                skip -= done as u64;
                file.write_all(c)?;
            }
            Ok((hasher, file, skip))
        }));
        Ok(())
    }

    /// Writes what is left; answers the size and the sha256 (hex).
    pub async fn finish(mut self) -> io::Result<(u64, String)> {
        if !self.batch.is_empty() {
            self.send().await?;
        }
        self.settle().await?;
        let (hasher, _file, _) = self.held.take().expect("settled");
        Ok((self.size, hex(&hasher.finalize())))
    }
}

/// Reads a file in blocks of [`BATCH`] bytes (blocking), handing each to
/// `each`; answers the bytes read.
fn each_block(path: &Path, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BATCH];
    let mut size = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(size),
            Ok(n) => {
                each(&buf[..n])?;
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The sha256 (hex) of a file (blocking).
pub fn sha256_of(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    each_block(path, |b| {
        hasher.update(b);
        Ok(())
    })?;
    Ok(hex(&hasher.finalize()))
}

/// Copies `src` to `dst` on a blocking thread, hashing each block while
/// it is written (on a second thread); answers the size, the sha256 (hex)
/// and, when the file has at most `keep` bytes, the bytes themselves (so
/// that whoever asked for the copy can serve them without reading it
/// again). For stores that are a local or mounted directory, where the
/// store's own reads are small.
pub async fn copy_hashing(
    src: PathBuf,
    dst: PathBuf,
    keep: u64,
) -> io::Result<(u64, String, Option<Bytes>)> {
    tokio::task::spawn_blocking(move || {
        let mut to = std::fs::File::create(&dst)?;
        let mut hasher = Sha256::new();
        let mut write_hashing = |b: &[u8]| {
            std::thread::scope(|s| {
                let writer = s.spawn(|| to.write_all(b));
                hasher.update(b);
                writer
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("the writing thread panicked")))
            })
        };
        let small = std::fs::metadata(&src)?.len() <= keep;
        if small {
            // Read whole (it may have grown: read to the end all the same).
            let mut bytes = Vec::new();
            std::fs::File::open(&src)?.read_to_end(&mut bytes)?;
            write_hashing(&bytes)?;
            let size = bytes.len() as u64;
            let kept = (size <= keep).then(|| Bytes::from(bytes));
            return Ok((size, hex(&hasher.finalize()), kept));
        }
        let size = each_block(&src, write_hashing)?;
        Ok((size, hex(&hasher.finalize()), None))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_and_writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = HashingFile::create(&path).await.unwrap();
        let mut all = Vec::new();
        for i in 0..300u32 {
            let chunk: Vec<u8> = (0..7919u32).map(|j| (i * 31 + j) as u8).collect();
            all.extend_from_slice(&chunk);
            f.push(Bytes::from(chunk)).await.unwrap();
        }
        let (size, sha) = f.finish().await.unwrap();
        assert_eq!(size, all.len() as u64);
        assert_eq!(sha, hex(&Sha256::digest(&all)));
        assert_eq!(std::fs::read(&path).unwrap(), all);
        // Resuming after bytes hashed elsewhere (a part of a chunk included).
        let path2 = dir.path().join("h");
        let mut pre = Sha256::new();
        pre.update(&all[..10_000]);
        let mut f = HashingFile::resume(&path2, pre, 10_000).await.unwrap();
        for c in all.chunks(7919) {
            f.push(Bytes::copy_from_slice(c)).await.unwrap();
        }
        assert_eq!(f.finish().await.unwrap(), (size, sha.clone()));
        let copy = dir.path().join("g");
        // Block by block (larger than `keep`), then whole and kept.
        for keep in [0, size] {
            let (n, sha2, kept) = copy_hashing(path.clone(), copy.clone(), keep)
                .await
                .unwrap();
            assert_eq!((n, sha2), (size, sha.clone()));
            assert_eq!(std::fs::read(&copy).unwrap(), all);
            assert_eq!(sha256_of(&copy).unwrap(), sha);
            assert_eq!(kept.is_some(), keep == size);
            if let Some(k) = kept {
                assert!(k == all, "the kept bytes are the file's");
            }
        }
    }
}
