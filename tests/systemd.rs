//! The systemd unit: `systemd-analyze verify` accepts it and its hardening
//! keeps the offline exposure score at 2.0 or lower.

mod common;

use std::process::Command;

fn unit_with_built_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tandem.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let path = dir.join("tandem.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/tandem", env!("CARGO_BIN_EXE_tandem")),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_built_binary(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed");
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tandem.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

/// `Type=notify` without systemd: a datagram socket stands in for
/// `NOTIFY_SOCKET`; tandem must say READY=1 once caught up, ping the
/// watchdog, and say STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_watchdog_and_stopping() {
    let db = common::TestDb::new().await;
    let root = common::tempdir();
    let sock_path = root.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let path = sock_path.display().to_string();
    let mut h = common::Host::start(
        &db.url,
        "notified",
        root.path(),
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1000000")],
    )
    .await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification within 20s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // READY=1 only once the host is ready.
    let r = h.http.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        seen.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{seen:?}"
    );
    h.stop().await;
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}
