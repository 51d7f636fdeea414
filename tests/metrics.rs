//! `/metrics`: accepted by `promtool check metrics`, every series named
//! `tandem_*` (or the standard `process_*`), and every metric documented.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Host, TestDb, tempdir};

fn promtool() -> String {
    for candidate in ["promtool", "/usr/bin/promtool"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate.to_string();
        }
    }
    panic!("promtool is missing: run scripts/install-test-deps.sh (Debian package prometheus)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_the_docs_list_them() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = Host::start(&db.url, "a", root.path(), &[]).await;
    a.wait_ready().await;
    a.put("c", "k", b"v", "?wait=local").await;
    let _ = a.http.get(a.url("/nope")).send().await;
    let text = a.metrics_text().await.unwrap();

    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.dedup();
    assert!(names.len() > 20);
    for name in names {
        assert!(
            name.starts_with("tandem_") || name.starts_with("process_"),
            "{name}"
        );
        if name.starts_with("tandem_") {
            assert!(docs.contains(name), "docs/metrics.md misses {name}");
        }
    }
    for series in [
        "tandem_sync_applied_ops_total{op=\"put\"}",
        "tandem_ready",
        "tandem_db_up",
        "tandem_cache_entries",
        "tandem_sync_lag_seconds",
        "tandem_db_oldest_transaction_age_seconds",
        "tandem_http_requests_total{route=\"/v1/cache/{cache}/{*key}\",status=\"2xx\"}",
        "tandem_http_requests_total{route=\"unmatched\",status=\"4xx\"}",
    ] {
        assert!(a.metric(series).await.is_some(), "missing {series}");
    }
    assert_eq!(a.metric("tandem_cache_entries").await, Some(1.0));
    assert_eq!(a.metric("tandem_ready").await, Some(1.0));
}
