//! Shared uploads: upload on host A, read on host B, beside the floor of a
//! bare `object_store` put then get of the same bytes to the same store, in
//! the same run. Prints figures.
//!
//!     cargo bench --bench uploads
//!
//! For each store (BENCH_STORES, default `file`; `file,s3` adds a real
//! S3-compatible server, moto, installed by scripts/install-test-deps.sh):
//!
//! - peak memory: a 1 GiB body streamed to A, then read whole on B; the
//!   growth of each process's peak RSS (VmHWM after, VmRSS before);
//! - 1 MiB files (BENCH_SMALL times, default 50) and 100 MiB files
//!   (BENCH_LARGE times, default 5), alternating tandem and floor runs:
//!   latency p50/p99 of upload-then-read, and throughput (bytes moved twice,
//!   in and out, over the time of both).
//!
//! Beside the floor the issue names, a second reference: the HTTP floor,
//! the same `put` and `get` behind one HTTP hop each way (a bare axum
//! server in this process: `PUT` takes the whole body and `put`s it, `GET`
//! answers the bytes of a `get`; no hashing, no registry, no local copy,
//! bodies held in memory). It shows what moving the bytes through HTTP
//! costs by itself, and what tandem adds to that.
//!
//! A tandem round is `POST /v1/uploads` on A (answered once the upload is
//! in the store and registered), then `GET /v1/uploads/{id}` on B, read to
//! the end: B has not applied the registration yet, looks it up in the
//! database, fetches the object into its local copy, verifies size and
//! sha256 and serves it; B's second read of it (from its local copy, not
//! part of the round) shows what serving alone costs. A floor round is
//! `put` then `get` + read to the end with the same crate on the same
//! store.
//!
//! Environment: BENCH_STORES, BENCH_SMALL, BENCH_LARGE,
//! BENCH_QUIET_WAIT and BENCH_MIN_FILE_RATE (wait before starting for a
//! quiet disk and a quick filesystem: see `common::wait_for_quiet_machine`;
//! the machine's state is printed at the start and the end either way),
//! TANDEM_BENCH_DATABASE_URL (an existing server instead of a throwaway one).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use bytes::Bytes;
use common::s3::S3Server;
use common::uploads::{kib_of, numbered_gib};
use common::{Host, Pg, TestDb, env_u64, percentile, tempdir};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const MIB: usize = 1 << 20;

fn random_bytes(n: usize, seed: u64) -> Bytes {
    Bytes::from(common::uploads::random_bytes(n, seed))
}

/// The store under test, for tandem (its environment) and for the floor.
struct Store {
    label: &'static str,
    env: Vec<(String, String)>,
    floor: Arc<dyn ObjectStore>,
    _s3: Option<S3Server>,
}

async fn store(kind: &str, root: &Path) -> Store {
    match kind {
        "file" => {
            let shared = root.join("shared-store");
            let floor_dir = root.join("floor-store");
            std::fs::create_dir_all(&floor_dir).unwrap();
            Store {
                label: "local directory",
                env: vec![(
                    "TANDEM_UPLOADS_STORE".into(),
                    format!("file://{}", shared.display()),
                )],
                floor: Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&floor_dir).unwrap(),
                ),
                _s3: None,
            }
        }
        "s3" => {
            let s3 = S3Server::start("tandem-bench").await;
            let floor = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_endpoint(s3.endpoint())
                .with_region("us-east-1")
                .with_allow_http(true)
                .with_access_key_id("testing")
                .with_secret_access_key("testing")
                .build()
                .unwrap();
            Store {
                label: "S3 (moto on loopback)",
                env: s3.env("site/uploads"),
                floor: Arc::new(floor),
                _s3: Some(s3),
            }
        }
        other => panic!("unknown store {other:?}: use file or s3"),
    }
}

