//! The event stream (`GET /v1/events`) and the webhook, end to end: real
//! tandem processes on one database, real HTTP clients (reqwest, curl, and a
//! raw socket that stops reading).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::recorder::Recorder;
use common::{Host, TestDb, eventually, tempdir};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One parsed SSE event.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    event: String,
    data: Value,
}

/// A streaming SSE client over reqwest.
struct Stream {
    resp: reqwest::Response,
    buf: String,
    heartbeats: usize,
}

impl Stream {
    async fn open(h: &Host, query: &str, last: Option<&str>) -> Stream {
        let mut req = reqwest::Client::new().get(h.url(&format!("/v1/events{query}")));
        if let Some(id) = last {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Stream {
            resp,
            buf: String::new(),
            heartbeats: 0,
        }
    }

    /// The next event, or None after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Sse> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut e = Sse {
                    id: String::new(),
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut any = false;
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.heartbeats += 1;
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        e.id = v.into();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        e.event = v.into();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        e.data = serde_json::from_str(v).unwrap();
                    }
                }
                if any {
                    return Some(e);
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Ok(Ok(Some(c))) => self.buf.push_str(&String::from_utf8_lossy(&c)),
                _ => return None,
            }
        }
    }

    /// Events until one matches `pred` (which is returned last).
    async fn until(&mut self, what: &str, pred: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let e = self
                .next(Duration::from_secs(20))
                .await
                .unwrap_or_else(|| panic!("no event {what}; saw {seen:#?}"));
            let done = pred(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

async fn post(h: &Host, path: &str, body: Value) -> Value {
    let r = h.http.post(h.url(path)).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

fn is_change(e: &Sse, key: &str, op: &str) -> bool {
    e.event == "change" && e.data["key"] == key && e.data["op"] == op
}

/// Every kind of change reaches another host's stream, filtered as asked,
/// with a position and increasing ids; curl reads the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_reaches_another_hosts_stream() {
    let db = TestDb::new().await;
    let root = tempdir();
    let env = [("TANDEM_EVENTS_HEARTBEAT", "1s")];
    let recorder = Recorder::start().await;
    let jobs = format!(
        "[[jobs]]\nname = \"publish\"\nevery = \"1h\"\nrun_on = \"once\"\nhttp = {{ url = \"{}\" }}\n",
        recorder.url("/ok")
    );
    let a = Host::start_with_config(&db.url, "a", root.path(), &env, &jobs).await;
    let b = Host::start(&db.url, "b", root.path(), &env).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut all = Stream::open(&b, "", None).await;
    let mut pages = Stream::open(&b, "?cache=pages&type=change", None).await;
    // 400 for an unknown type, with a JSON body.
    let r = b
        .http
        .get(b.url("/v1/events?type=bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_filter");

    // Events describe the applied state: writes to one key applied in the
    // same batch give one event, and a clear covers its cache's changes in
    // its batch. Waiting for the cluster keeps each change in its own batch.
    a.put("pages", "home", b"<h1>Home</h1>", "?wait=cluster")
        .await;
    a.put("menus", "main", b"m", "").await;
    a.delete("pages", "home", "?wait=cluster").await;
    post(
        &a,
        "/v1/batch",
        json!({"ops": [
            {"op": "put", "cache": "pages", "key": "kept", "value": "k"},
            {"op": "clear", "cache": "pages"},
            {"op": "put", "cache": "pages", "key": "kept", "value": "k2"}]}),
    )
    .await;
    post(&a, "/v1/versions/menu/bump", json!({})).await;
    let up = a
        .http
        .post(a.url("/v1/uploads?name=a.txt"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    let upload: Value = up.json().await.unwrap();
    let run = post(&a, "/v1/jobs/publish/run", json!({})).await;

    let seen = all
        .until("job", |e| e.event == "job" && e.data["job"] == "publish")
        .await;
    assert!(
        !seen
            .iter()
            .any(|e| e.event == "job" && e.data["job"].as_str().unwrap().starts_with("tandem.")),
        "built-in jobs are not announced"
    );
    let find = |pred: &dyn Fn(&Sse) -> bool| seen.iter().find(|e| pred(e)).cloned();
    let put = find(&|e| is_change(e, "home", "put")).expect("the put");
    assert_eq!(put.data["cache"], "pages");
    assert!(put.data["position"].as_str().unwrap().contains(':'));
    assert!(find(&|e| is_change(e, "main", "put") && e.data["cache"] == "menus").is_some());
    assert!(find(&|e| is_change(e, "home", "delete")).is_some());
    let clear = find(&|e| e.event == "change" && e.data["op"] == "clear").expect("the clear");
    assert!(clear.data.get("key").is_none());
    let version = find(&|e| e.event == "version").expect("the bump");
    assert_eq!(version.data["name"], "menu");
    assert_eq!(version.data["value"], 1);
    let reg = find(&|e| e.event == "upload").expect("the upload");
    assert_eq!(reg.data["upload"], upload["id"]);
    assert_eq!(reg.data["op"], "registered");
    let job = seen.last().unwrap();
    assert_eq!(job.data["run"]["run"], run["run_id"]);
    assert_eq!(job.data["run"]["state"], "succeeded");
    // Ids increase; seq matches the id.
    let seqs: Vec<u64> = seen
        .iter()
        .map(|e| e.id.rsplit_once('-').unwrap().1.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seen[0].data["seq"], seqs[0]);

    // The filtered stream: only changes of `pages`.
    let filtered = pages
        .until("the last put of kept", |e| is_change(e, "kept", "put"))
        .await;
    assert!(
        filtered
            .iter()
            .all(|e| e.event == "change" && e.data["cache"] == "pages"),
        "{filtered:#?}"
    );
    assert!(filtered.iter().any(|e| is_change(e, "home", "delete")));
    // Heartbeats arrive as comments while nothing happens.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(pages.next(Duration::from_millis(100)).await.is_none());
    assert!(pages.heartbeats >= 1, "no heartbeat comment");

    // curl, a real command-line client.
    let url = b.url("/v1/events?cache=pages");
    let curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "4", &url])
        .output();
    let writer = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        a.put("pages", "curl", b"c", "").await;
    };
    let (out, ()) = tokio::join!(curl, writer);
    let text = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(text.contains("event: change"), "{text}");
    assert!(text.contains("\"key\":\"curl\""), "{text}");
    let m = b.metric("tandem_events_subscribers").await.unwrap();
    assert!(m >= 2.0, "subscribers {m}");
}

/// Resuming with Last-Event-ID replays what was missed; beyond the window,
/// or from another run of the process, the client is told to resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_within_the_window_and_resync_beyond_it() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = Host::start(&db.url, "a", root.path(), &[("TANDEM_EVENTS_WINDOW", "20")]).await;
    a.wait_ready().await;
    let mut s = Stream::open(&a, "?cache=pages", None).await;
    a.put("pages", "first", b"1", "").await;
    let first = s.until("first", |e| is_change(e, "first", "put")).await;
    let last_id = first.last().unwrap().id.clone();
    drop(s);
    for i in 0..3 {
        a.put("pages", &format!("missed-{i}"), b"x", "").await;
    }
    let mut s = Stream::open(&a, "?cache=pages", Some(&last_id)).await;
    let replay = s
        .until("missed-2", |e| is_change(e, "missed-2", "put"))
        .await;
    let keys: Vec<&str> = replay
        .iter()
        .map(|e| e.data["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["missed-0", "missed-1", "missed-2"]);
    // The query parameter works as the header does.
    let mut q = Stream::open(&a, &format!("?cache=pages&last_event_id={last_id}"), None).await;
    let e = q.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.data["key"], "missed-0");
    drop(s);
    drop(q);

    // 25 more events: `first` has left the 20-event window.
    post(
        &a,
        "/v1/batch",
        json!({"ops": (0..25).map(|i| json!({"op": "put", "cache": "pages", "key": format!("k{i}"), "value": "v"})).collect::<Vec<_>>()}),
    )
    .await;
    eventually("the batch applied", Duration::from_secs(10), || async {
        a.get("pages", "k24").await.is_some()
    })
    .await;
    let mut s = Stream::open(&a, "", Some(&last_id)).await;
    let e = s.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.event, "resync");
    assert_eq!(e.data["reason"], "window");
    // After the resync it goes on live.
    a.put("pages", "after", b"x", "").await;
    s.until("after", |e| is_change(e, "after", "put")).await;
    drop(s);

    // A restart: the old ids mean nothing to the new process.
    a.stop().await;
    a.spawn().await;
    a.wait_ready().await;
    let mut s = Stream::open(&a, "", Some(&last_id)).await;
    let e = s.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.event, "resync");
    assert_eq!(e.data["reason"], "restart");
    assert!(
        a.metric("tandem_events_resyncs_total{reason=\"restart\"}")
            .await
            .unwrap()
            >= 1.0
    );
    // A host stops promptly with a stream open.
    let started = Instant::now();
    let status = a.stop().await;
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A consumer that stops reading never slows the applier; when it reads
/// again it is told to resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_told_to_resync_and_slows_nothing() {
    let db = TestDb::new().await;
    let root = tempdir();
    let env = [("TANDEM_EVENTS_BUFFER", "16")];
    let a = Host::start(&db.url, "a", root.path(), &env).await;
    let b = Host::start(&db.url, "b", root.path(), &env).await;
    a.wait_ready().await;
    b.wait_ready().await;
    // A raw client with a tiny receive buffer that sends its request and
    // then reads nothing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut conn = sock.connect(b.addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /v1/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            b.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // ~12 MB of events (1000-byte keys), written through host A in
    // batches, each waiting until every host has applied it.
    let long = "k".repeat(990);
    let started = Instant::now();
    for batch in 0..12 {
        let ops: Vec<Value> = (0..1000)
            .map(|i| json!({"op": "put", "cache": "bulk", "key": format!("{long}{batch:03}{i:04}"), "value": "v"}))
            .collect();
        let r = post(
            &a,
            "/v1/batch?wait=cluster&timeout=60s",
            json!({ "ops": ops }),
        )
        .await;
        assert_eq!(r["applied"], true, "host B kept up with a stalled consumer");
    }
    println!(
        "12,000 writes applied on both hosts in {:?}",
        started.elapsed()
    );
    // B applied everything, although its stream client read nothing.
    assert!(b.get("bulk", &format!("{long}0110999")).await.is_some());
    // Now read: somewhere after the first events comes a lagged resync.
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&text).contains("\"reason\":\"lagged\"") {
            break;
        }
    }
    // Read on a little after the resync: ids only grow.
    let more = Instant::now() + Duration::from_secs(3);
    while Instant::now() < more {
        match tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => text.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&text);
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .filter_map(|id| id.rsplit_once('-')?.1.parse().ok())
        .collect();
    assert!(seqs.len() > 1);
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ids went backwards: {seqs:?}"
    );
    assert!(
        text.contains("event: resync"),
        "no resync in {} bytes",
        text.len()
    );
    assert!(text.contains("\"reason\":\"lagged\""));
    assert!(
        b.metric("tandem_events_resyncs_total{reason=\"lagged\"}")
            .await
            .unwrap()
            >= 1.0
    );
}

