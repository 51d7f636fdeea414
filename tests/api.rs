//! The HTTP API: round trips, listing, clearing, batches, and every kind of
//! bad input answered with a clear JSON 4xx while the daemon keeps serving.

mod common;

use std::time::Duration;

use common::{Host, TestDb, assert_converged, tempdir};
use serde_json::{Value, json};

/// Sends a raw HTTP request and returns the whole response.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    let got = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    assert!(ct.starts_with("application/json"), "content type {ct}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_listing_clearing_and_batches() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let http = &a.http;

    // Content type is kept and served back; HEAD answers without a body.
    let r = http
        .put(a.url("/v1/cache/pages/about?wait=cluster"))
        .header("content-type", "text/html; charset=utf-8")
        .body("<p>about</p>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(b.url("/v1/cache/pages/about"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "<p>about</p>");
    let r = http
        .head(b.url("/v1/cache/pages/about"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "12");

    // Keys with slashes, dots, unicode and spaces; an empty value.
    for key in [
        "a/b/c",
        "../up",
        ".hidden",
        "ünï cødé",
        "%2e%2e",
        "x".repeat(1024).as_str(),
    ] {
        a.put("odd", key, key.as_bytes(), "?wait=cluster").await;
        assert_eq!(
            b.get("odd", key).await.as_deref(),
            Some(key.as_bytes()),
            "{key}"
        );
    }
    a.put("odd", "empty", b"", "?wait=cluster").await;
    assert_eq!(b.get("odd", "empty").await, Some(Vec::new()));
    // Nothing left the cache directory: every file sits under odd/.
    for entry in std::fs::read_dir(b.cache_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(["pages", "odd", ".tmp"].contains(&name.as_str()), "{name}");
    }

    // Listing is sorted and paged.
    for i in 0..25 {
        a.put("list", &format!("item-{i:02}"), b"x", "").await;
    }
    a.put("list", "zz-other", b"x", "?wait=cluster").await;
    let page: Value = b.get_json("/v1/cache/list?prefix=item-&limit=10").await;
    assert_eq!(page["keys"].as_array().unwrap().len(), 10);
    assert_eq!(page["keys"][0], "item-00");
    assert_eq!(page["next"], "item-09");
    let page: Value = b
        .get_json("/v1/cache/list?prefix=item-&limit=10&start_after=item-19")
        .await;
    assert_eq!(page["keys"].as_array().unwrap().len(), 5);
    assert_eq!(page["next"], Value::Null);
    let caches: Value = b.get_json("/v1/cache").await;
    assert_eq!(caches["caches"], json!(["list", "odd", "pages"]));

    // Clear removes the whole cache on every host.
    let r: Value = http
        .delete(a.url("/v1/cache/list?wait=cluster"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["applied"], true);
    let page: Value = b.get_json("/v1/cache/list").await;
    assert_eq!(page["keys"], json!([]));

    // A batch is atomic: one bad op and nothing is written.
    let r = http
        .post(a.url("/v1/batch"))
        .json(&json!({"ops": [
            {"op": "put", "cache": "batch", "key": "ok", "value": "fine"},
            {"op": "put", "cache": "Bad!", "key": "k", "value": "v"}
        ]}))
        .send()
        .await
        .unwrap();
    let body = expect_error(r, 400, "invalid_batch").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("ops[1]")
    );
    let r = http
        .post(a.url("/v1/batch?wait=cluster"))
        .json(&json!({"ops": [
            {"op": "put", "cache": "batch", "key": "t", "value": "text"},
            {"op": "put", "cache": "batch", "key": "j", "json": {"n": [1, 2]}},
            {"op": "put", "cache": "batch", "key": "b", "base64": "3q2+7w=="},
            {"op": "delete", "cache": "pages", "key": "about"},
            {"op": "clear", "cache": "odd"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let local = b.read_cache();
    assert_eq!(
        local[&("batch".into(), "j".into())],
        (br#"{"n":[1,2]}"#.to_vec(), "application/json".into())
    );
    assert_eq!(
        local[&("batch".into(), "b".into())].0,
        vec![0xde, 0xad, 0xbe, 0xef]
    );
    assert!(!local.contains_key(&("pages".into(), "about".into())));
    assert!(!local.keys().any(|(c, _)| c == "odd"));
    assert_converged(&db, &[&a, &b], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_the_daemon_keeps_serving() {
    let db = TestDb::new().await;
    let root = tempdir();
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "let-me-in\n").unwrap();
    let token_path = token_file.display().to_string();
    let a = Host::start(
        &db.url,
        "a",
        root.path(),
        &[
            ("TANDEM_API_TOKEN_FILE", &token_path),
            ("TANDEM_API_MAX_VALUE_SIZE", "1KiB"),
            ("TANDEM_API_MAX_BATCH_OPS", "3"),
            ("TANDEM_API_MAX_BATCH_SIZE", "4KiB"),
        ],
    )
    .await;
    a.wait_ready().await;
    let http = reqwest::Client::new();
    let auth = |rb: reqwest::RequestBuilder| rb.bearer_auth("let-me-in");

    // Writes need the token; reads do not.
    let r = http
        .put(a.url("/v1/cache/c/k"))
        .body("v")
        .send()
        .await
        .unwrap();
    let r401 = r.headers().get("www-authenticate").cloned();
    expect_error(r, 401, "unauthorized").await;
    assert!(r401.is_some());
    let r = http
        .put(a.url("/v1/cache/c/k"))
        .bearer_auth("wrong")
        .body("v")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized").await;
    let r = http.delete(a.url("/v1/cache/c")).send().await.unwrap();
    expect_error(r, 401, "unauthorized").await;
    let r = http.post(a.url("/v1/resync")).send().await.unwrap();
    expect_error(r, 401, "unauthorized").await;
    let r = auth(http.put(a.url("/v1/cache/c/k?wait=local")))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        http.get(a.url("/v1/cache/c/k"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Names and keys.
    let long = "k".repeat(1025);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/v1/cache/Caps/k".into(), 400, "invalid_cache"),
        ("/v1/cache/-dash/k".into(), 400, "invalid_cache"),
        (
            format!("/v1/cache/{}/k", "c".repeat(65)),
            400,
            "invalid_cache",
        ),
        ("/v1/cache/c%2F..%2Fetc/k".into(), 400, "invalid_cache"),
        ("/v1/cache/c/a%00b".into(), 400, "invalid_key"),
        (format!("/v1/cache/c/{long}"), 400, "invalid_key"),
        ("/v1/cache/c/%FF%FE".into(), 400, "invalid_path"),
        ("/v1/cache/c/k?wait=eventually".into(), 400, "invalid_wait"),
        (
            "/v1/cache/c/k?timeout=forever".into(),
            400,
            "invalid_timeout",
        ),
    ];
    for (path, status, code) in &cases {
        let r = auth(http.put(a.url(path))).body("v").send().await.unwrap();
        expect_error(r, *status, code).await;
    }
    for (path, status, code) in cases.iter().filter(|c| !c.0.contains('?')) {
        let r = http.get(a.url(path)).send().await.unwrap();
        expect_error(r, *status, code).await;
    }
    // Traversal attempts are just keys: they are stored inside the cache.
    // (HTTP clients normalise `.` and `..` path segments away, so those two
    // are sent over a raw socket.)
    for key in ["..", "."] {
        let put = format!(
            "PUT /v1/cache/c/{key}?wait=local HTTP/1.0\r\nAuthorization: Bearer let-me-in\r\nContent-Length: 6\r\n\r\ninside"
        );
        assert!(raw(a.addr, &put).await.starts_with("HTTP/1.0 200"), "{key}");
        let got = raw(a.addr, &format!("GET /v1/cache/c/{key} HTTP/1.0\r\n\r\n")).await;
        assert!(
            got.starts_with("HTTP/1.0 200") && got.ends_with("inside"),
            "{got}"
        );
    }
    for key in ["../../etc/passwd", "%2e%2e%2f%2e%2e", "a/../../b"] {
        let path = format!("/v1/cache/c/{}", common::url_encode(key));
        let r = auth(http.put(a.url(&format!("{path}?wait=local"))))
            .body("inside")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{key}");
        assert_eq!(
            http.get(a.url(&path))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
            "inside"
        );
    }
    assert!(!root.path().join("etc").exists());
    let r = http
        .get(a.url("/v1/cache/c/never-written"))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found").await;

    // Sizes.
    let r = auth(http.put(a.url("/v1/cache/c/big")))
        .body(vec![b'x'; 1025])
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "body_too_large").await;
    let r = auth(http.put(a.url("/v1/cache/c/fits")))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A chunked body without a length is cut off at the limit too.
    let stream =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let r = auth(http.put(a.url("/v1/cache/c/chunked")))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "body_too_large").await;
    let r = auth(http.put(a.url("/v1/cache/c/ct")))
        .header("content-type", "x".repeat(300))
        .body("v")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_content_type").await;

    // Batches.
    let four: Vec<Value> = (0..4)
        .map(|i| json!({"op": "delete", "cache": "c", "key": format!("k{i}")}))
        .collect();
    let r = auth(http.post(a.url("/v1/batch")))
        .json(&json!({"ops": four}))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "batch_too_large").await;
    let r = auth(http.post(a.url("/v1/batch")))
        .body("{\"ops\": [")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "invalid_json").await;
    let r = auth(http.post(a.url("/v1/batch")))
        .body(vec![b' '; 5000])
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "body_too_large").await;
    let r = auth(http.post(a.url("/v1/batch")))
        .json(&json!({"ops": [{"op": "put", "cache": "c", "key": "k", "value": "x".repeat(1025)}]}))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "value_too_large").await;

    // Routes and methods.
    expect_error(
        http.get(a.url("/v2/nothing")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        http.patch(a.url("/v1/cache/c/k")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
    expect_error(
        http.get(a.url("/v1/wait")).send().await.unwrap(),
        400,
        "invalid_token",
    )
    .await;
    expect_error(
        http.get(a.url("/v1/wait?token=abc")).send().await.unwrap(),
        400,
        "invalid_token",
    )
    .await;
    expect_error(
        http.get(a.url("/v1/cache/c/k?after=nope"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_token",
    )
    .await;
    expect_error(
        http.get(a.url("/v1/cache/c?limit=lots"))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_query",
    )
    .await;

    // Raw garbage on the socket does not hurt either.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
        s.write_all(b"\x00\x01\x02 GARBAGE / HTTP/9\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    }

    // Still serving, still correct.
    let r = auth(http.put(a.url("/v1/cache/c/after-all?wait=local")))
        .body("fine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        http.get(a.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let mut a = a;
    assert!(a.is_running());
    assert_converged(&db, &[&a], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_reads_never_serve_a_replaced_value() {
    // GETs are answered from an in-memory copy of small values when they
    // can; the copy must never outlive the file it came from.
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (http, base, stop) = (b.http.clone(), b.url("/v1/cache/hot/"), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = http.get(format!("{base}k{}", n % 3)).send().await;
                n += 1;
            }
        }));
    }
    for i in 0..150 {
        let key = format!("k{}", i % 3);
        let value = format!("value {i}");
        let token = a.put("hot", &key, value.as_bytes(), "").await;
        // Read-your-write on the other host, with concurrent readers.
        let r = b
            .http
            .get(b.url(&format!("/v1/cache/hot/{key}?after={token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), value, "write {i}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    let hits = b
        .metric("tandem_http_read_cache_total{result=\"hit\"}")
        .await
        .unwrap();
    assert!(hits > 0.0, "the in-memory copy was never used");
    // A cold boot swaps the directory: the copies go too.
    a.put("hot", "k0", b"before resync", "?wait=cluster").await;
    assert_eq!(
        b.get("hot", "k0").await.as_deref(),
        Some(&b"before resync"[..])
    );
    let c = db.client().await;
    c.batch_execute("SELECT tandem.put('hot', 'k0', 'changed under a cold boot')")
        .await
        .unwrap();
    let r = b.http.post(b.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
    assert_eq!(
        b.get("hot", "k0").await.as_deref(),
        Some(&b"changed under a cold boot"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_unix_socket_with_tcp_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let root = tempdir();
    let sock = root.path().join("run/tandem.sock");
    let data = root.path().join("unix");
    let log = std::fs::File::create(root.path().join("unix.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--config", "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TANDEM_DATA_DIR", data.display().to_string())
        .env("TANDEM_HOST_ID", "unix")
        .env("TANDEM_DATABASE_URL", &db.url)
        .env("TANDEM_API_LISTEN", "")
        .env("TANDEM_API_UNIX_SOCKET", sock.display().to_string())
        .stderr(log)
        .spawn()
        .unwrap();
    common::eventually("the socket", Duration::from_secs(20), || async {
        sock.exists()
    })
    .await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let request = |req: String| {
        let sock = sock.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    common::eventually("ready over the socket", Duration::from_secs(20), || {
        let r = request("GET /readyz HTTP/1.0\r\n\r\n".into());
        async move { r.await.starts_with("HTTP/1.0 200") }
    })
    .await;
    let put =
        request("PUT /v1/cache/c/k?wait=local HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello".into())
            .await;
    assert!(put.starts_with("HTTP/1.0 200"), "{put}");
    let get = request("GET /v1/cache/c/k HTTP/1.0\r\n\r\n".into()).await;
    assert!(get.ends_with("hello"), "{get}");
    // The CLI finds the daemon through the socket too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--config", "/dev/null"])
        .env("TANDEM_API_LISTEN", "")
        .env("TANDEM_API_UNIX_SOCKET", sock.display().to_string())
        .env("TANDEM_DATA_DIR", data.display().to_string())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unix *"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // No TCP port was opened.
    let log = std::fs::read_to_string(root.path().join("unix.log")).unwrap();
    assert!(!log.contains("api listening addr="), "{log}");
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().unwrap().success());
}

/// Connections are served by several threads, each accepting from the same
/// socket: many clients at once all get their own answers. A request still
/// running at SIGTERM is answered before the host stops, and the host then
/// still reaches the database to mark itself stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_and_a_stop_that_drains() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = Host::start(&db.url, "a", root.path(), &[]).await;
    a.wait_ready().await;

    // 48 clients, each with its own connection, writing and reading back
    // their own keys at the same time.
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..48 {
        let base = a.url("/v1/cache/threads/");
        clients.spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            for i in 0..10 {
                let url = format!("{base}c{c}-{i}");
                let r = http
                    .put(format!("{url}?wait=local"))
                    .body(format!("value {c} {i}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
                let got = http.get(&url).send().await.unwrap();
                assert_eq!(got.status(), 200);
                assert_eq!(got.text().await.unwrap(), format!("value {c} {i}"));
            }
        });
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    assert_eq!(a.read_cache().len(), 480);

    // A wait that can only time out (2 s), in flight when SIGTERM comes.
    let waiting = {
        let url = a.url("/v1/wait?for=local&token=999999999&timeout=2s");
        let http = a.http.clone();
        tokio::spawn(async move { http.get(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = a.stop().await;
    assert!(status.success(), "{status}");
    let r = waiting.await.unwrap().expect("answered, not cut off");
    expect_error(r, 504, "not_applied").await;
    let stopped: bool = db
        .client()
        .await
        .query_one(
            "SELECT stopped_at IS NOT NULL FROM tandem.hosts WHERE id = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stopped, "host a is not marked stopped:\n{}", a.log_text());
}
