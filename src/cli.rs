//! The operator commands besides `run`: `check-config`, `migrate`,
//! `status` and `resync`. `status` and `resync` talk to the local daemon's
//! API (over its TCP address or unix socket) with a tiny HTTP/1.0 client.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::db::{self, embedded::Embedded, migrate};

/// Prints what the config resolves to.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let source = config
        .source
        .as_ref()
        .map_or("built-in defaults".to_string(), |p| p.display().to_string());
    let _ = writeln!(out, "config OK ({source})");
    let _ = writeln!(out, "  host.id            {}", config.host_id);
    let _ = writeln!(out, "  data_dir           {}", config.data_dir.display());
    let _ = writeln!(out, "  cache_dir          {}", config.cache_dir.display());
    let db = if config.database.url.is_some() {
        "database.url (set)".to_string()
    } else {
        format!(
            "embedded PostgreSQL under {}",
            config.data_dir.join("postgres").display()
        )
    };
    let _ = writeln!(
        out,
        "  database           {db}, schema {}",
        config.database.schema
    );
    let api = config
        .api
        .listen
        .map_or("(off)".to_string(), |a| a.to_string());
    let _ = writeln!(out, "  api.listen         {api}");
    if let Some(sock) = &config.api.unix_socket {
        let _ = writeln!(out, "  api.unix_socket    {}", sock.display());
    }
    let _ = writeln!(
        out,
        "  api.token          {}",
        if config.api.token.is_some() {
            "required for writes"
        } else {
            "none"
        }
    );
    out
}

/// `tandem migrate`: applies the schema migrations and exits.
pub async fn migrate(config: &Config) -> anyhow::Result<String> {
    let embedded = match &config.database.url {
        Some(_) => None,
        None => Some(Embedded::start(&config.data_dir.join("postgres"), &config.database).await?),
    };
    let pg = db::pg_config(&config.database, embedded.as_ref().map(Embedded::pg_config));
    let result = async {
        let (mut client, _notes) = db::connect(&pg, config.database.connect_timeout).await?;
        Ok::<_, anyhow::Error>(migrate::run(&mut client, &config.database.schema).await?)
    }
    .await;
    if let Some(e) = embedded
        && e.started_here()
    {
        e.stop().await;
    }
    let outcome = result?;
    Ok(if outcome.from == outcome.to {
        format!(
            "schema {} is up to date (version {})",
            config.database.schema, outcome.to
        )
    } else {
        format!(
            "schema {} migrated from version {} to {}",
            config.database.schema, outcome.from, outcome.to
        )
    })
}

/// A response from the local daemon.
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// Sends one request to the local daemon's API.
pub async fn request(config: &Config, method: &str, path: &str) -> anyhow::Result<Reply> {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n");
    if let Some(token) = &config.api.token {
        let _ = write!(req, "Authorization: Bearer {}\r\n", token.expose());
    }
    req.push_str("\r\n");
    let io = async {
        let mut raw = Vec::new();
        if let Some(sock) = &config.api.unix_socket {
            let mut s = tokio::net::UnixStream::connect(sock)
                .await
                .with_context(|| {
                    format!("connecting to {} (is tandem running?)", sock.display())
                })?;
            s.write_all(req.as_bytes()).await?;
            s.read_to_end(&mut raw).await?;
        } else if let Some(addr) = config.api.listen {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr} (is tandem running?)"))?;
            s.write_all(req.as_bytes()).await?;
            s.read_to_end(&mut raw).await?;
        } else {
            bail!("neither api.listen nor api.unix_socket is configured");
        }
        Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .context("the daemon did not answer within 30s")??;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> anyhow::Result<Reply> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP response")?;
    let head = std::str::from_utf8(&raw[..split]).context("malformed HTTP response head")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    let body = serde_json::from_slice(&raw[split + 4..]).unwrap_or(Value::Null);
    Ok(Reply { status, body })
}

fn error_text(reply: &Reply) -> String {
    reply.body["error"]["message"]
        .as_str()
        .map_or_else(|| format!("HTTP {}", reply.status), str::to_string)
}

