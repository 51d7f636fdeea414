//! The leader lease and `leader` jobs across real tandem processes: crash
//! failover, clean handover, and a frozen leader that must not act under
//! its old term.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::recorder::{Call, Recorder};
use common::{Host, TestDb, eventually, tempdir};

const LEASE: &[(&str, &str)] = &[("TANDEM_LEADER_LEASE", "2s")];

fn leader_job(recorder: &Recorder) -> String {
    format!(
        "[[jobs]]\nname = \"tick\"\nevery = \"1s\"\nrun_on = \"leader\"\ntimeout = \"5s\"\nhttp = {{ url = \"{}\" }}\n",
        recorder.url("/ok")
    )
}

/// The id of the host that says it leads, if exactly one does.
async fn leader_of(hosts: &[&Host]) -> Option<String> {
    let mut leaders = Vec::new();
    for h in hosts {
        let Ok(r) = h.http.get(h.url("/v1/role")).send().await else {
            continue;
        };
        let Ok(v) = r.json::<serde_json::Value>().await else {
            continue;
        };
        if v["term_remaining_seconds"].is_number() {
            leaders.push(v["host"].as_str().unwrap().to_string());
        }
    }
    (leaders.len() == 1).then(|| leaders.remove(0))
}

/// No scheduled time was called twice.
fn assert_no_double_runs(calls: &[Call]) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for c in calls {
        *seen.entry(c.scheduled_for.as_str()).or_default() += 1;
    }
    let doubles: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubles.is_empty(), "scheduled times run twice: {doubles:?}");
}

/// Fencing tokens never go back in the order the app received the calls.
fn assert_tokens_never_go_back(calls: &[Call]) {
    for w in calls.windows(2) {
        assert!(
            w[1].token >= w[0].token,
            "token went back: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_failover_and_clean_handover() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = leader_job(&recorder);
    let mut hosts = Vec::new();
    for id in ["a", "b", "c"] {
        hosts.push(Host::start_with_config(&db.url, id, root.path(), LEASE, &config).await);
    }
    // A brand-new cluster elects at once.
    let started = Instant::now();
    eventually("a leader", Duration::from_secs(10), || async {
        leader_of(&hosts.iter().collect::<Vec<_>>()).await.is_some()
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "election took {:?}",
        started.elapsed()
    );
    let first = leader_of(&hosts.iter().collect::<Vec<_>>()).await.unwrap();
    let role = hosts[0].get_json("/v1/role").await;
    assert_eq!(role["leader"], first.as_str());
    eventually("the leader job runs", Duration::from_secs(10), || async {
        recorder.calls_of("tick").len() >= 2
    })
    .await;
    assert!(recorder.calls_of("tick").iter().all(|c| c.host == first));

    // kill -9 the leader: the job runs on another host within lease + tick.
    let idx = hosts.iter().position(|h| h.id == first).unwrap();
    hosts[idx].kill();
    let killed = Instant::now();
    eventually("a run on another host", Duration::from_secs(15), || async {
        recorder
            .calls_of("tick")
            .iter()
            .any(|c| c.host != first && c.at > killed)
    })
    .await;
    let took = recorder
        .calls_of("tick")
        .iter()
        .find(|c| c.host != first && c.at > killed)
        .unwrap()
        .at
        - killed;
    // lease (2s) + one tick (1s), with slack for a loaded machine.
    assert!(
        took < Duration::from_millis(4500),
        "crash failover took {took:?}"
    );
    let live: Vec<&Host> = hosts.iter().filter(|h| h.id != first).collect();
    let second = leader_of(&live).await.expect("a new leader");

    // A clean stop hands over within a second.
    let idx = hosts.iter().position(|h| h.id == second).unwrap();
    let stopping = Instant::now();
    let mut leaving = hosts.remove(idx);
    let stop = tokio::spawn(async move {
        leaving.stop().await;
        leaving
    });
    let remaining: Vec<&Host> = hosts.iter().filter(|h| h.id != first).collect();
    let mut handed = None;
    while stopping.elapsed() < Duration::from_secs(5) {
        if let Some(l) = leader_of(&remaining).await {
            handed = Some((l, stopping.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (third, took) = handed.expect("a leader after a clean stop");
    assert_ne!(third, second);
    assert!(
        took < Duration::from_secs(1),
        "clean handover took {took:?}"
    );
    let leaving = stop.await.unwrap();
    assert!(leaving.log_contains("released the leader lease"));

    let calls = recorder.calls_of("tick");
    assert_no_double_runs(&calls);
    assert_tokens_never_go_back(&calls);
    // Each term has a larger token.
    let tokens: Vec<i64> = calls.iter().map(|c| c.token).collect();
    assert!(tokens.first() < tokens.last(), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_leader_runs_nothing_under_its_old_term() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = leader_job(&recorder);
    let a = Host::start_with_config(&db.url, "a", root.path(), LEASE, &config).await;
    let b = Host::start_with_config(&db.url, "b", root.path(), LEASE, &config).await;
    eventually("a leader", Duration::from_secs(10), || async {
        leader_of(&[&a, &b]).await.is_some()
    })
    .await;
    eventually("the leader job runs", Duration::from_secs(10), || async {
        recorder.calls_of("tick").len() >= 2
    })
    .await;
    let first = leader_of(&[&a, &b]).await.unwrap();
    let (frozen, other) = if first == "a" { (&a, &b) } else { (&b, &a) };
    let old_token = frozen.get_json("/v1/role").await["fencing_token"]
        .as_i64()
        .unwrap();

    frozen.pause();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = recorder.calls_of("tick");
    assert!(
        during
            .iter()
            .any(|c| c.host == other.id && c.token > old_token),
        "the other host took over with a larger token: {during:?}"
    );
    frozen.resume();
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let calls = recorder.calls_of("tick");
    let stale: Vec<_> = calls
        .iter()
        .filter(|c| c.at > resumed && c.token <= old_token)
        .collect();
    assert!(
        stale.is_empty(),
        "calls under the old term after resuming: {stale:?}"
    );
    assert_no_double_runs(&calls);
    assert_tokens_never_go_back(&calls);
    eventually(
        "the frozen host knows it lost",
        Duration::from_secs(5),
        || async {
            let r = frozen.get_json("/v1/role").await;
            r["term_remaining_seconds"].is_null() && r["leader"] == other.id.as_str()
        },
    )
    .await;
    let metrics = frozen.metric("tandem_leader").await;
    assert_eq!(metrics, Some(0.0));
    assert!(other.metric("tandem_leader").await == Some(1.0));
}
