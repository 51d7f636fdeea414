//! A database outage seen by one host: it keeps serving reads from its cache
//! and stays ready (an outage must not take every host out of the load
//! balancer), refuses writes with 503, says so in its status and metrics, and
//! catches up when the database returns. A read cut off in the middle of a
//! clear never wipes keys that exist.

mod common;

use std::time::Duration;

use common::proxy::{Proxy, upstream_of};
use common::{Host, TestDb, assert_converged, eventually, tempdir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_database_serves_reads_and_catches_up() {
    let db = TestDb::new().await;
    let root = tempdir();
    let proxy = Proxy::start(upstream_of(&db.url)).await;
    let a = Host::start(
        &proxy.url_for(&db.url),
        "a",
        root.path(),
        &[("TANDEM_DATABASE_CONNECT_TIMEOUT", "1s")],
    )
    .await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    for i in 0..50 {
        b.put("pages", &format!("p{i}"), format!("v{i}").as_bytes(), "")
            .await;
    }
    b.put("pages", "last", b"x", "?wait=cluster").await;

    proxy.cut();
    eventually("a notices", Duration::from_secs(10), || async {
        a.get_json("/v1/status").await["database"]["connected"] == false
    })
    .await;
    // Reads still work and the host stays ready.
    assert_eq!(a.get("pages", "p7").await.as_deref(), Some(&b"v7"[..]));
    let r = a.http.get(a.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Writes fail clearly.
    let r = a
        .http
        .put(a.url("/v1/cache/pages/new"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable");
    eventually("db_up reports 0", Duration::from_secs(10), || async {
        a.metric("tandem_db_up").await == Some(0.0)
    })
    .await;
    assert!(a.get_json("/v1/status").await["database"]["last_error"].is_string());

    // The cluster moves on meanwhile.
    b.put("pages", "p1", b"changed while a was cut off", "")
        .await;
    b.delete("pages", "p2", "").await;
    let r = b
        .http
        .delete(b.url("/v1/cache/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.get("pages", "p1").await.as_deref(), Some(&b"v1"[..]));

    proxy.restore();
    assert_converged(&db, &[&a, &b], Duration::from_secs(30)).await;
    eventually("db_up reports 1", Duration::from_secs(10), || async {
        a.metric("tandem_db_up").await == Some(1.0)
    })
    .await;
    assert!(
        a.metric("tandem_db_reconnects_total{conn=\"sync\"}")
            .await
            .unwrap()
            >= 1.0
    );
    let r = a
        .http
        .put(a.url("/v1/cache/pages/new?wait=cluster"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cut_off_mid_clear_never_wipes_the_cache() {
    let db = TestDb::new().await;
    let root = tempdir();
    let proxy = Proxy::start(upstream_of(&db.url)).await;
    let a = Host::start(
        &proxy.url_for(&db.url),
        "a",
        root.path(),
        &[("TANDEM_DATABASE_CONNECT_TIMEOUT", "1s")],
    )
    .await;
    a.wait_ready().await;
    let writer = db.client().await;
    let fill = |version: u32| {
        format!(
            "BEGIN; SELECT tandem.clear('big'); \
             SELECT tandem.put('big', 'k' || i, repeat('{version}', 8192)) FROM generate_series(1, 3000) i; COMMIT"
        )
    };
    writer.batch_execute(&fill(0)).await.unwrap();
    assert_converged(&db, &[&a], Duration::from_secs(30)).await;
    let dir = a.cache_dir().join("big");

    for (round, delay_ms) in [(1u32, 0u64), (2, 5), (3, 20), (4, 60)] {
        // The clear and its 3000 entries arrive in one page; cut the
        // connection while that page streams in.
        writer.batch_execute(&fill(round)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            n, 3000,
            "round {round}: keys that exist were removed after a failed read"
        );
        proxy.restore();
        assert_converged(&db, &[&a], Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_apply_becomes_unready_keeps_its_cache_and_recovers() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[("TANDEM_SYNC_MAX_LAG", "1s")]).await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    b.put("pages", "old", b"still here", "?wait=cluster").await;
    // The cache directory cannot be written (an immutable directory stands
    // in for a full or broken disk; root cannot write it either).
    let dir = std::fs::read_link(a.cache_dir()).unwrap().join("pages");
    let chattr = |flag: &str| {
        let s = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(s.success(), "chattr {flag}");
    };
    chattr("+i");
    b.put("pages", "new", b"cannot land on a", "").await;
    eventually(
        "a is known to be behind",
        Duration::from_secs(15),
        || async {
            let r = a.http.get(a.url("/readyz")).send().await.unwrap();
            if r.status() != 503 {
                return false;
            }
            let body: serde_json::Value = r.json().await.unwrap();
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("behind")
        },
    )
    .await;
    assert_eq!(
        a.get("pages", "old").await.as_deref(),
        Some(&b"still here"[..])
    );
    assert!(
        a.metric("tandem_sync_errors_total{stage=\"apply\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    chattr("-i");
    a.wait_ready().await;
    assert_converged(&db, &[&a, &b], Duration::from_secs(15)).await;
}
