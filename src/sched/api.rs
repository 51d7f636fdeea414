//! What the API and `tandem jobs` show of the jobs: their schedules, next
//! and last runs (from `job_runs`), and manual runs.

use chrono::SecondsFormat;
use serde::Serialize;
use tokio_postgres::Row;

use crate::app::App;
use crate::config::jobs::{Action, JobSpec};
use crate::db::DbError;

/// One run, as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub id: i64,
    pub job: String,
    pub scheduled_for: String,
    /// Empty for `leader` and `once` jobs; the host for `every-host` jobs.
    pub slot: String,
    pub attempt: i32,
    /// `schedule`, `misfire`, `retry` or `manual`.
    pub trigger: String,
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out`, `abandoned`
    /// or `skipped`.
    pub state: String,
    pub host: Option<String>,
    pub fencing_token: Option<i64>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_seconds: Option<f64>,
    pub exit_status: Option<i32>,
    pub http_status: Option<i32>,
    pub output: Option<String>,
    pub error: Option<String>,
}

impl RunView {
    /// Reads a row selected with `db::queries::RUN_COLUMNS`.
    pub fn from_row(r: &Row) -> Self {
        Self {
            id: r.get(0),
            job: r.get(1),
            scheduled_for: r.get(2),
            slot: r.get(3),
            attempt: r.get(4),
            trigger: r.get(5),
            state: r.get(6),
            host: r.get(7),
            fencing_token: r.get(8),
            started_at: r.get(9),
            finished_at: r.get(10),
            duration_seconds: r.get(11),
            exit_status: r.get(12),
            http_status: r.get(13),
            output: r.get(14),
            error: r.get(15),
        }
    }
}

/// One job with its schedule and latest run.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub name: String,
    pub schedule: String,
    pub run_on: &'static str,
    pub action: &'static str,
    pub target: Option<String>,
    pub enabled: bool,
    pub misfire: &'static str,
    pub misfire_grace_seconds: f64,
    pub overlap: bool,
    pub retries: u32,
    pub timeout_seconds: f64,
    pub next_run: Option<String>,
    pub last_run: Option<RunView>,
    /// The host running it now, if its latest run is running.
    pub running_on: Option<String>,
}

fn target(job: &JobSpec) -> Option<String> {
    match &job.action {
        Action::Http(h) => Some(format!("{} {}", h.method, h.url)),
        Action::Command(c) => Some(c.argv.join(" ")),
        Action::Builtin(_) => None,
    }
}

/// Every configured job.
pub async fn jobs(app: &App) -> Result<Vec<JobView>, DbError> {
    let all = app.jobs();
    let names: Vec<String> = all.iter().map(|j| j.name.clone()).collect();
    app.metrics.db_queries.with_label_values(&["jobs"]).inc();
    let rows = app.db.query(&app.queries.job_summary, &[&names]).await?;
    let last: Vec<RunView> = rows.iter().map(RunView::from_row).collect();
    let now = app.leadership.now_db();
    Ok(all
        .iter()
        .map(|j| {
            let last_run = last.iter().find(|r| r.job == j.name).cloned();
            JobView {
                name: j.name.clone(),
                schedule: j.schedule.describe(),
                run_on: j.run_on.as_str(),
                action: j.action.kind(),
                target: target(j),
                enabled: j.enabled,
                misfire: j.misfire.as_str(),
                misfire_grace_seconds: j.misfire_grace.as_secs_f64(),
                overlap: j.overlap,
                retries: j.retries,
                timeout_seconds: j.timeout.as_secs_f64(),
                next_run: j
                    .enabled
                    .then(|| j.schedule.next_after(now))
                    .flatten()
                    .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
                running_on: last_run
                    .as_ref()
                    .filter(|r| r.state == "running")
                    .and_then(|r| r.host.clone()),
                last_run,
            }
        })
        .collect())
}

/// A job's runs, newest first, before run id `before` if given.
pub async fn runs(
    app: &App,
    job: &str,
    before: Option<i64>,
    limit: i32,
) -> Result<Vec<RunView>, DbError> {
    app.metrics.db_queries.with_label_values(&["jobs"]).inc();
    let rows = app
        .db
        .query(&app.queries.job_runs, &[&job, &before, &limit])
        .await?;
    Ok(rows.iter().map(RunView::from_row).collect())
}

/// Queues a run of `job` now, once cluster-wide: the run id and its
/// scheduled time, or `None` when refused because a run is already queued
/// or running and the job refuses overlap.
pub async fn run_now(app: &App, job: &JobSpec) -> Result<Option<(i64, f64)>, DbError> {
    app.metrics.db_queries.with_label_values(&["jobs"]).inc();
    let rows = app
        .db
        .query(&app.queries.queue_run, &[&job.name, &job.overlap])
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.get::<_, Option<i64>>(0).map(|id| (id, r.get(1)))))
}
