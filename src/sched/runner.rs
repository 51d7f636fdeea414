//! Claiming and running one job run: the claim in `job_runs`, the action
//! (HTTP, command or built-in) under its timeout, the recorded outcome,
//! metrics, and retries. One task per run; the scheduler (the parent
//! module) decides what is due.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::action::{self, Outcome, RunContext};
use super::{Planned, from_ts, ts};
use crate::app::App;
use crate::config::jobs::{Action, Builtin, JobSpec, Misfire, RunOn};
use crate::db::DbError;

/// Claims and executes runs (one task per run).
#[derive(Clone)]
pub(super) struct Runner {
    pub(super) app: Arc<App>,
    pub(super) http: reqwest::Client,
    pub(super) jobs: Vec<Arc<JobSpec>>,
    pub(super) retry_tx: mpsc::UnboundedSender<Planned>,
}

impl Runner {
    /// Claims (unless `claimed` already says which run) and executes `p`,
    /// then its retries.
    pub(super) async fn run(&self, mut p: Planned, mut claimed: Option<(i64, i64)>) {
        let job = p.job.clone();
        if !job.jitter.is_zero() && claimed.is_none() {
            let jitter = job.jitter.mul_f64(rand::random::<f64>());
            tokio::time::sleep(jitter).await;
        }
        loop {
            let claim = match claimed.take() {
                Some(c) => Some(c),
                None => self.claim(&p).await,
            };
            let Some((id, token)) = claim else {
                return;
            };
            let outcome = self.execute(&job, id, p.at, p.attempt, token).await;
            let failed = matches!(outcome, "failed" | "timed_out");
            if !failed || p.attempt as u32 >= job.retries {
                return;
            }
            let backoff = job
                .retry_backoff
                .saturating_mul(1u32 << p.attempt.min(16))
                .min(Duration::from_secs(600));
            tracing::info!(job = %job.name, attempt = p.attempt + 1, in_ = ?backoff, "retrying");
            tokio::time::sleep(backoff).await;
            p.attempt += 1;
            p.trigger = "retry";
        }
    }

