//! Cold boots (every trigger), the atomic swap of the cache directory, and
//! pruning: past a stopped host, never past a live one, and the cap.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Host, TestDb, assert_converged, eventually, tempdir};

async fn cold_boots(h: &Host, reason: &str) -> f64 {
    h.metric(&format!(
        "tandem_sync_cold_boots_total{{reason=\"{reason}\"}}"
    ))
    .await
    .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cold_boot_trigger() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = Host::start(&db.url, "a", root.path(), &[]).await;
    let b = Host::start(&db.url, "b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    assert_eq!(cold_boots(&a, "no_position").await, 1.0);
    for i in 0..50 {
        a.put("c", &format!("k{i}"), format!("v{i}").as_bytes(), "")
            .await;
    }
    a.put("c", "last", b"x", "?wait=cluster").await;

    // A clean restart reads on from its position: no cold boot.
    a.restart().await;
    a.wait_ready().await;
    for reason in [
        "no_position",
        "corrupt_state",
        "pruned",
        "database_changed",
        "requested",
    ] {
        assert_eq!(cold_boots(&a, reason).await, 0.0, "{reason}");
    }
    assert_converged(&db, &[&a, &b], Duration::from_secs(5)).await;

    // A damaged position file: ignored, cold boot.
    a.stop().await;
    std::fs::write(a.dir.join("position.json"), b"{ half a json").unwrap();
    a.spawn().await;
    a.wait_ready().await;
    assert_eq!(cold_boots(&a, "corrupt_state").await, 1.0);

    // Asked over the API, over the CLI, and from another host.
    let r = a.http.post(a.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    eventually("api resync", Duration::from_secs(10), || async {
        cold_boots(&a, "requested").await == 1.0
    })
    .await;
    let out = a.cli(&["resync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("cli resync", Duration::from_secs(10), || async {
        cold_boots(&a, "requested").await == 2.0
    })
    .await;
    let r = b
        .http
        .post(b.url("/v1/resync?host=a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually("remote resync", Duration::from_secs(10), || async {
        cold_boots(&a, "requested").await == 3.0
    })
    .await;
    let r = b
        .http
        .post(b.url("/v1/resync?host=nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    a.wait_ready().await;
    assert_converged(&db, &[&a, &b], Duration::from_secs(5)).await;

    // The schema is dropped and re-created under running hosts (a restore).
    let admin = db.client().await;
    admin
        .batch_execute("DROP SCHEMA tandem CASCADE")
        .await
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["migrate", "--config", "/dev/null"])
        .env("TANDEM_DATABASE_URL", &db.url)
        .env("TANDEM_DATA_DIR", a.dir.display().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "migrated from version 0 to {}",
            tandem::db::migrate::latest()
        )),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    admin
        .batch_execute("SELECT tandem.put('restored', 'only', 'this is all there is')")
        .await
        .unwrap();
    eventually("database_changed on a", Duration::from_secs(20), || async {
        cold_boots(&a, "database_changed").await == 1.0
    })
    .await;
    eventually("database_changed on b", Duration::from_secs(20), || async {
        cold_boots(&b, "database_changed").await == 1.0
    })
    .await;
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
    assert_eq!(a.read_cache().len(), 1);

    // The host is pointed at another database altogether.
    let other = TestDb::new().await;
    let mut c = Host::start(&other.url, "c", root.path(), &[]).await;
    c.wait_ready().await;
    c.put("elsewhere", "k", b"other db", "?wait=local").await;
    a.stop().await;
    a.set_env("TANDEM_DATABASE_URL", &other.url);
    a.spawn().await;
    a.wait_ready().await;
    assert_eq!(cold_boots(&a, "database_changed").await, 1.0);
    assert_converged(&other, &[&a, &c], Duration::from_secs(10)).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_half_built_cache() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    a.wait_ready().await;
    let admin = db.client().await;
    admin
        .batch_execute("SELECT tandem.put('big', 'key-' || i, repeat('v', 512)) FROM generate_series(1, 20000) i")
        .await
        .unwrap();
    assert_converged(&db, &[&a], Duration::from_secs(30)).await;
    let dir = a.cache_dir().join("big");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 20000);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, dir) = (stop.clone(), reads.clone(), dir.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = std::fs::read_dir(&dir).unwrap().count();
                assert_eq!(n, 20000, "a reader saw a partial cache");
                reads.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    eventually("the reader runs", Duration::from_secs(10), || async {
        reads.load(Ordering::SeqCst) >= 2
    })
    .await;
    let before = reads.load(Ordering::SeqCst);
    let r = a.http.post(a.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // While it rebuilds, the host is not ready (reads keep working).
    eventually(
        "not ready during the cold boot",
        Duration::from_secs(10),
        || async {
            let r = a.http.get(a.url("/readyz")).send().await.unwrap();
            r.status() == 503 && r.text().await.unwrap().contains("cold-booting")
        },
    )
    .await;
    assert_eq!(a.get("big", "key-7").await.map(|v| v.len()), Some(512));
    // Cold boots are counted when they start; the duration when they end.
    eventually("the cold boot", Duration::from_secs(60), || async {
        a.metric("tandem_sync_cold_boot_duration_seconds_count")
            .await
            == Some(2.0)
    })
    .await;
    assert_eq!(cold_boots(&a, "requested").await, 1.0);
    let during = reads.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    reader.join().expect("the reader saw only whole caches");
    let took = a
        .metric("tandem_sync_cold_boot_duration_seconds_sum")
        .await
        .unwrap();
    eprintln!("{during} directory reads during a cold boot of {took:.2}s");
    assert!(during >= 1);
    // The old generation is removed once swapped out.
    eventually(
        "old generation removed",
        Duration::from_secs(20),
        || async {
            std::fs::read_dir(a.dir.join("generations"))
                .unwrap()
                .count()
                == 1
        },
    )
    .await;
    assert_converged(&db, &[&a], Duration::from_secs(10)).await;
}

async fn log_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM tandem.log", &[])
        .await
        .unwrap()
        .get(0)
}

const PRUNE_FAST: &[(&str, &str)] = &[
    ("TANDEM_SYNC_RETAIN", "0s"),
    ("TANDEM_SYNC_PRUNE_INTERVAL", "200ms"),
    ("TANDEM_CLUSTER_HEARTBEAT_INTERVAL", "2s"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_passes_a_stopped_host_which_then_cold_boots() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), PRUNE_FAST).await;
    let mut b = Host::start(&db.url, "b", root.path(), PRUNE_FAST).await;
    a.wait_ready().await;
    b.wait_ready().await;
    a.put("c", "before", b"1", "?wait=cluster").await;
    b.stop().await; // cleanly: no longer live, so it does not hold pruning back
    for i in 0..20 {
        a.put("c", &format!("while-b-was-down-{i}"), b"2", "").await;
    }
    eventually("the log is pruned", Duration::from_secs(10), || async {
        log_rows(&db).await == 0
    })
    .await;
    b.spawn().await;
    b.wait_ready().await;
    assert_eq!(cold_boots(&b, "pruned").await, 1.0);
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_never_passes_a_live_host_unless_past_max_retain() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), PRUNE_FAST).await;
    // b is frozen below: the leader (which prunes) must be a.
    let follower: Vec<(&str, &str)> = PRUNE_FAST
        .iter()
        .copied()
        .chain([("TANDEM_LEADER_ELIGIBLE", "false")])
        .collect();
    let b = Host::start(&db.url, "b", root.path(), &follower).await;
    a.wait_ready().await;
    b.wait_ready().await;
    a.put("c", "k", b"0", "?wait=cluster").await;
    eventually("the log is pruned", Duration::from_secs(10), || async {
        log_rows(&db).await == 0
    })
    .await;

    // b is alive (its heartbeat is fresh) but frozen: its rows stay.
    b.pause();
    for i in 0..10 {
        a.put("c", &format!("k{i}"), b"1", "").await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(log_rows(&db).await, 10, "rows b has not read were pruned");
    b.resume();
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
    assert_eq!(cold_boots(&b, "pruned").await, 0.0);
    eventually(
        "pruned once b has read them",
        Duration::from_secs(10),
        || async { log_rows(&db).await == 0 },
    )
    .await;
    drop(a);
    drop(b);

    // With a cap, rows older than max_retain go even if a live host lags;
    // that host then cold-boots instead of missing them.
    let db = TestDb::new().await;
    let root = tempdir();
    let capped: Vec<(&str, &str)> = PRUNE_FAST
        .iter()
        .copied()
        .chain([("TANDEM_SYNC_MAX_RETAIN", "1s")])
        .collect();
    let a = Host::start(&db.url, "a", root.path(), &capped).await;
    let capped_follower: Vec<(&str, &str)> = capped
        .iter()
        .copied()
        .chain([("TANDEM_LEADER_ELIGIBLE", "false")])
        .collect();
    let b = Host::start(&db.url, "b", root.path(), &capped_follower).await;
    a.wait_ready().await;
    b.wait_ready().await;
    b.pause();
    for i in 0..10 {
        a.put("c", &format!("k{i}"), b"1", "").await;
    }
    eventually("capped pruning", Duration::from_secs(5), || async {
        log_rows(&db).await == 0
    })
    .await;
    b.resume();
    eventually("b cold-boots", Duration::from_secs(10), || async {
        cold_boots(&b, "pruned").await == 1.0
    })
    .await;
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
}
