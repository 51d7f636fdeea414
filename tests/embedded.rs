//! The embedded default: `tandem run` with no database URL starts a private
//! PostgreSQL from the machine's binaries (as an unprivileged user when run
//! as root), on a unix socket only, stops it on shutdown and reuses it on the
//! next start; without binaries it says which package to install.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Host, tempdir};

/// Line 6 of postmaster.pid is the first listen address; empty means no TCP.
fn postmaster(data: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    Some(text.lines().map(str::to_string).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_its_own_postgres_and_reuses_it() {
    let root = tempdir();
    let mut h = Host::start("", "solo", root.path(), &[]).await;
    h.wait_ready().await;
    let token = h.put("pages", "home", b"embedded", "?wait=local").await;
    assert!(!token.is_empty());
    assert_eq!(
        h.get("pages", "home").await.as_deref(),
        Some(&b"embedded"[..])
    );
    let status = h.get_json("/v1/status").await;
    assert_eq!(status["database"]["embedded"], true);
    let cluster = h.get_json("/v1/cluster").await;
    assert_eq!(cluster["hosts"][0]["role"], "single");

    let pg = h.dir.join("postgres");
    let data = pg.join("data");
    assert!(data.join("PG_VERSION").is_file());
    let pid_file = postmaster(&data).expect("postgres is running");
    assert_eq!(
        pid_file.get(5).map(String::as_str),
        Some(""),
        "listens on TCP: {pid_file:?}"
    );
    if rustix::process::geteuid().is_root() {
        let meta = std::fs::metadata(&data).unwrap();
        assert_ne!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            0,
            "postgres must not run as root"
        );
    }

    // A clean stop stops PostgreSQL too.
    assert!(h.stop().await.success());
    assert!(
        postmaster(&data).is_none(),
        "postgres still running after tandem stopped"
    );

    // The next start reuses the same cluster and data.
    h.spawn().await;
    h.wait_ready().await;
    assert_eq!(
        h.get("pages", "home").await.as_deref(),
        Some(&b"embedded"[..])
    );
    let log = std::fs::read_to_string(h.dir.join("tandem.log")).unwrap();
    assert_eq!(
        log.matches("initialising the embedded PostgreSQL").count(),
        1
    );

    // After a crash of tandem, its PostgreSQL is found running and reused.
    h.kill();
    assert!(postmaster(&data).is_some());
    h.spawn().await;
    h.wait_ready().await;
    assert!(h.log_contains("reusing the embedded PostgreSQL already running"));
    h.put("pages", "after-crash", b"still fine", "?wait=local")
        .await;
    assert!(h.stop().await.success());
    assert!(postmaster(&data).is_none());
}

#[test]
fn without_server_binaries_it_names_the_package() {
    let root = tempdir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", "--config", "/dev/null"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env(
            "TANDEM_DATA_DIR",
            root.path().join("d").display().to_string(),
        )
        .env("TANDEM_API_LISTEN", "127.0.0.1:0")
        .env("TANDEM_DATABASE_EMBEDDED_BIN_DIR", "/nonexistent/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install postgresql"), "{stderr}");
    assert!(stderr.contains("database.url"), "{stderr}");
    let _ = Duration::ZERO;
}
