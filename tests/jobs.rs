//! The scheduler across real tandem processes: exactly once per scheduled
//! time with hosts restarting, misfire policies, overlap refusal, timeouts,
//! retries, manual runs, and bad job configs refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::recorder::Recorder;
use common::{Host, TestDb, eventually, tempdir};
use serde_json::Value;

const LEASE: &[(&str, &str)] = &[("TANDEM_LEADER_LEASE", "2s")];

async fn runs(host: &Host, job: &str) -> Vec<Value> {
    host.get_json(&format!("/v1/jobs/{job}/runs?limit=1000"))
        .await["runs"]
        .as_array()
        .unwrap()
        .clone()
}

fn field<'a>(runs: &'a [Value], key: &str) -> Vec<&'a str> {
    runs.iter().map(|r| r[key].as_str().unwrap_or("")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_job_runs_exactly_once_per_scheduled_time_while_hosts_restart() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = format!(
        "[[jobs]]\nname = \"every-second\"\nevery = \"1s\"\nrun_on = \"once\"\nhttp = {{ url = \"{}\" }}\n",
        recorder.url("/ok")
    );
    let mut hosts = Vec::new();
    for id in ["a", "b", "c"] {
        hosts.push(Host::start_with_config(&db.url, id, root.path(), LEASE, &config).await);
    }
    let started = Instant::now();
    let mut turn = 0;
    // When each restart began and ended (unix seconds).
    let mut restarts = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // One host at a time restarts; the others keep claiming.
        let began = chrono::Utc::now().timestamp();
        hosts[turn % 3].restart().await;
        restarts.push((began, chrono::Utc::now().timestamp()));
        turn += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let calls = recorder.calls_of("every-second");
    let per_time = recorder.hosts_per_time("every-second");
    let doubles: Vec<_> = per_time.iter().filter(|(_, h)| h.len() > 1).collect();
    assert!(doubles.is_empty(), "run more than once: {doubles:?}");
    // No scheduled time between the first and the last was missed.
    let times: Vec<i64> = per_time
        .keys()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp())
        .collect();
    let (first, last) = (times[0], *times.last().unwrap());
    assert!(last - first >= 55, "ran from {first} to {last}");
    // A time is missed only as `misfire = "skip"` says: when the leader's
    // hand-over at a restart took longer than the 1 s grace (it does on a
    // CI machine running other tests). Never away from a restart, and
    // rarely.
    let missed: Vec<i64> = (first..=last).filter(|t| !times.contains(t)).collect();
    let away: Vec<&i64> = missed
        .iter()
        .filter(|t| !restarts.iter().any(|(b, e)| (b - 1..=e + 3).contains(*t)))
        .collect();
    assert!(
        away.is_empty() && missed.len() <= 3,
        "scheduled times never run: {missed:?} (away from any restart: {away:?}; restarts {restarts:?})"
    );
    // Several hosts took part, and the history agrees with the endpoint.
    let hosts_used: std::collections::HashSet<&String> = per_time.values().flatten().collect();
    assert!(hosts_used.len() >= 2, "{hosts_used:?}");
    // The job keeps running while this reads: compare the times before the
    // last one the recorder had seen (whose run may still be finishing).
    let history = runs(&hosts[0], "every-second").await;
    let mut succeeded: Vec<i64> = history
        .iter()
        .filter(|r| r["state"] == "succeeded")
        .map(|r| {
            chrono::DateTime::parse_from_rfc3339(r["scheduled_for"].as_str().unwrap())
                .unwrap()
                .timestamp()
        })
        .filter(|t| *t < last)
        .collect();
    succeeded.sort_unstable();
    assert_eq!(
        succeeded,
        times[..times.len() - 1],
        "history against calls ({} calls)",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misfire_policies_after_downtime() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    // The period is long against the restart, so that the restarted host's
    // first look at the schedule falls between two scheduled times (a
    // missed time is then older than the grace and no on-time run covers
    // it), however long its start takes on a busy machine (up to ~6 s).
    let period_ms = 8_000i64;
    let config = format!(
        "[[jobs]]\nname = \"catch-up\"\nevery = \"{period_ms}ms\"\nmisfire = \"run-once\"\nhttp = {{ url = \"{ok}\" }}\n\n\
         [[jobs]]\nname = \"forget\"\nevery = \"{period_ms}ms\"\nmisfire = \"skip\"\nhttp = {{ url = \"{ok}\" }}\n\n\
         [[jobs]]\nname = \"late-ok\"\nevery = \"{period_ms}ms\"\nmisfire = \"skip\"\nmisfire_grace = \"60s\"\nhttp = {{ url = \"{ok}\" }}\n",
        ok = recorder.url("/ok")
    );
    let mut host = Host::start_with_config(&db.url, "a", root.path(), LEASE, &config).await;
    eventually("the jobs ran", Duration::from_secs(20), || async {
        !recorder.calls_of("catch-up").is_empty()
            && !recorder.calls_of("forget").is_empty()
            && !recorder.calls_of("late-ok").is_empty()
    })
    .await;
    host.stop().await;
    // Down over the next scheduled time, back 1.2 s after it (the database
    // runs on this machine's clock).
    let now_ms = chrono::Utc::now().timestamp_millis();
    let missed_ms = (now_ms.div_euclid(period_ms) + 1) * period_ms;
    let back = missed_ms + 1_200;
    tokio::time::sleep(Duration::from_millis((back - now_ms) as u64)).await;
    host.spawn().await;
    // Generous: the restarted host must start, win the lease and run the
    // jobs, on a CI machine that runs the other job tests meanwhile.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let forget = runs(&host, "forget").await;
        let catch_up = runs(&host, "catch-up").await;
        let caught_up = catch_up
            .iter()
            .any(|r| r["trigger"] == "misfire" && r["state"] == "succeeded");
        let late_ran = runs(&host, "late-ok")
            .await
            .iter()
            .any(|r| scheduled_ms(r) == missed_ms && r["state"] == "succeeded");
        if forget.len() >= 2 && caught_up && late_ran {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no runs after the restart:\nforget: {forget:?}\ncatch-up: {catch_up:?}\n--- log ---\n{}",
            host.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let catch_up = runs(&host, "catch-up").await;
    let misfires = field(&catch_up, "trigger")
        .iter()
        .filter(|t| **t == "misfire")
        .count();
    assert_eq!(
        misfires, 1,
        "run-once runs the missed times once: {catch_up:?}"
    );
    let forget = runs(&host, "forget").await;
    assert!(
        !field(&forget, "trigger").contains(&"misfire"),
        "skip never runs a missed time: {forget:?}"
    );
    assert!(
        !forget.iter().any(|r| scheduled_ms(r) == missed_ms),
        "with the default 1 s grace, the time missed while down is skipped: {forget:?}"
    );
    // Within its 60 s grace, the time missed while down ran late, on time.
    let late = runs(&host, "late-ok").await;
    let missed: Vec<&Value> = late
        .iter()
        .filter(|r| scheduled_ms(r) == missed_ms)
        .collect();
    assert_eq!(missed.len(), 1, "{late:?}");
    assert_eq!(missed[0]["trigger"], "schedule", "{late:?}");
}

/// A run's scheduled time, in milliseconds since the epoch.
fn scheduled_ms(run: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(run["scheduled_for"].as_str().unwrap_or(""))
        .map_or(0, |t| t.timestamp_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_timeouts_and_retries() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let never = "cron = \"0 0 1 1 *\"";
    let config = format!(
        "[[jobs]]\nname = \"long\"\nevery = \"1s\"\nrun_on = \"once\"\nhttp = {{ url = \"{hold}\" }}\n\n\
         [[jobs]]\nname = \"slow-http\"\n{never}\ntimeout = \"500ms\"\nhttp = {{ url = \"{slow}\" }}\n\n\
         [[jobs]]\nname = \"slow-command\"\n{never}\ntimeout = \"500ms\"\ncommand = {{ argv = [\"sh\", \"-c\", \"echo started; sleep 30\"] }}\n\n\
         [[jobs]]\nname = \"flaky\"\n{never}\nretries = 3\nretry_backoff = \"100ms\"\nhttp = {{ url = \"{flaky}\" }}\n\n\
         [[jobs]]\nname = \"broken\"\n{never}\nretries = 1\nretry_backoff = \"100ms\"\ncommand = {{ argv = [\"sh\", \"-c\", \"echo bad input >&2; exit 4\"] }}\n\n\
         [[jobs]]\nname = \"nul\"\n{never}\ncommand = {{ argv = [\"printf\", \"a\\\\0b\"] }}\n",
        hold = recorder.url("/hold/2500"),
        slow = recorder.url("/slow"),
        flaky = recorder.url("/flaky/2"),
    );
    let a = Host::start_with_config(&db.url, "a", root.path(), LEASE, &config).await;
    let b = Host::start_with_config(&db.url, "b", root.path(), LEASE, &config).await;
    eventually("a leader", Duration::from_secs(10), || async {
        a.get_json("/v1/role").await["leader"].is_string()
    })
    .await;
    for job in ["slow-http", "slow-command", "flaky", "broken", "nul"] {
        let r = a
            .http
            .post(a.url(&format!("/v1/jobs/{job}/run")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{job}");
    }
    let unknown = a
        .http
        .post(a.url("/v1/jobs/nope/run"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let v: Value = unknown.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");

    eventually("the manual runs end", Duration::from_secs(20), || async {
        let mut done = true;
        for job in ["slow-http", "slow-command"] {
            done &= runs(&a, job)
                .await
                .iter()
                .any(|r| r["state"] == "timed_out");
        }
        done &= runs(&a, "flaky")
            .await
            .iter()
            .any(|r| r["state"] == "succeeded");
        done &= runs(&a, "nul")
            .await
            .iter()
            .any(|r| r["state"] == "succeeded");
        done &= runs(&a, "broken").await.len() == 2
            && runs(&a, "broken")
                .await
                .iter()
                .all(|r| r["state"] == "failed");
        done
    })
    .await;
    let cmd = runs(&a, "slow-command").await;
    assert!(
        cmd[0]["output"].as_str().unwrap().contains("started"),
        "{cmd:?}"
    );
    // Retries: two failures then success, one scheduled time, attempts 0..2.
    let flaky = runs(&a, "flaky").await;
    let mut states = field(&flaky, "state");
    states.reverse();
    assert_eq!(states, ["failed", "failed", "succeeded"], "{flaky:?}");
    let attempts: Vec<i64> = flaky
        .iter()
        .rev()
        .map(|r| r["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, [0, 1, 2]);
    assert!(
        flaky
            .iter()
            .all(|r| r["scheduled_for"] == flaky[0]["scheduled_for"])
    );
    assert_eq!(flaky[1]["http_status"], 500);
    let broken = runs(&a, "broken").await;
    assert_eq!(broken[0]["exit_status"], 4);
    assert!(broken[0]["output"].as_str().unwrap().contains("bad input"));
    // Output PostgreSQL text cannot hold (a NUL) is recorded, not lost.
    assert_eq!(runs(&a, "nul").await[0]["output"], "a\u{FFFD}b");

    // Overlap refused: a 2.5 s run every second never runs twice at once.
    eventually("overlap refusals", Duration::from_secs(15), || async {
        runs(&a, "long")
            .await
            .iter()
            .filter(|r| r["state"] == "skipped")
            .count()
            >= 2
    })
    .await;
    let long = recorder.calls_of("long");
    for w in long.windows(2) {
        assert!(
            w[1].at.duration_since(w[0].at) >= Duration::from_millis(2400),
            "two runs of `long` overlapped"
        );
    }
    let skipped = runs(&b, "long").await;
    let note = skipped.iter().find(|r| r["state"] == "skipped").unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(note.contains("still running"), "{note}");

    // The jobs list shows schedules, last outcomes and where a run runs.
    let jobs = a.get_json("/v1/jobs").await;
    let by_name = |n: &str| {
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("flaky")["last_run"]["state"], "succeeded");
    assert_eq!(by_name("long")["run_on"], "once");
    assert!(by_name("tandem.prune-log")["next_run"].is_string());
    // Metrics count outcomes by job.
    let m = a.metrics_text().await.unwrap() + &b.metrics_text().await.unwrap();
    assert!(
        m.contains("tandem_job_runs_total{job=\"flaky\",outcome=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(m.contains("tandem_scheduler_last_tick_timestamp_seconds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_host_jobs_run_on_every_host() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = format!(
        "[[jobs]]\nname = \"local\"\nevery = \"1s\"\nrun_on = \"every-host\"\nhttp = {{ url = \"{}\" }}\n",
        recorder.url("/ok")
    );
    let _a = Host::start_with_config(&db.url, "a", root.path(), LEASE, &config).await;
    let _b = Host::start_with_config(&db.url, "b", root.path(), LEASE, &config).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let per_time = recorder.hosts_per_time("local");
    let both = per_time.values().filter(|h| h.len() == 2).count();
    assert!(both >= 2, "{per_time:?}");
    assert!(
        per_time
            .values()
            .all(|h| h.len() <= 2 && (h.len() < 2 || h[0] != h[1]))
    );
}

#[test]
fn bad_job_config_is_refused_naming_the_job_and_key() {
    let dir = tempdir();
    let cases = [
        (
            "cron = \"61 * * * *\"\ncommand = { argv = [\"true\"] }",
            "jobs[bad].cron",
        ),
        (
            "every = \"1m\"\nrun_on = \"sometimes\"\ncommand = { argv = [\"true\"] }",
            "jobs[bad].run_on",
        ),
        (
            "every = \"1m\"\nhttp = { method = \"POST\" }",
            "jobs[bad].http.url",
        ),
    ];
    for (body, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            format!("data_dir = \"/tmp/x\"\n[[jobs]]\nname = \"bad\"\n{body}\n"),
        )
        .unwrap();
        for cmd in ["check-config", "run"] {
            let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
                .args([cmd, "--config", path.to_str().unwrap()])
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd} accepted {body}");
            assert!(stderr.contains(key), "{cmd}: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_run_is_abandoned_and_retried_elsewhere() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = format!(
        "[[jobs]]\nname = \"long\"\ncron = \"0 0 1 1 *\"\nrun_on = \"once\"\nretries = 1\nretry_backoff = \"100ms\"\ntimeout = \"1m\"\nhttp = {{ url = \"{}\" }}\n\n\
         [[jobs]]\nname = \"tandem.mark-stale-hosts\"\nevery = \"1s\"\n",
        recorder.url("/hold/20000")
    );
    let mut hosts = Vec::new();
    for id in ["a", "b"] {
        hosts.push(Host::start_with_config(&db.url, id, root.path(), LEASE, &config).await);
    }
    eventually("a leader", Duration::from_secs(10), || async {
        hosts[0].get_json("/v1/role").await["leader"].is_string()
    })
    .await;
    // `tandem jobs run` and `tandem jobs`, through the local daemon.
    let cli = |args: &[&str]| hosts[0].cli(args);
    let out = cli(&["jobs", "run", "long"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("queued run"));
    eventually("the run starts", Duration::from_secs(10), || async {
        !recorder.calls_of("long").is_empty()
    })
    .await;
    let out = cli(&["jobs"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("long") && table.contains("running"),
        "{table}"
    );

    let first = recorder.calls_of("long")[0].clone();
    assert_eq!(first.attempt, 0);
    let idx = hosts.iter().position(|h| h.id == first.host).unwrap();
    hosts[idx].kill();
    let survivor = &hosts[1 - idx];
    eventually(
        "the retry runs on the other host",
        Duration::from_secs(20),
        || async {
            recorder
                .calls_of("long")
                .iter()
                .any(|c| c.attempt == 1 && c.host == survivor.id)
        },
    )
    .await;
    let history = runs(survivor, "long").await;
    let states: Vec<(&str, i64)> = history
        .iter()
        .map(|r| (r["state"].as_str().unwrap(), r["attempt"].as_i64().unwrap()))
        .collect();
    assert!(states.contains(&("abandoned", 0)), "{states:?}");
    assert!(states.contains(&("running", 1)), "{states:?}");
    assert_eq!(
        survivor
            .metric("tandem_job_runs_total{job=\"long\",outcome=\"abandoned\"}")
            .await,
        Some(1.0)
    );
}

/// A host that restarts while one of its runs is under way (quicker than
/// `tandem.mark-stale-hosts` would notice it was gone) marks that run
/// abandoned itself when it starts again, and retries it: the job is not
/// left "running" for ever, refusing every later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_by_a_quick_restart_is_abandoned_and_retried() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let config = format!(
        "[[jobs]]\nname = \"long\"\ncron = \"0 0 1 1 *\"\nrun_on = \"once\"\nretries = 1\nretry_backoff = \"100ms\"\ntimeout = \"1m\"\nhttp = {{ url = \"{}\" }}\n\n\
         [[jobs]]\nname = \"tandem.mark-stale-hosts\"\nevery = \"1h\"\n",
        recorder.url("/hold/3000")
    );
    let mut a = Host::start_with_config(&db.url, "a", root.path(), LEASE, &config).await;
    eventually("a leader", Duration::from_secs(10), || async {
        a.get_json("/v1/role").await["leader"].is_string()
    })
    .await;
    let out = a.cli(&["jobs", "run", "long"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the run starts", Duration::from_secs(10), || async {
        !recorder.calls_of("long").is_empty()
    })
    .await;
    a.kill();
    a.spawn().await;
    eventually("the retry runs", Duration::from_secs(20), || async {
        recorder.calls_of("long").iter().any(|c| c.attempt == 1)
    })
    .await;
    let history = runs(&a, "long").await;
    let states: Vec<(&str, i64)> = history
        .iter()
        .map(|r| (r["state"].as_str().unwrap(), r["attempt"].as_i64().unwrap()))
        .collect();
    assert!(states.contains(&("abandoned", 0)), "{states:?}");
    assert!(a.log_contains("this host restarted while it ran"));
}
