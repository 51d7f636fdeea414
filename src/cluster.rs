//! The host registry (heartbeats, the cluster view, clean stop), the leader
//! lease (acquired and renewed by the heartbeat statement itself, so that a
//! quiet host costs one statement per beat), log pruning (run by the
//! built-in job `tandem.prune-log`), and waiting until every live host has
//! applied a write.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::coord::leader::Observation;
use crate::db::DbError;
use crate::sync::snapshot::Snapshot;

/// One host as the registry sees it.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub id: String,
    /// `live`, `stale` (missed heartbeats) or `stopped` (clean shutdown).
    pub state: &'static str,
    /// `single` (the only live host), `leader` or `follower`; null unless
    /// live.
    pub role: Option<&'static str>,
    /// Holds the leader lease.
    pub leader: bool,
    pub version: String,
    pub api: Option<String>,
    pub started_at: String,
    pub last_heartbeat: String,
    pub heartbeat_age_seconds: f64,
    pub applied: Option<String>,
    pub ready: bool,
    pub lag_seconds: f64,
    pub pending_rows: i64,
}

/// Every registered host, with roles.
pub async fn hosts(app: &App) -> Result<Vec<HostView>, DbError> {
    let missed = app.config.cluster.stale_after as i32;
    let rows = app.db.query(&app.queries.hosts, &[&missed]).await?;
    let mut hosts: Vec<HostView> = rows
        .iter()
        .map(|r| {
            let stopped: bool = r.get(6);
            let live: bool = r.get(11);
            HostView {
                id: r.get(0),
                state: if stopped {
                    "stopped"
                } else if live {
                    "live"
                } else {
                    "stale"
                },
                role: None,
                leader: r.get(12),
                version: r.get(1),
                api: r.get(2),
                started_at: r.get(3),
                last_heartbeat: r.get(4),
                heartbeat_age_seconds: r.get(5),
                applied: r.get(7),
                ready: r.get::<_, bool>(8) && live,
                lag_seconds: r.get(9),
                pending_rows: r.get(10),
            }
        })
        .collect();
    let live = hosts.iter().filter(|h| h.state == "live").count();
    for h in &mut hosts {
        if h.state == "live" {
            h.role = Some(if live == 1 {
                "single"
            } else if h.leader {
                "leader"
            } else {
                "follower"
            });
        }
    }
    Ok(hosts)
}

/// Registers this host and refreshes it every `cluster.heartbeat_interval`;
/// the same statement acquires or renews the leader lease. The leader beats
/// every third of its lease; an eligible follower also beats just after the
/// leader's lease would run out, and at once when a leader releases it.
pub async fn heartbeat_loop(app: Arc<App>, cancel: CancellationToken) {
    let mut failing = false;
    let mut next = tokio::time::Instant::now();
    loop {
        // `next` is never later than this host's term deadline (see
        // `Leadership::next_beat`), so a term whose renewals fail ends on time.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            _ = app.sync.leader_released.notified(), if app.leadership.eligible() => {}
        }
        app.leadership.check_deadline(&app.metrics.coord);
        let result = heartbeat(&app).await;
        next = tokio::time::Instant::now()
            + app
                .leadership
                .next_beat(app.config.cluster.heartbeat_interval);
        match result {
            Ok(()) => {
                app.metrics.heartbeats.with_label_values(&["ok"]).inc();
                if failing {
                    tracing::info!("heartbeats restored");
                    failing = false;
                }
            }
            Err(e) => {
                app.metrics.heartbeats.with_label_values(&["error"]).inc();
                if !failing {
                    tracing::warn!(error = %e, "heartbeat failed; still serving reads from the local cache");
                    failing = true;
                }
            }
        }
    }
}