/// One tandem round: the upload's and the read's durations, and a second
/// read's (untimed by the round's total).
async fn tandem_round(
    client: &reqwest::Client,
    a: &Host,
    b: &Host,
    body: Bytes,
) -> (f64, f64, f64) {
    let len = body.len();
    let t0 = Instant::now();
    let r = client
        .post(a.url("/v1/uploads?name=bench.bin"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "upload failed: {}",
        r.text().await.unwrap()
    );
    let meta: serde_json::Value = r.json().await.unwrap();
    let up = t0.elapsed().as_secs_f64();
    let id = meta["id"].as_str().unwrap().to_string();
    let t1 = Instant::now();
    assert_eq!(read_upload(client, b, &id).await, len as u64);
    let down = t1.elapsed().as_secs_f64();
    // Again, from B's local copy: what serving costs without the fetch.
    let t2 = Instant::now();
    assert_eq!(read_upload(client, b, &id).await, len as u64);
    let again = t2.elapsed().as_secs_f64();
    // Deleting keeps the store and the local copies from filling the disk;
    // it is not timed.
    let r = client
        .delete(a.url(&format!("/v1/uploads/{id}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    (up, down, again)
}

/// `GET /v1/uploads/{id}` on `host`, read to the end (not kept): the
/// bytes read.
async fn read_upload(client: &reqwest::Client, host: &Host, id: &str) -> u64 {
    let mut r = client
        .get(host.url(&format!("/v1/uploads/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut n = 0u64;
    while let Some(c) = r.chunk().await.unwrap() {
        n += c.len() as u64;
    }
    n
}

/// One floor round: put, then get and read to the end.
async fn floor_round(store: &dyn ObjectStore, i: usize, body: Bytes) -> (f64, f64) {
    let len = body.len();
    let path = ObjectPath::from(format!("floor/{i}"));
    let t0 = Instant::now();
    store.put(&path, PutPayload::from(body)).await.unwrap();
    let up = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), len);
    let down = t1.elapsed().as_secs_f64();
    store.delete(&path).await.unwrap();
    (up, down)
}

/// The HTTP floor's server (see the top of this file), on this process's
/// runtime: its base URL.
async fn http_floor(store: Arc<dyn ObjectStore>) -> String {
    type St = State<Arc<dyn ObjectStore>>;
    async fn put(State(store): St, UrlPath(name): UrlPath<String>, body: Body) -> StatusCode {
        let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
            return StatusCode::BAD_REQUEST;
        };
        let path = ObjectPath::from(format!("http/{name}"));
        match store.put(&path, PutPayload::from(bytes)).await {
            Ok(_) => StatusCode::CREATED,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    async fn get(State(store): St, UrlPath(name): UrlPath<String>) -> Result<Bytes, StatusCode> {
        let path = ObjectPath::from(format!("http/{name}"));
        let got = store.get(&path).await.map_err(|_| StatusCode::NOT_FOUND)?;
        got.bytes()
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    }
    let router = Router::new()
        .route("/o/{name}", axum::routing::put(put).get(get))
        .with_state(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// One HTTP floor round: PUT, then GET read to the end.
async fn http_floor_round(
    client: &reqwest::Client,
    url: &str,
    store: &dyn ObjectStore,
    i: usize,
    body: Bytes,
) -> (f64, f64) {
    let len = body.len() as u64;
    let t0 = Instant::now();
    let r = client
        .put(format!("{url}/o/{i}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut r = client.get(format!("{url}/o/{i}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut n = 0u64;
    while let Some(c) = r.chunk().await.unwrap() {
        n += c.len() as u64;
    }
    assert_eq!(n, len);
    let down = t1.elapsed().as_secs_f64();
    store
        .delete(&ObjectPath::from(format!("http/{i}")))
        .await
        .unwrap();
    (up, down)
}

fn line(label: &str, mut v: Vec<f64>) -> (f64, String) {
    let n = v.len();
    let p50 = percentile(&mut v, 0.5) * 1000.0;
    let p99 = percentile(&mut v, 0.99) * 1000.0;
    (
        p50,
        format!("      {label:<28} p50 {p50:9.2} ms   p99 {p99:9.2} ms   (n={n})"),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = match std::env::var("TANDEM_BENCH_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Pg::from_url(&url),
        _ => common::start_cluster(true),
    };
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "file".into());
    println!("tandem uploads benchmark: upload on host A, read on host B");
    // Where the machine's file creation is probed (removed at the end).
    let probe = tempdir();
    common::wait_for_quiet_machine(probe.path()).await;
    println!("at the start: {}", common::machine_pressure(probe.path()));
    for kind in stores.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        bench_store(&pg, kind).await;
    }
}

async fn bench_store(pg: &Pg, kind: &str) {
    let db = TestDb::on(pg).await;
    let root = tempdir();
    let st = store(kind, root.path()).await;
    let mut env = st.env.clone();
    env.push(("TANDEM_UPLOADS_MAX_SIZE".into(), "2GiB".into()));
    env.push(("TANDEM_LOG_LEVEL".into(), "info".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = Host::start(&db.url, "a", root.path(), &env).await;
    let b = Host::start(&db.url, "b", root.path(), &env).await;
    a.wait_ready().await;
    b.wait_ready().await;
    println!("\n== store: {} ==", st.label);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()
        .unwrap();
    let http = http_floor(st.floor.clone()).await;
    tandem_round(&client, &a, &b, random_bytes(9 * MIB, 1)).await;
    floor_round(st.floor.as_ref(), 0, random_bytes(9 * MIB, 1)).await;
    http_floor_round(
        &client,
        &http,
        st.floor.as_ref(),
        0,
        random_bytes(9 * MIB, 1),
    )
    .await;

    memory(&client, &a, &b).await;

    let small = env_u64("BENCH_SMALL", 50) as usize;
    let large = env_u64("BENCH_LARGE", 5) as usize;
    let mut small_added = f64::NAN;
    for (size, rounds) in [(MIB, small), (100 * MIB, large)] {
        let body = random_bytes(size, size as u64);
        let (mut t_total, mut f_total, mut h_total) = (Vec::new(), Vec::new(), Vec::new());
        let (mut h_up, mut h_down) = (Vec::new(), Vec::new());
        let (mut t_up, mut t_down, mut t_again, mut f_up, mut f_down) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..rounds {
            let (u, d, again) = tandem_round(&client, &a, &b, body.clone()).await;
            t_up.push(u);
            t_down.push(d);
            t_again.push(again);
            t_total.push(u + d);
            let (u, d) = floor_round(st.floor.as_ref(), i, body.clone()).await;
            f_up.push(u);
            f_down.push(d);
            f_total.push(u + d);
            let (u, d) = http_floor_round(&client, &http, st.floor.as_ref(), i, body.clone()).await;
            h_up.push(u);
            h_down.push(d);
            h_total.push(u + d);
        }
        let moved = (2 * size * rounds) as f64 / MIB as f64;
        let t_tput = moved / t_total.iter().sum::<f64>();
        let f_tput = moved / f_total.iter().sum::<f64>();
        let h_tput = moved / h_total.iter().sum::<f64>();
        println!("   {} MiB files, {rounds} rounds each", size / MIB);
        let (tp50, l) = line("tandem upload+read", t_total);
        println!("{l}");
        println!("{}", line("  upload on A", t_up).1);
        println!("{}", line("  read on B", t_down).1);
        println!("{}", line("  (read on B again: local)", t_again).1);
        let (fp50, l) = line("floor put+get", f_total);
        println!("{l}");
        println!("{}", line("  put", f_up).1);
        println!("{}", line("  get", f_down).1);
        println!("{}", line("HTTP floor PUT+GET", h_total).1);
        println!("{}", line("  PUT", h_up).1);
        println!("{}", line("  GET", h_down).1);
        println!(
            "      throughput: tandem {t_tput:8.1} MiB/s   floor {f_tput:8.1} MiB/s   = {:5.1} % of the floor (target >= 80 %)",
            100.0 * t_tput / f_tput
        );
        println!(
            "                  HTTP floor {h_tput:8.1} MiB/s: tandem = {:5.1} % of it (a reference; no target)",
            100.0 * t_tput / h_tput
        );
        println!("      added latency at p50: {:+.2} ms", tp50 - fp50);
        if size == MIB {
            small_added = tp50 - fp50;
        }
    }
    if kind == "file" {
        println!(
            "   added latency for a 1 MiB file on the local store: {small_added:+.2} ms (target <= 5 ms)"
        );
    }
    // Before this store's hosts and files are removed.
    println!("   at the end: {}", common::machine_pressure(root.path()));
}

/// A 1 GiB body streamed to A, then read whole on B: each process's peak
/// RSS growth.
async fn memory(client: &reqwest::Client, a: &Host, b: &Host) {
    let body = numbered_gib(random_bytes(MIB, 7).to_vec());
    let (pa, pb) = (a.pid().unwrap(), b.pid().unwrap());
    let before_a = kib_of(pa, "VmRSS:");
    let t0 = Instant::now();
    let r = client
        .post(a.url("/v1/uploads?name=big.iso"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up = t0.elapsed().as_secs_f64();
    let meta: serde_json::Value = r.json().await.unwrap();
    assert_eq!(meta["size"], 1u64 << 30);
    let growth_a = kib_of(pa, "VmHWM:").saturating_sub(before_a) / 1024;
    let before_b = kib_of(pb, "VmRSS:");
    let t1 = Instant::now();
    let id = meta["id"].as_str().unwrap();
    assert_eq!(read_upload(client, b, id).await, 1u64 << 30);
    let down = t1.elapsed().as_secs_f64();
    let growth_b = kib_of(pb, "VmHWM:").saturating_sub(before_b) / 1024;
    println!("   1 GiB upload: {up:.1} s on A, read on B {down:.1} s");
    println!(
        "      peak RSS growth: A (upload) {growth_a} MiB, B (fetch + serve) {growth_b} MiB (target <= 64 MiB)"
    );
    let r = client
        .delete(a.url(&format!("/v1/uploads/{id}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}
