//! Shared uploads, end to end, against two stores: a local directory shared
//! by the hosts (as an NFS mount would be) and a real S3-compatible server
//! (moto). Several tandem processes, one database.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::uploads::{
    Backend, backend, fetch, hosts, list_all, post_expecting_continue, random_bytes, sha,
    status_of, upload,
};
use common::{Host, TestDb, eventually, tempdir};
use serde_json::Value;

async fn shares_uploads(kind: &str) {
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend(kind, root.path()).await;
    let hs = hosts(&db, root.path(), &b, &["a", "b", "c"]).await;
    let (a, bh, c) = (&hs[0], &hs[1], &hs[2]);

    // Two uploads over HTTP: a small one with a hostile name, and one of
    // three parts (multipart).
    let small = random_bytes(1000, 1);
    let (s, meta) = upload(
        a,
        "../../etc/passwd\n.png",
        "image/png",
        small.clone(),
        "wait=cluster",
    )
    .await;
    assert_eq!(s, 201, "{meta}");
    assert_eq!(meta["name"], "passwd.png", "{meta}");
    assert_eq!(meta["sha256"], sha(&small));
    assert_eq!(meta["size"], 1000);
    assert_eq!(meta["applied"], true, "{meta}");
    let small_id = meta["id"].as_str().unwrap().to_string();
    let big = random_bytes(20 << 20, 2);
    let (s, meta) = upload(
        a,
        "big.bin",
        "application/octet-stream",
        big.clone(),
        "wait=cluster",
    )
    .await;
    assert_eq!(s, 201, "{meta}");
    assert_eq!(meta["sha256"], sha(&big));
    let big_id = meta["id"].as_str().unwrap().to_string();

    // Read on the other hosts: byte-identical, with the content type.
    for h in [bh, c] {
        let (s, headers, body) = fetch(h, &small_id, None).await;
        assert_eq!(s, 200);
        assert_eq!(headers["content-type"], "image/png");
        assert!(body == small, "{} served different bytes", h.id);
        let (s, _, body) = fetch(h, &big_id, None).await;
        assert_eq!(s, 200);
        assert!(
            body == big,
            "{} served different bytes of the big upload",
            h.id
        );
    }
    assert!(bh.metric("tandem_uploads_fetched_total").await.unwrap() >= 2.0);
    // HEAD, Range.
    let r = c
        .http
        .head(c.url(&format!("/v1/uploads/{big_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        (20u64 << 20).to_string().as_str()
    );
    let (s, h, body) = fetch(bh, &big_id, Some("bytes=10-19")).await;
    assert_eq!((s, &body[..]), (206, &big[10..20]));
    assert_eq!(
        h["content-range"],
        format!("bytes 10-19/{}", big.len()).as_str()
    );
    let (s, _, body) = fetch(c, &big_id, Some("bytes=-5")).await;
    assert_eq!((s, &body[..]), (206, &big[big.len() - 5..]));
    let (s, _, body) = fetch(c, &big_id, Some("bytes=20971000-")).await;
    assert_eq!((s, &body[..]), (206, &big[20971000..]));
    let (s, _, _) = fetch(c, &big_id, Some("bytes=99999999-")).await;
    assert_eq!(s, 416);
    // A small upload's first read on a host is served from the bytes it
    // just fetched and verified: a range of them, or all of them.
    let mid = random_bytes(1_500_000, 4);
    let (s, meta) = upload(a, "mid.bin", "text/plain", mid.clone(), "wait=cluster").await;
    assert_eq!(s, 201, "{meta}");
    let mid_id = meta["id"].as_str().unwrap().to_string();
    let (s, h, body) = fetch(bh, &mid_id, Some("bytes=1000-1999")).await;
    assert_eq!((s, &body[..]), (206, &mid[1000..2000]));
    assert_eq!(h["content-range"], "bytes 1000-1999/1500000");
    assert_eq!(h["content-type"], "text/plain");
    let (s, h, body) = fetch(c, &mid_id, None).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-length"], "1500000");
    assert!(body == mid, "c served different bytes of its first read");
    let (s, _, body) = fetch(bh, &mid_id, None).await;
    assert!(s == 200 && body == mid, "b's local copy is whole");
    // The local path, for apps that open files themselves.
    let p = c.get_json(&format!("/v1/uploads/{small_id}/path")).await;
    let path = PathBuf::from(p["path"].as_str().unwrap());
    assert!(path.starts_with(&c.dir), "{path:?}");
    assert_eq!(std::fs::read(&path).unwrap(), small);

    // The watched directory: written under an ignored name, renamed in.
    let incoming = a.dir.join("uploads/incoming");
    let dropped = random_bytes(3 << 20, 3);
    std::fs::write(incoming.join(".report.pdf.tmp"), &dropped).unwrap();
    std::fs::rename(
        incoming.join(".report.pdf.tmp"),
        incoming.join("report.pdf"),
    )
    .unwrap();
    let receipt = a.dir.join("uploads/receipts/report.pdf.json");
    eventually(
        "the receipt of the watched file",
        Duration::from_secs(20),
        || async { receipt.exists() },
    )
    .await;
    let r: Value = serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
    assert_eq!(r["sha256"], sha(&dropped));
    assert_eq!(r["content_type"], "application/pdf");
    assert!(!incoming.join("report.pdf").exists());
    let dropped_id = r["id"].as_str().unwrap().to_string();
    let (s, _, body) = fetch(c, &dropped_id, None).await;
    assert!(s == 200 && body == dropped, "{s}");
    // A symlink (to a file outside the directory) and a FIFO renamed in are
    // never taken, and do not stall the watcher.
    let secret = a.dir.join("secret.txt");
    std::fs::write(&secret, b"not for upload").unwrap();
    std::os::unix::fs::symlink(&secret, a.dir.join("link.txt")).unwrap();
    std::fs::rename(a.dir.join("link.txt"), incoming.join("link.txt")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(a.dir.join("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::rename(a.dir.join("pipe"), incoming.join("pipe")).unwrap();
    // Closed after writing (no rename) is taken too.
    std::fs::write(incoming.join("notes.txt"), b"hello").unwrap();
    eventually(
        "the file closed after writing",
        Duration::from_secs(20),
        || async { a.dir.join("uploads/receipts/notes.txt.json").exists() },
    )
    .await;
    for name in ["link.txt", "pipe"] {
        let receipt = a.dir.join(format!("uploads/receipts/{name}.json"));
        assert!(!receipt.exists(), "{name} was taken");
        assert!(
            incoming.join(name).symlink_metadata().is_ok(),
            "{name} left alone"
        );
    }

    // Listing, paged, the same on every host; filtered by name.
    let all = list_all(bh).await;
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(all.contains(&small_id) && all.contains(&big_id) && all.contains(&dropped_id));
    assert!(all.contains(&mid_id));
    let named = c.get_json("/v1/uploads?name=report.pdf").await;
    assert_eq!(named["uploads"][0]["id"], dropped_id.as_str());

    // Hostile or unknown ids: clear JSON errors, nothing escapes.
    for (path, status) in [
        ("/v1/uploads/..%2F..%2Fetc%2Fpasswd", 400),
        ("/v1/uploads/0123", 400),
        ("/v1/uploads/ABCDEF0123456789ABCDEF0123456789", 400),
        ("/v1/uploads/0123456789abcdef0123456789abcdef", 404),
        ("/v1/uploads/0123456789abcdef0123456789abcdef/path", 404),
        ("/v1/uploads?limit=0", 400),
        ("/v1/uploads?after=../x", 400),
    ] {
        let r = a.http.get(a.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    let (s, body) = upload(a, "x", "text/plain", vec![0; 100], "ttl=soon").await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("invalid_ttl"))
    );
    // Larger than max_size: refused before the body is sent when the
    // length is declared (clients sending `Expect: 100-continue`, as curl
    // does, get a clean 413), and cut off at the limit when it is not.
    let (s, text) = post_expecting_continue(a, 31 << 20).await;
    assert_eq!(s, 413, "{text}");
    assert!(text.contains("upload_too_large"), "{text}");
    let chunks =
        futures_util::stream::iter((0..31).map(|_| Ok::<_, std::io::Error>(vec![7u8; 1 << 20])));
    let r = a
        .http
        .post(a.url("/v1/uploads?name=huge"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    assert_eq!(list_all(a).await.len(), 5);
    let client = db.client().await;
    eventually(
        "no pending upload left",
        Duration::from_secs(10),
        || async {
            client
                .query("SELECT 1 FROM tandem.uploads WHERE state <> 'stored'", &[])
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;

    // Delete on one host: gone everywhere, local copies and store included.
    let r = bh
        .http
        .delete(bh.url(&format!("/v1/uploads/{big_id}?wait=cluster")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for h in [a, bh, c] {
        assert_eq!(status_of(h, &big_id).await, 404, "{}", h.id);
    }
    for h in [a, bh, c] {
        let copy = h.dir.join("uploads/files").join(&big_id);
        eventually(
            "the local copy removed",
            Duration::from_secs(10),
            || async { !copy.exists() },
        )
        .await;
    }
    assert!(!b.objects().await.iter().any(|o| o.starts_with(&big_id)));
    let r = a
        .http
        .delete(a.url(&format!("/v1/uploads/{big_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Expiry: a 2 s upload disappears everywhere, with its bytes.
    let (s, meta) = upload(
        c,
        "brief.txt",
        "text/plain",
        b"brief".to_vec(),
        "ttl=2s&wait=cluster",
    )
    .await;
    assert_eq!(s, 201, "{meta}");
    let brief = meta["id"].as_str().unwrap().to_string();
    assert_eq!(status_of(a, &brief).await, 200);
    eventually(
        "the expired upload gone",
        Duration::from_secs(20),
        || async {
            status_of(bh, &brief).await == 404
                && !b.objects().await.iter().any(|o| o.starts_with(&brief))
        },
    )
    .await;
    eventually(
        "the expiry counted once",
        Duration::from_secs(10),
        || async {
            let mut expired = 0.0;
            for h in [a, bh, c] {
                expired += h
                    .metric("tandem_uploads_expired_total")
                    .await
                    .unwrap_or(0.0);
            }
            expired == 1.0
        },
    )
    .await;
    // What stays: the other three, in the store too.
    let objects = b.objects().await;
    for id in [&small_id, &dropped_id] {
        assert!(objects.contains(id), "{id} missing from {objects:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_uploads_on_a_shared_directory() {
    shares_uploads("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_uploads_on_s3() {
    shares_uploads("s3").await;
}

/// A body that sends `first` bytes, then waits for ever (a client stalled
/// mid-upload).
fn stalled_body(first: usize) -> reqwest::Body {
    let data = random_bytes(first, 9);
    let stream = futures_util::stream::iter(
        data.chunks(64 << 10)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    )
    .chain(futures_util::stream::pending());
    reqwest::Body::wrap_stream(stream)
}

use futures_util::StreamExt;

async fn outage_and_crash(kind: &str) {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut b = backend(kind, root.path()).await;
    let mut hs = hosts(&db, root.path(), &b, &["a", "b"]).await;
    let client = db.client().await;

    // The store goes away: uploads fail with 503 and nothing is registered;
    // a watched file is retried (and counted) until it comes back.
    let moved = root.path().join("store-away");
    match &mut b {
        Backend::File(dir) => {
            std::fs::create_dir_all(dir.as_path()).unwrap();
            std::fs::rename(dir.as_path(), &moved).unwrap();
            std::fs::write(dir.as_path(), b"not a directory").unwrap();
        }
        Backend::S3(s3) => s3.stop(),
    }
    let (s, body) = upload(&hs[0], "x.bin", "text/plain", random_bytes(10 << 20, 4), "").await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    // The failed upload is marked abandoned at once (it can no longer be
    // registered); its leftovers go once the store is back.
    let rows = client
        .query(
            "SELECT id || state FROM tandem.uploads WHERE state <> 'abandoned'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        rows.is_empty(),
        "nothing registered or pending: {:?}\n{}",
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>(),
        hs[0].log_text()
    );
    assert!(list_all(&hs[1]).await.is_empty());
    std::fs::write(
        hs[0].dir.join("uploads/incoming/later.txt"),
        b"stored later",
    )
    .unwrap();
    eventually("a counted failure", Duration::from_secs(30), || async {
        hs[0]
            .metric("tandem_uploads_watch_failures_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    match &mut b {
        Backend::File(dir) => {
            std::fs::remove_file(dir.as_path()).unwrap();
            std::fs::rename(&moved, dir.as_path()).unwrap();
        }
        Backend::S3(s3) => s3.restart().await,
    }
    let receipt = hs[0].dir.join("uploads/receipts/later.txt.json");
    eventually(
        "the watched file stored after the outage",
        Duration::from_secs(60),
        || async { receipt.exists() },
    )
    .await;
    let r: Value = serde_json::from_slice(&std::fs::read(&receipt).unwrap()).unwrap();
    let (s, _, body) = fetch(&hs[1], r["id"].as_str().unwrap(), None).await;
    assert_eq!((s, &body[..]), (200, &b"stored later"[..]));
    eventually(
        "the uploads that failed during the outage cleaned",
        Duration::from_secs(30),
        || async {
            let left = client
                .query("SELECT id FROM tandem.uploads WHERE state <> 'stored'", &[])
                .await
                .unwrap();
            left.is_empty() && b.objects().await.len() == 1
        },
    )
    .await;
    // Host a is restarted below (its count starts again): b's count is the
    // baseline.
    let abandoned_before = abandoned_total(&hs[1..]).await;

    // A crash mid-upload (after two parts of a multipart upload went out):
    // nothing is registered, and the expiry job removes the partial bytes
    // and aborts the multipart upload once the host is back.
    let url = hs[0].url("/v1/uploads?name=cut.bin");
    let send = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .post(url)
            .body(stalled_body(20 << 20))
            .send()
            .await;
    });
    eventually("the upload under way", Duration::from_secs(30), || async {
        let rows = client
            .query(
                "SELECT multipart_id FROM tandem.uploads WHERE state = 'pending'",
                &[],
            )
            .await
            .unwrap();
        match &b {
            Backend::File(dir) => {
                rows.len() == 1 && b.objects().await.iter().any(|o| o.contains('#')) && dir.exists()
            }
            Backend::S3(_) => rows.len() == 1 && rows[0].get::<_, Option<String>>(0).is_some(),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    hs[0].kill();
    send.abort();
    assert_eq!(
        list_all(&hs[1]).await.len(),
        1,
        "the partial upload is not listed"
    );
    if kind == "s3" {
        assert_eq!(
            b.open_multipart().await,
            1,
            "the multipart upload left open"
        );
    }
    hs[0].spawn().await;
    eventually(
        "the abandoned upload cleaned",
        Duration::from_secs(30),
        || async {
            let pending = client
                .query("SELECT id FROM tandem.uploads WHERE state <> 'stored'", &[])
                .await
                .unwrap();
            let objects = b.objects().await;
            pending.is_empty() && objects.len() == 1 && b.open_multipart().await == 0
        },
    )
    .await;
    // Counted once, by the host that ran the job (after the cleanup).
    eventually(
        "the abandoned upload counted",
        Duration::from_secs(10),
        || async { abandoned_total(&hs).await == abandoned_before + 1.0 },
    )
    .await;
    // The tmp copy of the partial upload did not survive the restart.
    assert_eq!(
        std::fs::read_dir(hs[0].dir.join("uploads/tmp"))
            .unwrap()
            .count(),
        0
    );
}

/// Abandoned uploads the expiry job cleaned, summed over the hosts (a
/// restarted host's count starts again from zero).
async fn abandoned_total(hs: &[Host]) -> f64 {
    let mut abandoned = 0.0;
    for h in hs {
        abandoned += h
            .metric("tandem_uploads_abandoned_total")
            .await
            .unwrap_or(0.0);
    }
    abandoned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_crash_on_a_shared_directory() {
    outage_and_crash("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_crash_on_s3() {
    outage_and_crash("s3").await;
}