    /// Claims a run; the run id and the fencing token to send, or `None`
    /// when another host has it (or this one must not run it).
    async fn claim(&self, p: &Planned) -> Option<(i64, i64)> {
        let app = &self.app;
        let job = &p.job;
        let leader_only = job.run_on == RunOn::Leader;
        let token = match (leader_only, app.leadership.term()) {
            (true, None) => return None,
            (true, Some(t)) => t,
            (false, _) => 0,
        };
        let slot = if job.run_on == RunOn::EveryHost {
            app.config.host_id.as_str()
        } else {
            ""
        };
        // The database may be away for a moment (a restart, a failover):
        // a claim that gets no answer is tried again while the time is still
        // due (within misfire_grace; for `misfire = "run-once"` jobs, for up
        // to an hour), so that a blip does not drop a scheduled time.
        let patience = match job.misfire {
            Misfire::Skip => job.misfire_grace,
            Misfire::RunOnce => job.misfire_grace.max(Duration::from_secs(3600)),
        };
        let give_up = p.at + chrono::Duration::from_std(patience).unwrap_or_default();
        let mut pause = Duration::from_millis(250);
        let row = loop {
            app.metrics.db_queries.with_label_values(&["jobs"]).inc();
            let result = app
                .db
                .query_one(
                    &app.queries.claim_run,
                    &[
                        &job.name,
                        &ts(p.at),
                        &slot,
                        &p.attempt,
                        &p.trigger,
                        &app.config.host_id,
                        &token,
                        &leader_only,
                        &job.overlap,
                        &(app.config.cluster.stale_after as i32),
                    ],
                )
                .await;
            match result {
                Ok(row) => break row,
                Err(e) if app.leadership.now_db() < give_up && !app.is_shutting_down() => {
                    tracing::warn!(job = %job.name, at = %p.at, error = %e, retry_in = ?pause, "cannot claim a job run; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, at = %p.at, error = %e, "cannot claim a job run; this time is missed");
                    return None;
                }
            }
        };
        let id: Option<i64> = row.get(0);
        let state: &str = row.get(1);
        match state {
            "running" => {
                let id = id.expect("a claimed run has an id");
                Some((id, if leader_only { token } else { id }))
            }
            "skipped" => {
                let note: Option<String> = row.get(2);
                tracing::warn!(job = %job.name, at = %p.at, reason = ?note, "not starting a run: the previous one is still running (overlap = false)");
                app.metrics
                    .coord
                    .job_runs
                    .with_label_values(&[&job.name, "skipped"])
                    .inc();
                None
            }
            "not_leader" => {
                tracing::info!(job = %job.name, "not running a leader job: this host's term has ended");
                None
            }
            _ => None,
        }
    }

    /// Runs the action of a claimed run and records the outcome. Returns
    /// the outcome's state.
    async fn execute(
        &self,
        job: &JobSpec,
        id: i64,
        at: DateTime<Utc>,
        attempt: i32,
        token: i64,
    ) -> &'static str {
        let app = &self.app;
        let started = Instant::now();
        let ctx = RunContext {
            job: job.name.clone(),
            run_id: id,
            attempt,
            scheduled_for: at,
            fencing_token: token,
            host: app.config.host_id.clone(),
        };
        let tail = app.config.scheduler.output_tail;
        // The last moment to notice a lost term before acting under it.
        let outcome = if job.run_on == RunOn::Leader && app.leadership.term() != Some(token) {
            Outcome {
                state: "skipped",
                ..Outcome::failed("this host's leader term ended before the run started")
            }
        } else {
            tracing::info!(job = %job.name, run = id, scheduled_for = %ctx.scheduled_for_text(), token, "job run starting");
            match &job.action {
                Action::Http(a) => action::http(&self.http, a, &ctx, job.timeout, tail).await,
                Action::Command(a) => action::command(a, &ctx, job.timeout, tail).await,
                Action::Builtin(b) => {
                    match tokio::time::timeout(job.timeout, self.builtin(*b)).await {
                        Ok(o) => o,
                        Err(_) => Outcome::timed_out(job.timeout, String::new()),
                    }
                }
            }
        };
        let took = started.elapsed();
        let m = &app.metrics.coord;
        m.job_runs
            .with_label_values(&[&job.name, outcome.state])
            .inc();
        m.job_duration
            .with_label_values(&[&job.name])
            .observe(took.as_secs_f64());
        if outcome.state == "succeeded" {
            m.job_last_success
                .with_label_values(&[&job.name])
                .set(Utc::now().timestamp_millis() as f64 / 1000.0);
            tracing::info!(job = %job.name, run = id, took = ?took, "job run succeeded");
        } else {
            tracing::warn!(job = %job.name, run = id, outcome = outcome.state, error = ?outcome.error, "job run did not succeed");
        }
        self.record(id, &outcome).await;
        outcome.state
    }

