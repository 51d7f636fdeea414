//! App locks and version counters across real tandem processes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Host, TestDb, eventually, tempdir};
use serde_json::{Value, json};

async fn post(h: &Host, path: &str, body: Value) -> (u16, Value) {
    let r = h.http.post(h.url(path)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_exclude_across_hosts_with_increasing_tokens() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut hosts = Vec::new();
    for id in ["a", "b", "c"] {
        hosts.push(Arc::new(Host::start(&db.url, id, root.path(), &[]).await));
    }
    for h in &hosts {
        h.wait_ready().await;
    }
    let held = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..9 {
        let h = hosts[w % 3].clone();
        let (held, tokens) = (held.clone(), tokens.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..5 {
                let (status, v) = post(
                    &h,
                    "/v1/locks/orders",
                    json!({"ttl": "10s", "wait": "20s", "owner": format!("worker {w}")}),
                )
                .await;
                assert_eq!(status, 200, "{v}");
                assert!(!held.swap(true, Ordering::SeqCst), "two holders at once");
                let token = v["token"].as_i64().unwrap();
                tokens.lock().unwrap().push(token);
                tokio::time::sleep(Duration::from_millis(5)).await;
                held.store(false, Ordering::SeqCst);
                let r = h
                    .http
                    .delete(h.url(&format!("/v1/locks/orders?token={token}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 45);
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
    let mut waited = 0.0;
    for h in &hosts {
        waited += h
            .metric("tandem_lock_acquisitions_total{outcome=\"waited\"}")
            .await
            .unwrap();
    }
    assert!(waited > 0.0, "contention is counted");

    // Held: 409 with the holder; a wrong token cannot renew or release.
    let a = &hosts[0];
    let (status, v) = post(
        a,
        "/v1/locks/report",
        json!({"ttl": "30s", "owner": "cron"}),
    )
    .await;
    assert_eq!(status, 200);
    let token = v["token"].as_i64().unwrap();
    let (status, v) = post(&hosts[1], "/v1/locks/report", json!({})).await;
    assert_eq!(status, 409);
    assert_eq!(v["error"]["code"], "lock_held");
    assert_eq!(v["holder"], "a");
    assert_eq!(v["owner"], "cron");
    let (status, v) = post(a, "/v1/locks/report/renew", json!({"token": token + 1})).await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "lock_lost");
    let (status, v) = post(
        a,
        "/v1/locks/report/renew",
        json!({"token": token, "ttl": "1m"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["expires_in"].as_f64().unwrap() > 50.0);
    // Bad input: a clear 4xx.
    for (path, body) in [
        ("/v1/locks/..%2Fx", json!({})),
        ("/v1/locks/ok", json!({"ttl": "forever"})),
        ("/v1/locks/ok", json!({"ttl": "1s", "colour": "red"})),
        ("/v1/locks/ok", json!({"ttl": "1ms"})),
    ] {
        let (status, v) = post(a, path, body).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert!(v["error"]["code"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_lock_frees_at_its_ttl() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = Host::start(&db.url, "a", root.path(), &[]).await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let (status, v) = post(&a, "/v1/locks/import", json!({"ttl": "2s"})).await;
    assert_eq!(status, 200);
    let first = v["token"].as_i64().unwrap();
    let taken = Instant::now();
    a.kill();
    let (status, v) = post(&b, "/v1/locks/import", json!({"ttl": "2s", "wait": "10s"})).await;
    assert_eq!(status, 200, "{v}");
    let waited = taken.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "taken after {waited:?}"
    );
    assert!(waited < Duration::from_secs(6), "taken after {waited:?}");
    assert!(v["token"].as_i64().unwrap() > first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_counters_travel_through_the_log_and_survive_restarts() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    let mut b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(b.get_json("/v1/versions/content").await["version"], 0);
    for expected in 1..=3 {
        let (status, v) = post(&a, "/v1/versions/content/bump?wait=cluster", json!({})).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["version"], expected);
        assert_eq!(v["applied"], true);
        assert_eq!(
            b.get_json("/v1/versions/content").await["version"],
            expected
        );
    }
    // Through SQL too, inside an app's transaction.
    let client = db.client().await;
    client
        .batch_execute("BEGIN; SELECT * FROM tandem.bump('media'); COMMIT;")
        .await
        .unwrap();
    eventually("the SQL bump arrives", Duration::from_secs(5), || async {
        b.get_json("/v1/versions/media").await["version"] == 1
    })
    .await;
    let all = b.get_json("/v1/versions").await;
    assert_eq!(all["versions"], json!({"content": 3, "media": 1}));
    // Not a cache: invisible to the cache API.
    let caches = b.get_json("/v1/cache").await;
    assert!(!caches.to_string().contains("_versions"), "{caches}");
    // Kept across a restart and a cold boot.
    b.restart().await;
    assert_eq!(b.get_json("/v1/versions/content").await["version"], 3);
    let r = b.http.post(b.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    eventually("the cold boot ends", Duration::from_secs(10), || async {
        let m = b
            .metric("tandem_sync_cold_boots_total{reason=\"requested\"}")
            .await;
        m == Some(1.0) && b.get_json("/v1/status").await["ready"] == true
    })
    .await;
    assert_eq!(b.get_json("/v1/versions/content").await["version"], 3);
    let r = b
        .http
        .get(b.url("/v1/versions/bad%2Fname"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