async fn heartbeat(app: &App) -> Result<(), DbError> {
    let started = Instant::now();
    let status = app.sync.status();
    let applied = status.persisted.as_ref().map(|p| p.done.to_string());
    let ready = app.ready().is_ok();
    let lag = app.sync.lag().as_secs_f64();
    let started_secs = app.started_secs();
    let interval = app.config.cluster.heartbeat_interval.as_secs_f64();
    let missed = app.config.cluster.stale_after as i32;
    let api = app.config.api.listen.map(|a| a.to_string());
    let lease = app.config.leader.lease.as_secs_f64();
    let acquire = app.leadership.eligible() && !app.is_shutting_down();
    let sent = Instant::now();
    let sent_wall = SystemTime::now();
    app.metrics
        .db_queries
        .with_label_values(&["heartbeat"])
        .inc();
    let row = app
        .db
        .query_one(
            &app.queries.heartbeat,
            &[
                &app.config.host_id,
                &env!("CARGO_PKG_VERSION"),
                &api,
                &started_secs,
                &interval,
                &applied,
                &ready,
                &lag,
                &missed,
                &lease,
                &acquire,
            ],
        )
        .await?;
    let observation = Observation {
        holder: row.get(6),
        token: row.get(7),
        expires_in: row.get(8),
        db_now: row.get(9),
        live_hosts: row.get(3),
    };
    app.leadership
        .observe(sent, sent_wall, &observation, &app.metrics.coord);
    let resync: bool = row.get(0);
    let pending: Option<i64> = row.get(1);
    let oldest: f64 = row.get(2);
    let m = &app.metrics;
    m.pending_rows.set(pending.unwrap_or(0));
    m.oldest_xact_age.set(oldest);
    m.hosts.with_label_values(&["live"]).set(row.get(3));
    m.hosts.with_label_values(&["stale"]).set(row.get(4));
    m.hosts.with_label_values(&["stopped"]).set(row.get(5));
    if pending.is_some_and(|p| p > 0) {
        app.sync.observe_pending(started);
    }
    if resync {
        tracing::info!("a resync of this host was requested through the database");
        app.sync.request_resync();
    }
    Ok(())
}

/// Gives up the leader lease (clean shutdown) so another host takes over at
/// once.
pub async fn resign(app: &App) -> Result<(), DbError> {
    if let Some(token) = app.leadership.resign(&app.metrics.coord) {
        app.db
            .query_one(&app.queries.lease_release, &[&app.config.host_id, &token])
            .await?;
        tracing::info!(token, "released the leader lease");
    }
    Ok(())
}

/// Marks this host as cleanly stopped, so it no longer counts as live.
pub async fn mark_stopped(app: &App) -> Result<(), DbError> {
    let applied = app.sync.status().persisted.map(|p| p.done.to_string());
    app.db
        .query_one(&app.queries.stopped, &[&app.config.host_id, &applied])
        .await?;
    Ok(())
}

/// Deletes prunable log rows in batches. Returns the number deleted.
pub async fn prune(app: &App, cancel: &CancellationToken) -> Result<i64, DbError> {
    let s = &app.config.sync;
    let batch = s.prune_batch as i32;
    let mut total = 0;
    while !cancel.is_cancelled() {
        app.metrics.db_queries.with_label_values(&["prune"]).inc();
        let row = app
            .db
            .query_one(
                &app.queries.prune,
                &[
                    &s.retain.as_secs_f64(),
                    &s.max_retain.as_secs_f64(),
                    &(app.config.cluster.stale_after as i32),
                    &batch,
                ],
            )
            .await?;
        let n: i64 = row.get(0);
        if n < 0 {
            tracing::debug!("another host is pruning");
            break;
        }
        total += n;
        app.metrics.pruned_rows.inc_by(n as u64);
        if n < i64::from(batch) {
            break;
        }
    }
    if total > 0 {
        tracing::info!(rows = total, "pruned the log");
    }
    Ok(total)
}

/// Waits until this host has applied transaction `tx`. False on timeout.
pub async fn wait_local(app: &App, tx: u64, deadline: Instant) -> bool {
    let mut applied = app.sync.applied();
    let result = tokio::time::timeout_at(
        deadline.into(),
        applied.wait_for(|s| s.as_ref().is_some_and(|s| s.is_visible(tx))),
    )
    .await;
    matches!(result, Ok(Ok(_)))
}

/// Waits until every live host has applied transaction `tx`. False on
/// timeout. Other hosts report their position as soon as they apply a
/// transaction someone asked an ack for; the registry is also re-read every
/// half second in case a report is missed.
pub async fn wait_cluster(app: &App, tx: u64, deadline: Instant) -> Result<bool, DbError> {
    let mut acks = app.sync.acks();
    let mut applied = app.sync.applied();
    let missed = app.config.cluster.stale_after as i32;
    loop {
        let rows = app
            .db
            .query(&app.queries.live_positions, &[&missed])
            .await?;
        let others = rows
            .iter()
            .filter(|r| r.get::<_, String>(0) != app.config.host_id)
            .all(|r| {
                r.get::<_, Option<String>>(1)
                    .and_then(|s| s.parse::<Snapshot>().ok())
                    .is_some_and(|s| s.is_visible(tx))
            });
        if others && app.sync.has_applied(tx) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::select! {
            _ = acks.changed() => {}
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}
