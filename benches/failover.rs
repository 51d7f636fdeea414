//! Leader failover and lock round trips: prints figures.
//!
//!     cargo bench --bench failover
//!
//! Three tandem hosts on one PostgreSQL run two jobs every second, calling a
//! real local HTTP endpoint that records every call: `leader-tick`
//! (`run_on = "leader"`) and `once-tick` (`run_on = "once"`). For each lease
//! (default 10s, then 2s), BENCH_TRIALS times (default 20) each:
//!
//! - crash: SIGKILL the leader; measure until another host holds the lease,
//!   and until the first `leader-tick` run on another host; restart it.
//! - clean stop: SIGTERM the leader; measure until another host holds the
//!   lease; restart it.
//!
//! Then it counts double runs (a scheduled time run twice, either job) and
//! missed runs: `once-tick` times that ran nowhere, and `leader-tick` times
//! that ran nowhere although a leader held the lease (outside the failover
//! gaps, where by design nobody runs leader jobs).
//!
//! Last, lock acquire/release round trips over localhost (BENCH_LOCKS,
//! default 2000, one client).
//!
//! Environment: BENCH_TRIALS, BENCH_LEASES (e.g. `2s`), BENCH_LOCKS,
//! TANDEM_BENCH_DATABASE_URL (an existing server instead of a throwaway one).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::recorder::{Call, Recorder};
use common::{Host, Pg, TestDb, env_u64, percentile, tempdir};

fn fmt(label: &str, mut v: Vec<f64>, unit: &str) -> String {
    let n = v.len();
    let p50 = percentile(&mut v, 0.5);
    let p99 = percentile(&mut v, 0.99);
    let max = v.last().copied().unwrap_or(f64::NAN);
    format!(
        "   {label:<38} p50 {p50:7.3} {unit}   p99 {p99:7.3} {unit}   max {max:7.3} {unit}   (n={n})"
    )
}

async fn holder(hosts: &[Host], except: &str) -> Option<String> {
    for h in hosts.iter().filter(|h| h.id != except) {
        let Ok(r) = h.http.get(h.url("/v1/role")).send().await else {
            continue;
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            continue;
        };
        if v["term_remaining_seconds"].is_number() {
            return v["host"].as_str().map(str::to_string);
        }
    }
    None
}