/// A small app endpoint for the webhook: records batches, fails (503) or
/// refuses (422) while told.
#[derive(Clone, Default)]
struct Hook {
    batches: Arc<Mutex<Vec<Value>>>,
    failing: Arc<Mutex<bool>>,
    refusing: Arc<Mutex<bool>>,
    attempts: Arc<Mutex<u32>>,
}

impl Hook {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let me = me.clone();
                async move {
                    *me.attempts.lock().unwrap() += 1;
                    if *me.failing.lock().unwrap() {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    if *me.refusing.lock().unwrap() {
                        return axum::http::StatusCode::UNPROCESSABLE_ENTITY;
                    }
                    me.batches
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap());
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hook")
    }

    fn keys(&self) -> Vec<String> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["events"].as_array().unwrap().clone())
            .filter(|e| e["type"] == "change")
            .map(|e| e["key"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// The webhook gets applied batches in order, and retries while the app
/// answers errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_gets_every_batch_and_retries() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hook = Hook::default();
    let url = hook.start().await;
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    let b = Host::start(
        &db.url,
        "b",
        root.path(),
        &[("TANDEM_EVENTS_WEBHOOK_URL", &url)],
    )
    .await;
    a.wait_ready().await;
    b.wait_ready().await;
    // The webhook starts with its resync; a change made before it started
    // would be covered by that resync, not sent, so wait for it.
    eventually("the start's resync", Duration::from_secs(20), || async {
        !hook.batches.lock().unwrap().is_empty()
    })
    .await;
    a.put("pages", "one", b"1", "").await;
    eventually("the first delivery", Duration::from_secs(20), || async {
        hook.keys() == vec!["one".to_string()]
    })
    .await;
    let first = hook.batches.lock().unwrap()[0]["events"][0].clone();
    assert_eq!(first["type"], "resync", "a start begins with a resync");
    assert_eq!(first["reason"], "restart");
    let batch = hook.batches.lock().unwrap().last().unwrap().clone();
    assert_eq!(batch["host"], "b");
    let event = batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "change")
        .unwrap()
        .clone();
    assert!(event["id"].as_str().unwrap().contains('-'));
    assert_eq!(event["cache"], "pages");
    assert_eq!(event["op"], "put");
    // The app fails for a while: tandem retries, nothing is lost.
    *hook.failing.lock().unwrap() = true;
    let before = *hook.attempts.lock().unwrap();
    for k in ["two", "three", "four"] {
        a.put("pages", k, b"x", "").await;
    }
    eventually("retries", Duration::from_secs(20), || async {
        *hook.attempts.lock().unwrap() >= before + 2
    })
    .await;
    *hook.failing.lock().unwrap() = false;
    eventually("the retried delivery", Duration::from_secs(30), || async {
        hook.keys() == vec!["one", "two", "three", "four"]
    })
    .await;
    assert!(
        b.metric("tandem_events_webhook_posts_total{outcome=\"error\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(
        b.metric("tandem_events_webhook_delivered_total")
            .await
            .unwrap()
            >= 4.0
    );

    // The app refuses one batch outright (422): after 5 refusals it is
    // dropped and replaced by a resync, and delivery goes on.
    *hook.refusing.lock().unwrap() = true;
    let before = *hook.attempts.lock().unwrap();
    a.put("pages", "five", b"x", "").await;
    eventually("five refusals", Duration::from_secs(30), || async {
        b.metric("tandem_events_webhook_posts_total{outcome=\"refused\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(*hook.attempts.lock().unwrap() >= before + 5);
    *hook.refusing.lock().unwrap() = false;
    a.put("pages", "six", b"x", "").await;
    eventually(
        "delivery after the refused batch",
        Duration::from_secs(30),
        || async { hook.keys().last().map(String::as_str) == Some("six") },
    )
    .await;
    assert_eq!(hook.keys(), vec!["one", "two", "three", "four", "six"]);
    let events: Vec<Value> = hook
        .batches
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b["events"].as_array().unwrap().clone())
        .collect();
    let resync = events
        .iter()
        .find(|e| e["type"] == "resync" && e["reason"] == "refused")
        .expect("a resync in place of the refused batch");
    // Ids only grow along the deliveries.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    assert!(resync["seq"].as_u64().unwrap() >= 5);
}
