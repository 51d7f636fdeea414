//! Convergence under chaos: HTTP writers and SQL writers (inside app
//! transactions held open for random times, some rolled back) write, delete
//! and clear overlapping keys while hosts are SIGKILLed and restarted and one
//! host cold-boots mid-run. At the end every host's cache directory equals
//! the `entries` table byte for byte (values and content types).
//!
//! The run is seeded; set `TANDEM_TEST_SEED` to replay one, and
//! `TANDEM_TEST_CHAOS_SECS` to run longer.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Host, TestDb, assert_converged, tempdir, url_encode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

const CACHES: [&str; 2] = ["c0", "c1"];
const KEYS: usize = 16;
const TYPES: [&str; 3] = ["text/plain", "application/json", "application/octet-stream"];

fn value(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(0..2048);
    (0..len).map(|_| rng.random::<u8>()).collect()
}

fn key(rng: &mut StdRng) -> String {
    format!(
        "k{}/{}",
        rng.random_range(0..KEYS),
        ["x", "y.z", "ü"][rng.random_range(0..3)]
    )
}

async fn http_writer(
    hosts: Arc<Vec<Mutex<Host>>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    while !stop.load(Ordering::SeqCst) {
        let h = &hosts[rng.random_range(0..hosts.len())];
        let base = h.lock().await.url("");
        let cache = CACHES[rng.random_range(0..2)];
        let k = key(&mut rng);
        let roll = rng.random_range(0..100);
        let req = if roll < 65 {
            http.put(format!("{base}/v1/cache/{cache}/{}", url_encode(&k)))
                .header("content-type", TYPES[rng.random_range(0..3)])
                .body(value(&mut rng))
        } else if roll < 88 {
            http.delete(format!("{base}/v1/cache/{cache}/{}", url_encode(&k)))
        } else if roll < 91 {
            http.delete(format!("{base}/v1/cache/{cache}"))
        } else {
            let ops: Vec<serde_json::Value> = (0..rng.random_range(1..20))
                .map(|_| {
                    let k = key(&mut rng);
                    let c = CACHES[rng.random_range(0..2)];
                    if rng.random_bool(0.8) {
                        serde_json::json!({"op": "put", "cache": c, "key": k, "value": format!("batch {}", rng.random::<u32>())})
                    } else {
                        serde_json::json!({"op": "delete", "cache": c, "key": k})
                    }
                })
                .collect();
            http.post(format!("{base}/v1/batch"))
                .json(&serde_json::json!({"ops": ops}))
        };
        // A host may be down (killed) right now: that is part of the test.
        if let Ok(r) = req.send().await
            && r.status().is_success()
        {
            ops.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn sql_writer(url: String, seed: u64, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let client = common::connect(&url).await;
    while !stop.load(Ordering::SeqCst) {
        match sql_transaction(&client, &mut rng).await {
            Ok(true) => {
                ops.fetch_add(1, Ordering::SeqCst);
            }
            Ok(false) => {}
            // Two app transactions writing the same keys in opposite orders
            // deadlock, and PostgreSQL aborts one: an app rolls back and
            // carries on, and so does this writer.
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert_eq!(code.as_deref(), Some("40P01"), "unexpected SQL error: {e}");
                client.batch_execute("ROLLBACK").await.unwrap();
            }
        }
    }
}

/// One app transaction; true when it committed.
async fn sql_transaction(
    client: &tokio_postgres::Client,
    rng: &mut StdRng,
) -> Result<bool, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    for _ in 0..rng.random_range(1..6) {
        let cache = CACHES[rng.random_range(0..2)];
        let k = key(rng);
        let roll = rng.random_range(0..100);
        if roll < 70 {
            let v = value(rng);
            let ct = TYPES[rng.random_range(0..3)];
            client
                .execute(
                    "SELECT tandem.put($1, $2, $3::bytea, $4)",
                    &[&cache, &k, &v, &ct],
                )
                .await?;
        } else if roll < 97 {
            client
                .execute("SELECT tandem.delete($1, $2)", &[&cache, &k])
                .await?;
        } else {
            client.execute("SELECT tandem.clear($1)", &[&cache]).await?;
        }
    }
    // Hold the transaction open a while, like a slow request would.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
    if rng.random_bool(0.1) {
        client.batch_execute("ROLLBACK").await?;
        Ok(false)
    } else {
        client.batch_execute("COMMIT").await?;
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_converges_to_the_database_under_chaos() {
    let seed: u64 = std::env::var("TANDEM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let secs: u64 = std::env::var("TANDEM_TEST_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("convergence: TANDEM_TEST_SEED={seed}, {secs}s of chaos");
    let mut rng = StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let root = tempdir();
    let small_pages = [("TANDEM_SYNC_BATCH_SIZE", "7")];
    let mut hosts = Vec::new();
    for id in ["a", "b", "c"] {
        hosts.push(Mutex::new(
            Host::start(&db.url, id, root.path(), &small_pages).await,
        ));
    }
    for h in &hosts {
        h.lock().await.wait_ready().await;
    }
    let hosts = Arc::new(hosts);

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for i in 0..2 {
        writers.push(tokio::spawn(http_writer(
            hosts.clone(),
            seed ^ (i + 1),
            stop.clone(),
            ops.clone(),
        )));
        writers.push(tokio::spawn(sql_writer(
            db.url.clone(),
            seed ^ (i + 100),
            stop.clone(),
            ops.clone(),
        )));
    }

    // Chaos: kill -9 and restart hosts; one cold boot mid-run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut kills = 0;
    let mut resynced = false;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let i = rng.random_range(0..hosts.len());
        if !resynced && kills >= 2 {
            let h = hosts[i].lock().await;
            let r = h.http.post(h.url("/v1/resync")).send().await.unwrap();
            assert_eq!(r.status(), 202);
            eprintln!("convergence: asked {} to cold-boot", h.id);
            resynced = true;
            continue;
        }
        let mut h = hosts[i].lock().await;
        h.kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        h.spawn().await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    eprintln!(
        "convergence: {} writes committed, {kills} hosts killed",
        ops.load(Ordering::SeqCst)
    );
    assert!(kills >= 3 && resynced);
    assert!(ops.load(Ordering::SeqCst) > 50);

    let guards: Vec<_> = futures_util::future::join_all(hosts.iter().map(|h| h.lock())).await;
    let refs: Vec<&Host> = guards.iter().map(|g| &**g).collect();
    assert_converged(&db, &refs, Duration::from_secs(30)).await;
    let truth = db.entries().await;
    assert!(!truth.is_empty());
    for h in &refs {
        assert!(
            !h.log_contains("panicked"),
            "{} panicked:\n{}",
            h.id,
            h.log_text()
        );
    }
}