/// `tandem status`: a table of every host (or JSON).
pub async fn status(config: &Config, json: bool) -> anyhow::Result<String> {
    let me = request(config, "GET", "/v1/status").await?;
    let cluster = request(config, "GET", "/v1/cluster").await?;
    let role = request(config, "GET", "/v1/role").await.ok();
    let jobs = request(config, "GET", "/v1/jobs").await.ok();
    let ok = |r: &Option<Reply>| {
        r.as_ref()
            .filter(|r| r.status == 200)
            .map(|r| r.body.clone())
            .unwrap_or(Value::Null)
    };
    let (role, jobs) = (ok(&role), ok(&jobs));
    if json {
        let doc = serde_json::json!({
            "this_host": me.body,
            "cluster": if cluster.status == 200 { cluster.body.clone() } else { Value::Null },
            "role": role,
            "jobs": jobs["jobs"],
            "summary": summary(&me.body, &cluster.body, &role, &jobs),
        });
        return Ok(serde_json::to_string_pretty(&doc)?);
    }
    let mut out = String::new();
    if cluster.status != 200 {
        let _ = writeln!(
            out,
            "cluster view unavailable: {} (showing this host only)",
            error_text(&cluster)
        );
        let b = &me.body;
        let _ = writeln!(
            out,
            "{}: ready={} applied={} lag={:.1}s db_connected={}",
            b["host"].as_str().unwrap_or("?"),
            b["ready"],
            b["sync"]["applied"].as_str().unwrap_or("-"),
            b["sync"]["lag_seconds"].as_f64().unwrap_or(0.0),
            b["database"]["connected"]
        );
        return Ok(out);
    }
    let mut out = format_hosts(&cluster.body);
    if !role.is_null() {
        let r = &role;
        let _ = writeln!(
            out,
            "\nleader: {} (fencing token {}); this host: {}{}",
            r["leader"].as_str().unwrap_or("none"),
            r["fencing_token"],
            r["role"].as_str().unwrap_or("?"),
            if r["eligible"] == false {
                ", never leader (leader.eligible = false)"
            } else {
                ""
            }
        );
    }
    let sm = summary(&me.body, &cluster.body, &role, &jobs);
    let list = |v: &Value| {
        let names: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    let _ = writeln!(
        out,
        "jobs: {} configured; next: {}; failing: {}",
        sm["jobs"]["configured"],
        sm["jobs"]["next"].as_str().unwrap_or("none"),
        list(&sm["jobs"]["failing"]),
    );
    let u = &sm["uploads"];
    let _ = writeln!(
        out,
        "uploads: {} stored, {} in progress, {} to clean up; this host: {} watched files waiting, {} local copies ({} bytes)",
        u["stored"],
        u["in_progress"],
        u["to_clean"],
        u["watch_pending"],
        u["local_files"],
        u["local_bytes"],
    );
    Ok(out)
}

/// The operator's summary: the leader, jobs due and failing, the uploads
/// backlog, hosts not ready or lagging.
fn summary(me: &Value, cluster: &Value, role: &Value, jobs: &Value) -> Value {
    let all = jobs["jobs"].as_array().cloned().unwrap_or_default();
    let failing: Vec<&str> = all
        .iter()
        .filter(|j| {
            matches!(
                j["last_run"]["state"].as_str(),
                Some("failed" | "timed_out" | "abandoned")
            )
        })
        .filter_map(|j| j["name"].as_str())
        .collect();
    let next = all
        .iter()
        .filter(|j| j["enabled"] != false)
        .filter_map(|j| Some((j["next_run"].as_str()?, j["name"].as_str()?)))
        .min()
        .map(|(at, name)| format!("{name} at {at}"));
    let hosts = cluster["hosts"].as_array().cloned().unwrap_or_default();
    let not_ready: Vec<&str> = hosts
        .iter()
        .filter(|h| h["state"] != "stopped" && h["ready"] != true)
        .filter_map(|h| h["id"].as_str())
        .collect();
    let u = &cluster["uploads"];
    let mine = &me["uploads"];
    serde_json::json!({
        "leader": role["leader"],
        "fencing_token": role["fencing_token"],
        "hosts": hosts.len(),
        "hosts_not_ready": not_ready,
        "jobs": {"configured": all.len(), "next": next, "failing": failing},
        "uploads": {
            "stored": u["stored"], "in_progress": u["in_progress"], "to_clean": u["to_clean"],
            "watch_pending": mine["watch_pending"], "local_files": mine["local_files"],
            "local_bytes": mine["local_bytes"],
        },
    })
}

/// `tandem jobs`: every job with its schedule, next and last run.
pub async fn jobs(config: &Config, json: bool) -> anyhow::Result<String> {
    let reply = request(config, "GET", "/v1/jobs").await?;
    if reply.status != 200 {
        bail!("cannot list the jobs: {}", error_text(&reply));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&reply.body)?);
    }
    let mut rows = vec![
        [
            "JOB", "SCHEDULE", "RUN ON", "NEXT RUN", "LAST RUN", "OUTCOME", "HOST",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    for j in reply.body["jobs"].as_array().into_iter().flatten() {
        let last = &j["last_run"];
        let enabled = j["enabled"] != false;
        rows.push(vec![
            s(&j["name"]),
            if enabled {
                s(&j["schedule"])
            } else {
                "disabled".into()
            },
            s(&j["run_on"]),
            s(&j["next_run"]),
            s(&last["scheduled_for"]),
            s(&last["state"]),
            s(&last["host"]),
        ]);
    }
    Ok(table(rows))
}

/// `tandem jobs run NAME`: queues a run now, once cluster-wide.
pub async fn run_job(config: &Config, name: &str) -> anyhow::Result<String> {
    if !crate::config::jobs::valid_job_name(name) {
        bail!("{name:?} is not a job name");
    }
    let reply = request(config, "POST", &format!("/v1/jobs/{name}/run")).await?;
    if reply.status != 202 {
        bail!("run refused: {}", error_text(&reply));
    }
    Ok(format!(
        "queued run {} of {name}; `tandem jobs` shows its outcome",
        reply.body["run_id"]
    ))
}

/// `tandem search`: this host's indexes.
pub async fn search_indexes(config: &Config, json: bool) -> anyhow::Result<String> {
    let reply = request(config, "GET", "/v1/search").await?;
    if reply.status != 200 {
        bail!("cannot list the search indexes: {}", error_text(&reply));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&reply.body)?);
    }
    let mut rows = vec![
        [
            "INDEX",
            "CACHE",
            "DOCUMENTS",
            "POSITION",
            "REBUILDING",
            "LAST COMMIT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for ix in reply.body["indexes"].as_array().into_iter().flatten() {
        let st = &ix["status"];
        rows.push(vec![
            s(&ix["name"]),
            s(&ix["cache"]),
            s(&st["documents"]),
            s(&st["position"]),
            s(&st["rebuilding"]),
            s(&st["last_commit"]),
        ]);
    }
    Ok(table(rows))
}

