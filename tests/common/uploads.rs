//! Helpers of the uploads tests and benchmark: the two stores (a directory
//! shared by the hosts, a real S3-compatible server), hosts wired to them,
//! bodies, and the calls of the uploads API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::s3::S3Server;
use super::{Host, TestDb};

/// Where the hosts store uploads.
pub enum Backend {
    /// A directory every host shares.
    File(PathBuf),
    S3(S3Server),
}

impl Backend {
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Backend::File(dir) => vec![(
                "TANDEM_UPLOADS_STORE".into(),
                format!("file://{}", dir.display()),
            )],
            Backend::S3(s3) => s3.env("site/uploads"),
        }
    }

    /// Objects in the store (file names or keys), staging files included.
    pub async fn objects(&self) -> Vec<String> {
        match self {
            Backend::File(dir) => std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            Backend::S3(s3) => s3
                .keys()
                .await
                .into_iter()
                .map(|k| k.rsplit('/').next().unwrap_or("").to_string())
                .collect(),
        }
    }

    pub async fn open_multipart(&self) -> usize {
        match self {
            Backend::File(_) => 0,
            Backend::S3(s3) => s3.multipart_uploads().await.len(),
        }
    }
}

pub async fn backend(kind: &str, root: &Path) -> Backend {
    match kind {
        "file" => Backend::File(root.join("shared-store")),
        _ => Backend::S3(S3Server::start("tandem-test").await),
    }
}

pub async fn hosts(db: &TestDb, root: &Path, b: &Backend, ids: &[&str]) -> Vec<Host> {
    let mut env = b.env();
    env.push(("TANDEM_UPLOADS_EXPIRE_EVERY".into(), "1s".into()));
    env.push(("TANDEM_UPLOADS_MAX_SIZE".into(), "30MiB".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = Vec::new();
    for id in ids {
        let h = Host::start(&db.url, id, root, &env).await;
        h.wait_ready().await;
        out.push(h);
    }
    out
}

pub fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Chunk `i` of [`numbered_gib`]: `chunk` with `i` in its first 4 bytes.
fn numbered(chunk: &[u8], i: u32) -> Vec<u8> {
    let mut c = chunk.to_vec();
    c[..4].copy_from_slice(&i.to_le_bytes());
    c
}

/// A 1 GiB body: 1,024 copies of `chunk` (1 MiB), each numbered in its
/// first 4 bytes so no two are alike.
pub fn numbered_gib(
    chunk: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::iter((0..1024u32).map(move |i| Ok(numbered(&chunk, i))))
}

/// The sha256 of [`numbered_gib`]`(chunk)`.
pub fn numbered_gib_sha(chunk: &[u8]) -> String {
    let mut expected = Sha256::new();
    for i in 0..1024u32 {
        expected.update(numbered(chunk, i));
    }
    hex(&expected.finalize())
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub async fn upload(h: &Host, name: &str, ctype: &str, body: Vec<u8>, query: &str) -> (u16, Value) {
    let r = h
        .http
        .post(h.url(&format!(
            "/v1/uploads?name={}&{query}",
            super::url_encode(name)
        )))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A raw request declaring `len` bytes with `Expect: 100-continue`, sending
/// no body: the status and the whole answer.
pub async fn post_expecting_continue(h: &Host, len: u64) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v1/uploads?name=huge HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer without the body")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

pub async fn fetch(
    h: &Host,
    id: &str,
    range: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = h.http.get(h.url(&format!("/v1/uploads/{id}")));
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

pub async fn status_of(h: &Host, id: &str) -> u16 {
    fetch(h, id, None).await.0
}

pub async fn list_all(h: &Host) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = String::new();
    loop {
        let page = h
            .get_json(&format!("/v1/uploads?limit=1&after={after}"))
            .await;
        for u in page["uploads"].as_array().unwrap() {
            ids.push(u["id"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return ids,
        }
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmHWM:` the peak RSS, `VmRSS:`
/// the current one).
pub fn kib_of(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
