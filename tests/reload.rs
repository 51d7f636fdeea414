//! `SIGHUP` reloads the jobs, the log level and the API token without
//! dropping connections; other changes are logged as needing a restart.

mod common;

use std::time::Duration;

use common::recorder::Recorder;
use common::{Host, TestDb, eventually, tempdir};

fn config(recorder: &Recorder, job: &str, token_file: &str, level: &str, commit: &str) -> String {
    format!(
        "[api]\ntoken_file = \"{token_file}\"\n\n[log]\nlevel = \"{level}\"\n\n[search]\ncommit_interval = \"{commit}\"\n\n\
         [[jobs]]\nname = \"{job}\"\nevery = \"1h\"\nrun_on = \"once\"\nhttp = {{ url = \"{}\" }}\n",
        recorder.url("/ok")
    )
}

async fn put_status(h: &Host, token: &str) -> u16 {
    h.http
        .put(h.url("/v1/cache/pages/k"))
        .bearer_auth(token)
        .body("v")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn job_names(h: &Host) -> Vec<String> {
    let v = h.get_json("/v1/jobs").await;
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .filter(|n| !n.starts_with("tandem."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_jobs_level_and_token_keeping_connections() {
    let db = TestDb::new().await;
    let root = tempdir();
    let recorder = Recorder::start().await;
    let token_file = root.path().join("token");
    std::fs::write(&token_file, "one\n").unwrap();
    let tf = token_file.display().to_string();
    let mut h = Host::start_with_config(
        &db.url,
        "a",
        root.path(),
        &[],
        &config(&recorder, "first", &tf, "info", "200ms"),
    )
    .await;
    // The level comes from the file, not from the harness's environment.
    h.env.retain(|(k, _)| k != "TANDEM_LOG_LEVEL");
    h.restart().await;
    h.wait_ready().await;
    assert_eq!(job_names(&h).await, vec!["first"]);
    assert_eq!(put_status(&h, "one").await, 200);
    assert_eq!(put_status(&h, "two").await, 401);
    assert!(!h.log_contains("reload: applied"));
    assert!(!h.log_contains(" DEBUG "), "the file's level applies");

    // A connection open across the reload: an event stream.
    let mut stream = h
        .http
        .get(h.url("/v1/events?cache=pages"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);

    std::fs::write(
        &h.config,
        config(&recorder, "second", &tf, "info,tandem=debug", "300ms"),
    )
    .unwrap();
    std::fs::write(&token_file, "two\n").unwrap();
    h.signal("HUP");
    eventually("the reload logged", Duration::from_secs(10), || async {
        h.log_contains("reload: applied")
    })
    .await;
    // The new level applies: the applier's batches are logged at debug.
    assert_eq!(put_status(&h, "two").await, 200);
    eventually("debug lines", Duration::from_secs(10), || async {
        h.log_contains(" DEBUG ")
    })
    .await;
    let log = h.log_text();
    assert!(log.contains("jobs"), "{log}");
    assert!(log.contains("take effect only after a restart"), "{log}");
    assert!(log.contains("\"search\""), "{log}");
    assert_eq!(job_names(&h).await, vec!["second"]);
    assert_eq!(put_status(&h, "one").await, 401);
    assert_eq!(put_status(&h, "two").await, 200);
    // The new job runs; the old one is gone.
    let run = h
        .http
        .post(h.url("/v1/jobs/second/run"))
        .bearer_auth("two")
        .send()
        .await
        .unwrap();
    assert!(run.status().is_success(), "{}", run.status());
    let gone = h
        .http
        .post(h.url("/v1/jobs/first/run"))
        .bearer_auth("two")
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    eventually("the reloaded job ran", Duration::from_secs(20), || async {
        !recorder.calls_of("second").is_empty()
    })
    .await;
    // The stream opened before the reload still delivers.
    let mut got = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !got.contains("event: change") && std::time::Instant::now() < deadline {
        if let Ok(Ok(Some(c))) = tokio::time::timeout(Duration::from_secs(1), stream.chunk()).await
        {
            got.push_str(&String::from_utf8_lossy(&c));
        }
    }
    assert!(got.contains("event: change"), "{got}");

    // A config that does not load changes nothing.
    std::fs::write(&h.config, "[sync]\nbogus = 1\n").unwrap();
    h.signal("HUP");
    eventually("the refusal logged", Duration::from_secs(10), || async {
        h.log_contains("reload: the config does not load")
    })
    .await;
    assert!(h.log_text().contains("sync.bogus"));
    assert_eq!(put_status(&h, "two").await, 200);
    assert_eq!(job_names(&h).await, vec!["second"]);
}

/// Log formats: JSON lines with `log.format = "json"`; plain lines without
/// timestamps under journald (`JOURNAL_STREAM`), which adds its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_formats() {
    let db = TestDb::new().await;
    let root = tempdir();
    let json = Host::start(
        &db.url,
        "json",
        root.path(),
        &[("TANDEM_LOG_FORMAT", "json")],
    )
    .await;
    json.wait_ready().await;
    let text = std::fs::read_to_string(json.dir.join("tandem.log")).unwrap();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 3, "{text}");
    assert!(text.contains("\"message\":\"starting tandem\""), "{text}");

    let journal = Host::start(
        &db.url,
        "journal",
        root.path(),
        &[("JOURNAL_STREAM", "8:12345")],
    )
    .await;
    journal.wait_ready().await;
    let text = std::fs::read_to_string(journal.dir.join("tandem.log")).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first
            .trim_start()
            .starts_with("INFO tandem::daemon: starting tandem"),
        "{first}"
    );
    assert!(!text.contains("\u{1b}["), "no colours under journald");
}