    /// Writes the outcome, retrying for a while if the database is down.
    async fn record(&self, id: i64, o: &Outcome) {
        let app = &self.app;
        // PostgreSQL text cannot hold NUL (`find -print0`, a binary body).
        let nul = |s: &str| s.replace('\0', "\u{FFFD}");
        let output = nul(&o.output);
        let error = o.error.as_deref().map(nul);
        for attempt in 0..10u32 {
            app.metrics.db_queries.with_label_values(&["jobs"]).inc();
            let result = app
                .db
                .query_one(
                    &app.queries.finish_run,
                    &[
                        &id,
                        &o.state,
                        &o.exit_status,
                        &o.http_status,
                        &output,
                        &error,
                    ],
                )
                .await;
            match result {
                Ok(_) => return,
                Err(e) if attempt == 9 => {
                    tracing::warn!(run = id, error = %e, "cannot record a job run's outcome");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await,
            }
        }
    }

    async fn builtin(&self, b: Builtin) -> Outcome {
        let app = &self.app;
        match b {
            Builtin::PruneLog => {
                match crate::cluster::prune(app, &CancellationToken::new()).await {
                    Ok(n) => Outcome::succeeded(format!("pruned {n} log rows")),
                    Err(e) => Outcome::failed(e.to_string()),
                }
            }
            Builtin::PruneJobHistory => {
                let retain = app.config.scheduler.history_retain.as_secs_f64();
                let mut total = 0;
                loop {
                    app.metrics.db_queries.with_label_values(&["jobs"]).inc();
                    match app.db.query_one(&app.queries.prune_runs, &[&retain]).await {
                        Ok(row) => {
                            let n: i64 = row.get(0);
                            total += n;
                            if n < 10_000 {
                                break Outcome::succeeded(format!("deleted {total} job runs"));
                            }
                        }
                        Err(e) => break Outcome::failed(e.to_string()),
                    }
                }
            }
            Builtin::MarkStaleHosts => match self.mark_stale().await {
                Ok(text) => Outcome::succeeded(text),
                Err(e) => Outcome::failed(e.to_string()),
            },
            Builtin::ExpireUploads => match app.uploads.expire(app).await {
                Ok(text) => Outcome::succeeded(text),
                Err(e) => Outcome::failed(e),
            },
        }
    }

    /// Marks the runs of dead hosts abandoned (retrying those whose job
    /// allows it) and forgets hosts gone for longer than
    /// `cluster.forget_after`.
    async fn mark_stale(&self) -> Result<String, DbError> {
        let app = &self.app;
        let missed = app.config.cluster.stale_after as i32;
        app.metrics.db_queries.with_label_values(&["jobs"]).inc();
        let rows = app.db.query(&app.queries.abandon_runs, &[&missed]).await?;
        self.abandoned(&rows, "its host stopped heartbeating");
        let forget = app.config.cluster.forget_after.as_secs_f64();
        app.metrics.db_queries.with_label_values(&["jobs"]).inc();
        let gone = app.db.query(&app.queries.forget_hosts, &[&forget]).await?;
        for r in &gone {
            tracing::info!(host = %r.get::<_, String>(0), "forgot a host gone for longer than cluster.forget_after");
        }
        Ok(format!(
            "{} runs abandoned, {} hosts forgotten",
            rows.len(),
            gone.len()
        ))
    }

    /// At start, before this process runs anything: the runs still marked
    /// running on this host belong to a process that is gone (a restart
    /// quicker than `tandem.mark-stale-hosts` notices, a crash, a result
    /// the database never received). Left so, a job refusing overlap would
    /// skip every later time. Marked abandoned, retried as the job allows.
    pub(super) async fn abandon_own_runs(&self) -> Result<usize, DbError> {
        let app = &self.app;
        app.metrics.db_queries.with_label_values(&["jobs"]).inc();
        let rows = app
            .db
            .query(&app.queries.abandon_own_runs, &[&app.config.host_id])
            .await?;
        self.abandoned(&rows, "this host restarted while it ran");
        Ok(rows.len())
    }

    /// Counts abandoned runs (`abandon_runs` rows) and sends the retries
    /// their jobs allow.
    fn abandoned(&self, rows: &[tokio_postgres::Row], why: &str) {
        let app = &self.app;
        for r in rows {
            let name: String = r.get(1);
            let attempt: i32 = r.get(4);
            let host: Option<String> = r.get(5);
            tracing::warn!(job = %name, run = r.get::<_, i64>(0), host = ?host, "job run abandoned: {why}");
            let Some(job) = self.jobs.iter().find(|j| j.name == name).cloned() else {
                continue;
            };
            app.metrics
                .coord
                .job_runs
                .with_label_values(&[&job.name, "abandoned"])
                .inc();
            if job.run_on != RunOn::EveryHost && (attempt as u32) < job.retries {
                let p = Planned {
                    job,
                    at: from_ts(r.get(2)),
                    attempt: attempt + 1,
                    trigger: "retry",
                };
                let _ = self.retry_tx.send(p);
            }
        }
    }
}