/// `tandem search rebuild NAME`.
pub async fn search_rebuild(config: &Config, name: &str) -> anyhow::Result<String> {
    let reply = request(
        config,
        "POST",
        &format!("/v1/search/{}/rebuild", encode_query(name)),
    )
    .await?;
    if reply.status != 202 {
        bail!("rebuild refused: {}", error_text(&reply));
    }
    Ok(format!(
        "rebuilding search index {name} from the local cache directory; `tandem search` shows when it is done"
    ))
}

/// Formats `/v1/cluster` as a table.
pub fn format_hosts(cluster: &Value) -> String {
    let header = [
        "HOST",
        "STATE",
        "ROLE",
        "READY",
        "HEARTBEAT",
        "APPLIED",
        "LAG",
        "PENDING",
        "VERSION",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let me = cluster["this_host"].as_str().unwrap_or("");
    for h in cluster["hosts"].as_array().into_iter().flatten() {
        let id = h["id"].as_str().unwrap_or("?");
        rows.push(vec![
            if id == me {
                format!("{id} *")
            } else {
                id.to_string()
            },
            h["state"].as_str().unwrap_or("?").to_string(),
            h["role"].as_str().unwrap_or("-").to_string(),
            if h["ready"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
            .to_string(),
            format!(
                "{:.1}s ago",
                h["heartbeat_age_seconds"].as_f64().unwrap_or(f64::NAN)
            ),
            h["applied"].as_str().unwrap_or("-").to_string(),
            format!("{:.1}s", h["lag_seconds"].as_f64().unwrap_or(0.0)),
            h["pending_rows"].as_i64().unwrap_or(0).to_string(),
            h["version"].as_str().unwrap_or("?").to_string(),
        ]);
    }
    table(rows)
}

/// Aligns rows of cells into columns.
fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// `tandem resync [--host ID]`.
pub async fn resync(config: &Config, host: Option<&str>) -> anyhow::Result<String> {
    let path = match host {
        Some(h) => format!("/v1/resync?host={}", encode_query(h)),
        None => "/v1/resync".to_string(),
    };
    let reply = request(config, "POST", &path).await?;
    if reply.status != 202 {
        bail!("resync refused: {}", error_text(&reply));
    }
    Ok(match host {
        Some(h) => format!("asked {h} to cold-boot (at its next heartbeat)"),
        None => format!(
            "{} will cold-boot now; watch `tandem status`",
            config.host_id
        ),
    })
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let r = parse_reply(b"HTTP/1.0 503 Service Unavailable\r\ncontent-type: application/json\r\n\r\n{\"error\":{\"code\":\"x\",\"message\":\"down\"}}").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(error_text(&r), "down");
        assert!(parse_reply(b"garbage").is_err());
    }

    #[test]
    fn table() {
        let doc = serde_json::json!({"this_host": "a", "hosts": [
            {"id": "a", "state": "live", "role": "member", "ready": true, "heartbeat_age_seconds": 1.2,
             "applied": "5:9:", "lag_seconds": 0.0, "pending_rows": 0, "version": "0.1.0"},
            {"id": "bb", "state": "stale", "role": null, "ready": false, "heartbeat_age_seconds": 40.0,
             "applied": null, "lag_seconds": 3.5, "pending_rows": 12, "version": "0.1.0"}]});
        let t = format_hosts(&doc);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("HOST"));
        assert!(lines[1].starts_with("a *"));
        assert!(
            lines[2].contains("stale") && lines[2].contains("40.0s ago") && lines[2].contains("12")
        );
    }
}
