//! One host's side of shared uploads: memory stays flat for a 1 GiB body
//! read back on another host, a local copy found on disk after a restart
//! is verified before it is served, and a read before the registration is
//! applied here verifies against the database's metadata, many first
//! reads at once share one fetch, and an upload abandoned while it streams
//! in is refused and cleaned.

mod common;

use std::time::Duration;

use common::uploads::{
    Backend, backend, fetch, hex, hosts, kib_of, numbered_gib, numbered_gib_sha, random_bytes, sha,
    upload,
};
use common::{Host, TestDb, tempdir};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A 1 GiB upload streams through with flat memory, and reads back whole
/// on another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_with_flat_memory() {
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend("file", root.path()).await;
    let mut env = b.env();
    env.push(("TANDEM_UPLOADS_MAX_SIZE".into(), "2GiB".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = Host::start(&db.url, "a", root.path(), &env).await;
    let bh = Host::start(&db.url, "b", root.path(), &env).await;
    a.wait_ready().await;
    bh.wait_ready().await;
    // Warm up the paths, then measure the peak.
    let (s, _) = upload(&a, "warm", "text/plain", random_bytes(9 << 20, 5), "").await;
    assert_eq!(s, 201);
    let pid = a.pid().unwrap();
    let before = kib_of(pid, "VmHWM:");
    let chunk = random_bytes(1 << 20, 6);
    let expected = numbered_gib_sha(&chunk);
    let body = numbered_gib(chunk);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let r = client
        .post(a.url("/v1/uploads?name=big.iso"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let meta: Value = r.json().await.unwrap();
    assert_eq!(meta["size"], 1u64 << 30);
    assert_eq!(meta["sha256"], expected.as_str());
    let growth_mib = (kib_of(pid, "VmHWM:").saturating_sub(before)) / 1024;
    println!("peak RSS growth for a 1 GiB upload: {growth_mib} MiB");
    assert!(growth_mib <= 64, "peak RSS grew by {growth_mib} MiB");
    // Read back whole on the other host, hashing as it streams.
    let mut r = client
        .get(bh.url(&format!("/v1/uploads/{}", meta["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = Sha256::new();
    let mut n = 0u64;
    while let Some(c) = r.chunk().await.unwrap() {
        n += c.len() as u64;
        got.update(&c);
    }
    assert_eq!(n, 1u64 << 30);
    assert_eq!(hex(&got.finalize()), expected);
}

/// Local copies are not fsynced: one found on disk after a restart is
/// checked against its sha256 before it is served, and fetched again when
/// it does not match (as a power loss could leave it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_local_copy_is_fetched_again_after_a_restart() {
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend("file", root.path()).await;
    let mut hs = hosts(&db, root.path(), &b, &["a", "b"]).await;
    let body = random_bytes(300_000, 9);
    let (s, meta) = upload(
        &hs[0],
        "doc.bin",
        "application/octet-stream",
        body.clone(),
        "",
    )
    .await;
    assert_eq!(s, 201);
    let id = meta["id"].as_str().unwrap().to_string();
    let (s, _, got) = fetch(&hs[1], &id, None).await;
    assert_eq!((s, got.len()), (200, body.len()));
    hs[1].stop().await;
    let copy = hs[1].dir.join("uploads/files").join(&id);
    let mut torn = std::fs::read(&copy).unwrap();
    torn[1000..5000].fill(0);
    std::fs::write(&copy, &torn).unwrap();
    hs[1].spawn().await;
    hs[1].wait_ready().await;
    let (s, _, got) = fetch(&hs[1], &id, None).await;
    assert_eq!(s, 200);
    assert!(got == body, "the damaged copy was served");
    assert!(hs[1].log_contains("does not match its sha256"));
    assert_eq!(std::fs::read(&copy).unwrap(), body, "fetched again");
}

/// "The origin host restarted" compares the host's process start with the
/// one that began the upload, both by the host's clock: a host whose clock
/// runs ahead of the database's keeps its fresh uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_clock_ahead_of_the_database_does_not_abandon_uploads() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    a.wait_ready().await;
    let c = db.client().await;
    // Host "skewed" started 30 s "after" the database's now, by its clock.
    c.batch_execute(
        "INSERT INTO tandem.hosts (id, version, started_at, heartbeat_at, heartbeat_interval) \
         VALUES ('skewed', 'test', now() + interval '30 s', now(), interval '5 s'); \
         SELECT tandem.upload_begin(repeat('a', 32), 'f', 'text/plain', 'skewed', interval '1 hour', \
                                    now() + interval '30 s'); \
         SELECT tandem.upload_begin(repeat('b', 32), 'f', 'text/plain', 'skewed', interval '1 hour')",
    )
    .await
    .unwrap();
    let state = |id: char| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT state FROM tandem.uploads WHERE id = repeat($1::text, 32)",
                &[&id.to_string()],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
        }
    };
    let expire = "SELECT count(*) FROM tandem.upload_expire(interval '1 day', 3, 100, 'a')";
    c.query_one(expire, &[]).await.unwrap();
    assert_eq!(state('a').await, "pending", "this run's upload stays");
    // An older binary's row (no process start) keeps the old comparison.
    assert_eq!(state('b').await, "abandoned");
    // The host restarts: its uploads from the previous run are abandoned.
    c.batch_execute(
        "UPDATE tandem.hosts SET started_at = now() + interval '60 s' WHERE id = 'skewed'",
    )
    .await
    .unwrap();
    c.query_one(expire, &[]).await.unwrap();
    assert_eq!(state('a').await, "abandoned");
}

/// A read on a host that has not applied an upload's registration yet (as
/// a read on another host right after the upload; here it never will: the
/// rows are written straight into the registry, without a log row) takes
/// the metadata from the database. The object is served and kept only if
/// it matches that metadata (a small one, read whole, and a larger one);
/// for one that does not match, or is in the store but not registered,
/// nothing is served and nothing is left behind.
/// Registers `body` as upload `id` stored by another host (`text/plain`,
/// for an hour), straight in the database.
async fn register_elsewhere(c: &tokio_postgres::Client, id: &str, body: &[u8]) {
    c.execute(
        "INSERT INTO tandem.uploads (id, state, name, content_type, size, sha256, origin, \
         ttl, stored_at, expires_at) VALUES ($1, 'stored', 'f.bin', 'text/plain', $2, $3, \
         'elsewhere', interval '1 hour', now(), now() + interval '1 hour')",
        &[&id, &(body.len() as i64), &sha(body)],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_before_the_registration_is_applied() {
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend("file", root.path()).await;
    let Backend::File(store) = &b else {
        unreachable!("a directory store")
    };
    let hs = hosts(&db, root.path(), &b, &["a"]).await;
    let h = &hs[0];
    let c = db.client().await;
    // (id, bytes in the store, bytes registered, expected status)
    let small = random_bytes(300_000, 11);
    let large = random_bytes(3 << 20, 12);
    let cases = [
        ("1".repeat(32), small.clone(), Some(small.clone()), 200),
        ("2".repeat(32), large.clone(), Some(large.clone()), 200),
        (
            "3".repeat(32),
            small.clone(),
            Some(random_bytes(300_000, 13)),
            502,
        ),
        ("4".repeat(32), small.clone(), None, 404),
    ];
    for (id, stored, registered, _) in &cases {
        std::fs::write(store.join(id), stored).unwrap();
        if let Some(r) = registered {
            register_elsewhere(&c, id, r).await;
        }
    }
    let files = h.dir.join("uploads/files");
    for (id, stored, _, status) in &cases {
        let (s, headers, body) = fetch(h, id, None).await;
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        assert_eq!(s, *status, "{id}: {text}");
        if *status == 200 {
            assert!(body == *stored, "{id}: different bytes served");
            assert_eq!(headers["content-type"], "text/plain");
            assert_eq!(std::fs::read(files.join(id)).unwrap(), *stored, "{id} kept");
            // And again, from the local copy, with a range.
            let (s, _, part) = fetch(h, id, Some("bytes=5-9")).await;
            assert_eq!((s, &part[..]), (206, &stored[5..10]));
        } else {
            assert!(!files.join(id).exists(), "{id}: no local copy");
        }
    }
    let left: Vec<_> = std::fs::read_dir(h.dir.join("uploads/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "temp files left: {left:?}");
    assert_eq!(
        h.metric("tandem_uploads_fetched_total").await.unwrap(),
        2.0,
        "the two good reads are counted as fetches"
    );
    assert!(
        h.metric("tandem_uploads_checksum_mismatches_total")
            .await
            .unwrap()
            >= 1.0
    );
}

/// Many reads at once of an upload this host has no copy of: while the
/// store holds the wrong bytes, every read fails (never a partly written or
/// mixed copy served) and leaves no temporary file; once the store holds
/// the right bytes, every read gets them whole, from one shared fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_reads_share_one_fetch() {
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend("file", root.path()).await;
    let Backend::File(store) = &b else {
        unreachable!("a directory store")
    };
    let hs = hosts(&db, root.path(), &b, &["a"]).await;
    let h = &hs[0];
    let id = "5".repeat(32);
    let body = random_bytes(6 << 20, 21);
    register_elsewhere(&db.client().await, &id, &body).await;
    let mut wrong = body.clone();
    wrong[4 << 20] ^= 1;
    std::fs::write(store.join(&id), &wrong).unwrap();
    let reads = |n: usize| {
        let id = id.clone();
        async move {
            let all = (0..n).map(|_| fetch(h, &id, None));
            futures_util::future::join_all(all).await
        }
    };
    for (s, _, got) in reads(12).await {
        assert_eq!(s, 502, "{}", String::from_utf8_lossy(&got));
    }
    let tmp = h.dir.join("uploads/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files left"
    );
    assert!(!h.dir.join("uploads/files").join(&id).exists());
    std::fs::write(store.join(&id), &body).unwrap();
    for (s, _, got) in reads(12).await {
        assert_eq!(s, 200);
        assert!(got == body, "different bytes served");
    }
    assert_eq!(
        h.metric("tandem_uploads_fetched_total").await.unwrap(),
        1.0,
        "one fetch served them all"
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files left"
    );
}

/// An upload the expiry job abandons while it streams in (it took longer
/// than `uploads.abandon_after`, or its host looked dead) is refused with
/// 409 when its body ends, is never listed, and its bytes are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_abandoned_while_streaming_is_refused() {
    use futures_util::StreamExt;
    let db = TestDb::new().await;
    let root = tempdir();
    let b = backend("file", root.path()).await;
    let hs = hosts(&db, root.path(), &b, &["a"]).await;
    let h = &hs[0];
    let c = db.client().await;
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let first = random_bytes(12 << 20, 31);
    let head = futures_util::stream::iter(
        first
            .chunks(1 << 20)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let tail = futures_util::stream::once(async move {
        let _ = wait.await;
        Ok(vec![7u8; 1000])
    });
    let url = h.url("/v1/uploads?name=slow.bin");
    let client = h.http.clone();
    let sent = tokio::spawn(async move {
        let r = client
            .post(url)
            .body(reqwest::Body::wrap_stream(head.chain(tail)))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    common::eventually("the upload under way", Duration::from_secs(30), || async {
        let parts = b.objects().await.iter().any(|o| o.contains('#'));
        let rows = c
            .query("SELECT 1 FROM tandem.uploads WHERE state = 'pending'", &[])
            .await
            .unwrap();
        parts && rows.len() == 1
    })
    .await;
    c.execute("UPDATE tandem.uploads SET state = 'abandoned'", &[])
        .await
        .unwrap();
    go.send(()).unwrap();
    let (status, body) = sent.await.unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("upload_abandoned")),
        "{body}"
    );
    assert!(common::uploads::list_all(h).await.is_empty());
    common::eventually(
        "the abandoned upload cleaned",
        Duration::from_secs(30),
        || async {
            let rows = c.query("SELECT 1 FROM tandem.uploads", &[]).await.unwrap();
            rows.is_empty() && b.objects().await.is_empty()
        },
    )
    .await;
    let tmp = h.dir.join("uploads/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temp files left"
    );
}
