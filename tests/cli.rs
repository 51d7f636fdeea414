//! The operator commands: check-config, migrate, status; and the shipped
//! config and docs staying in step with the code.

mod common;

use std::process::{Command, Output};

use common::{Host, TestDb, tempdir};

fn tandem(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TANDEM_DATA_DIR", "/tmp/tandem-cli-test")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_names_the_bad_key_and_why() {
    let dir = tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[sync]\npoll_interval = \"soon\"\n").unwrap();
    let out = tandem(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("`sync.poll_interval`") && err.contains("soon"),
        "{err}"
    );

    std::fs::write(&bad, "[api]\nlisten_on = \"127.0.0.1:1\"\n").unwrap();
    let out = tandem(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`api.listen_on`: unknown key; did you mean `api.listen`?"));

    let out = tandem(
        &["check-config", "--config", "/dev/null"],
        &[("TANDEM_CLUSTER_STALE_AFTER", "many")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`cluster.stale_after`"));

    // The shipped config is valid and changes nothing.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/tandem.toml");
    let out = tandem(
        &["check-config", "--config", shipped],
        &[("TANDEM_HOST_ID", "web1")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let described = text(&out.stdout);
    assert!(
        described.contains("config OK") && described.contains("web1"),
        "{described}"
    );
    assert!(described.contains("embedded PostgreSQL"), "{described}");
}

#[test]
fn shipped_config_and_docs_name_every_key() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = std::fs::read_to_string(format!("{root}/packaging/tandem.toml")).unwrap();
    let table: toml::Table = shipped.parse().unwrap();
    assert!(
        table
            .values()
            .all(|v| v.as_table().is_some_and(|t| t.is_empty())),
        "the shipped config must only hold commented-out defaults"
    );
    let docs = std::fs::read_to_string(format!("{root}/docs/config.md")).unwrap();
    for key in tandem::config::keys::KEYS {
        let path = key.path();
        assert!(
            docs.contains(&format!("`{path}`")),
            "docs/config.md misses `{path}`"
        );
        assert!(
            docs.contains(&key.env_var()),
            "docs/config.md misses {}",
            key.env_var()
        );
        assert!(
            shipped.contains(&format!("# {} =", key.name)),
            "packaging/tandem.toml misses {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_status() {
    let db = TestDb::new().await;
    let env = [("TANDEM_DATABASE_URL", db.url.as_str())];
    let out = tandem(&["migrate", "--config", "/dev/null"], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!(
            "migrated from version 0 to {}",
            tandem::db::migrate::latest()
        )),
        "{}",
        text(&out.stdout)
    );
    let out = tandem(&["migrate", "--config", "/dev/null"], &env);
    assert!(
        text(&out.stdout).contains("up to date"),
        "{}",
        text(&out.stdout)
    );

    let root = tempdir();
    let a = Host::start(&db.url, "web-a", root.path(), &[]).await;
    let b = Host::start(&db.url, "web-b", root.path(), &[]).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let addr = a.addr.to_string();
    let env = [("TANDEM_API_LISTEN", addr.as_str())];
    common::eventually(
        "both hosts registered",
        std::time::Duration::from_secs(10),
        || async {
            let out = tandem(&["status", "--config", "/dev/null"], &env);
            let table = text(&out.stdout);
            table.contains("web-a *")
                && table.contains("web-b")
                && table.matches("live").count() == 2
        },
    )
    .await;
    let out = tandem(&["status", "--config", "/dev/null"], &env);
    let table = text(&out.stdout);
    let header = table.lines().next().unwrap();
    for col in [
        "HOST",
        "STATE",
        "ROLE",
        "READY",
        "HEARTBEAT",
        "APPLIED",
        "LAG",
        "VERSION",
    ] {
        assert!(header.contains(col), "{header}");
    }
    common::eventually(
        "both hosts ready in the registry",
        std::time::Duration::from_secs(10),
        || async {
            let out = tandem(&["status", "--json", "--config", "/dev/null"], &env);
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            doc["summary"]["hosts_not_ready"] == serde_json::json!([])
        },
    )
    .await;
    let out = tandem(&["status", "--json", "--config", "/dev/null"], &env);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["cluster"]["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(doc["this_host"]["host"], "web-a");
    // The operator's summary: leader and token, jobs, uploads backlog.
    let sm = &doc["summary"];
    assert!(
        sm["leader"].as_str().is_some_and(|l| l.starts_with("web-")),
        "{sm}"
    );
    assert!(sm["fencing_token"].as_i64().unwrap() >= 1, "{sm}");
    assert_eq!(sm["hosts"], 2);
    assert_eq!(sm["hosts_not_ready"].as_array().unwrap().len(), 0);
    assert!(sm["jobs"]["configured"].as_u64().unwrap() >= 3, "{sm}");
    assert!(
        sm["jobs"]["next"].as_str().unwrap().starts_with("tandem."),
        "{sm}"
    );
    assert_eq!(sm["uploads"]["stored"], 0);
    assert_eq!(sm["uploads"]["watch_pending"], 0);
    assert!(doc["jobs"].as_array().unwrap().len() >= 3);
    let table = text(&tandem(&["status", "--config", "/dev/null"], &env).stdout);
    assert!(table.contains("leader: web-"), "{table}");
    assert!(table.contains("jobs: "), "{table}");
    assert!(table.contains("failing: none"), "{table}");
    assert!(table.contains("uploads: 0 stored"), "{table}");

    // Without a daemon the command says so.
    let out = tandem(
        &["status", "--config", "/dev/null"],
        &[("TANDEM_API_LISTEN", "127.0.0.1:1")],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("is tandem running?"));
}