async fn wait_leader(
    hosts: &[Host],
    except: &str,
    timeout: Duration,
) -> Option<(String, Duration)> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(h) = holder(hosts, except).await {
            return Some((h, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn config(recorder: &Recorder) -> String {
    format!(
        "[[jobs]]\nname = \"leader-tick\"\nevery = \"1s\"\nrun_on = \"leader\"\nhttp = {{ url = \"{ok}\" }}\n\n\
         [[jobs]]\nname = \"once-tick\"\nevery = \"1s\"\nrun_on = \"once\"\nhttp = {{ url = \"{ok}\" }}\n",
        ok = recorder.url("/ok")
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = match std::env::var("TANDEM_BENCH_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Pg::from_url(&url),
        _ => common::start_cluster(true),
    };
    let trials = env_u64("BENCH_TRIALS", 20) as usize;
    let leases = std::env::var("BENCH_LEASES").unwrap_or_else(|_| "10s,2s".into());
    println!("tandem failover benchmark: 3 hosts, {trials} trials per case");
    for lease in leases.split(',').map(str::trim).filter(|l| !l.is_empty()) {
        failover(&pg, lease, trials).await;
    }
    locks(&pg).await;
}

async fn failover(pg: &Pg, lease: &str, trials: usize) {
    let db = TestDb::on(pg).await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let cfg = config(&recorder);
    let env = [
        ("TANDEM_LEADER_LEASE", lease),
        ("TANDEM_LOG_LEVEL", "info"),
        ("TANDEM_CLUSTER_HEARTBEAT_INTERVAL", "5s"),
        ("TANDEM_SYNC_POLL_INTERVAL", "2s"),
    ];
    let mut hosts = Vec::new();
    for id in ["h0", "h1", "h2"] {
        hosts.push(Host::start_with_config(&db.url, id, root.path(), &env, &cfg).await);
    }
    for h in &hosts {
        h.wait_ready().await;
    }
    let lease_s = humantime::parse_duration(lease).unwrap().as_secs_f64();
    let (mut crash_lease, mut crash_run, mut clean_lease) = (Vec::new(), Vec::new(), Vec::new());
    // Failover gaps: [kill, first leader run after it).
    let mut gaps: Vec<(Instant, Instant)> = Vec::new();
    let bench_start = Instant::now();
    wait_leader(&hosts, "", Duration::from_secs(30))
        .await
        .expect("a first leader");
    for trial in 0..trials {
        // Crash.
        let (leader, _) = wait_leader(&hosts, "", Duration::from_secs(30))
            .await
            .expect("a leader");
        let idx = hosts.iter().position(|h| h.id == leader).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        hosts[idx].kill();
        let killed = Instant::now();
        let (_, took) = wait_leader(&hosts, &leader, Duration::from_secs(60))
            .await
            .expect("a new leader after a crash");
        crash_lease.push(took.as_secs_f64());
        let first_run = loop {
            if let Some(c) = recorder
                .calls_of("leader-tick")
                .iter()
                .find(|c| c.host != leader && c.at > killed)
            {
                break c.at;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "no run after a crash"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        crash_run.push((first_run - killed).as_secs_f64());
        gaps.push((killed, first_run));
        hosts[idx].spawn().await;
        hosts[idx].wait_ready().await;

        // Clean stop.
        let (leader, _) = wait_leader(&hosts, "", Duration::from_secs(30))
            .await
            .expect("a leader");
        let idx = hosts.iter().position(|h| h.id == leader).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut leaving = hosts.remove(idx);
        let stopping = Instant::now();
        let stop = tokio::spawn(async move {
            leaving.stop().await;
            leaving
        });
        let (_, took) = wait_leader(&hosts, &leader, Duration::from_secs(60))
            .await
            .expect("a new leader after a clean stop");
        clean_lease.push(took.as_secs_f64());
        let first_run = loop {
            if let Some(c) = recorder
                .calls_of("leader-tick")
                .iter()
                .find(|c| c.host != leader && c.at > stopping)
            {
                break c.at;
            }
            assert!(
                stopping.elapsed() < Duration::from_secs(60),
                "no run after a clean stop"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        gaps.push((stopping, first_run));
        let mut back = stop.await.unwrap();
        back.spawn().await;
        back.wait_ready().await;
        hosts.insert(idx, back);
        eprint!("\r  lease {lease}: trial {}/{trials}", trial + 1);
    }
    eprintln!();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now() - Duration::from_secs(2);
    let (doubles, missed_once, missed_leader) = audit(&recorder, bench_start, end, &gaps);
    println!();
    println!(
        "Lease {lease} (target: crash <= lease + 1s = {:.0}s, clean stop <= 1s):",
        lease_s + 1.0
    );
    println!(
        "{}",
        fmt("crash: kill -9 -> new lease holder", crash_lease, "s")
    );
    println!(
        "{}",
        fmt("crash: kill -9 -> first leader run", crash_run, "s")
    );
    println!(
        "{}",
        fmt("clean stop: SIGTERM -> new lease holder", clean_lease, "s")
    );
    println!(
        "   double runs: {doubles}   missed runs: once-tick {missed_once}, leader-tick outside failover gaps {missed_leader}"
    );
    for mut h in hosts {
        h.stop().await;
    }
}

/// Double runs, and missed runs of each job (see the module docs).
fn audit(
    recorder: &Recorder,
    start: Instant,
    end: Instant,
    gaps: &[(Instant, Instant)],
) -> (usize, usize, usize) {
    let parse = |c: &Call| {
        chrono::DateTime::parse_from_rfc3339(&c.scheduled_for)
            .map(|t| t.timestamp())
            .unwrap_or(0)
    };
    let mut doubles = 0;
    let mut missed = [0usize; 2];
    for (j, job) in ["once-tick", "leader-tick"].iter().enumerate() {
        let calls = recorder.calls_of(job);
        let mut per: HashMap<i64, Vec<&Call>> = HashMap::new();
        for c in &calls {
            per.entry(parse(c)).or_default().push(c);
        }
        doubles += per.values().filter(|v| v.len() > 1).count();
        // Map instants to scheduled seconds through the calls themselves.
        let Some(anchor) = calls.first() else {
            continue;
        };
        let to_secs = |i: Instant| {
            let d = i.checked_duration_since(anchor.at).map_or_else(
                || -(anchor.at.duration_since(i).as_secs_f64()),
                |d| d.as_secs_f64(),
            );
            parse(anchor) as f64 + d
        };
        let (from, to) = (
            to_secs(start).ceil() as i64 + 2,
            to_secs(end).floor() as i64 - 1,
        );
        for t in from..=to {
            if per.contains_key(&t) {
                continue;
            }
            let in_gap = gaps
                .iter()
                .any(|(a, b)| (to_secs(*a) - 1.0..=to_secs(*b) + 1.0).contains(&(t as f64)));
            if j == 0 || !in_gap {
                missed[j] += 1;
            }
        }
    }
    (doubles, missed[0], missed[1])
}

async fn locks(pg: &Pg) {
    let db = TestDb::on(pg).await;
    let root = tempdir();
    let h = Host::start(&db.url, "l0", root.path(), &[("TANDEM_LOG_LEVEL", "info")]).await;
    h.wait_ready().await;
    let n = env_u64("BENCH_LOCKS", 2000);
    let (mut acquire, mut release) = (Vec::new(), Vec::new());
    let body = serde_json::json!({"ttl": "30s"});
    for i in 0..n {
        let name = format!("/v1/locks/bench{}", i % 16);
        let t = Instant::now();
        let r = h.http.post(h.url(&name)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        acquire.push(t.elapsed().as_secs_f64() * 1000.0);
        let token = v["token"].as_i64().unwrap();
        let t = Instant::now();
        let r = h
            .http
            .delete(h.url(&format!("{name}?token={token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        release.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!();
    println!("Locks over localhost HTTP, one client, {n} acquire/release pairs:");
    println!("{}", fmt("acquire (POST /v1/locks/{name})", acquire, "ms"));
    println!("{}", fmt("release (DELETE ...?token=)", release, "ms"));

    // Hand-off between hosts: a client waiting on host B gets the lock when
    // a client on host A releases it.
    let b = Host::start(&db.url, "l1", root.path(), &[("TANDEM_LOG_LEVEL", "info")]).await;
    b.wait_ready().await;
    let mut handoff = Vec::new();
    for _ in 0..env_u64("BENCH_HANDOFFS", 200) {
        let r = h
            .http
            .post(h.url("/v1/locks/handoff"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let token = r.json::<serde_json::Value>().await.unwrap()["token"]
            .as_i64()
            .unwrap();
        let (client, url) = (b.http.clone(), b.url("/v1/locks/handoff"));
        let waiter = tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&serde_json::json!({"ttl": "30s", "wait": "10s"}))
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = r.json().await.unwrap();
            (Instant::now(), v["token"].as_i64().unwrap())
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let released = Instant::now();
        let r = h
            .http
            .delete(h.url(&format!("/v1/locks/handoff?token={token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (got, token) = waiter.await.unwrap();
        handoff.push(got.duration_since(released).as_secs_f64() * 1000.0);
        let _ = b
            .http
            .delete(b.url(&format!("/v1/locks/handoff?token={token}")))
            .send()
            .await
            .unwrap();
    }
    println!(
        "{}",
        fmt(
            "hand-off: release on A -> waiter on B has it",
            handoff,
            "ms"
        )
    );
}
