//! The job scheduler: one task per host that wakes at each job's next
//! scheduled time, claims the run in PostgreSQL and runs it.
//!
//! Exactly once per scheduled time (`leader` and `once` jobs): every host
//! computes the same scheduled times (from the database's clock), and a run
//! is claimed in `job_runs` — unique on job, scheduled time, slot and
//! attempt — before it starts. `leader` jobs are claimed only with the
//! current term's fencing token, checked by the database, and only while
//! this host's local deadline for that term has not passed; so a frozen or
//! partitioned ex-leader runs nothing under its old term. `every-host` jobs
//! use the host id as the slot.
//!
//! Misfires: when a job's latest due time is more than its `misfire_grace`
//! old (default [`DEFAULT_MISFIRE_GRACE`], 1 s; the host was down, frozen, or only now
//! became leader), `misfire = "skip"` forgets it and `"run-once"` runs it
//! once.

pub mod action;
pub mod api;
mod runner;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::jobs::{DEFAULT_MISFIRE_GRACE, JobSpec, Misfire, RunOn, Schedule};
use crate::db::DbError;
use runner::Runner;

/// The scheduler wakes at least this often (its liveness metric).
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// How often queued (manual) runs are looked for without a notification.
const QUEUE_CHECK: Duration = Duration::from_secs(60);
/// How long running jobs may finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn from_ts(secs: f64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis((secs * 1000.0).round() as i64).unwrap_or_default()
}

/// A scheduled time to run and its trigger (`schedule` or `misfire`).
type Due = (DateTime<Utc>, &'static str);

/// The runs due in `(cursor, now]`, advancing `cursor` past them: every
/// time at most `grace` old (on time; several if the scheduler woke late),
/// and for older ones (misfires) the latest, with `run-once` and when no
/// on-time run covers it. Also what `skip` forgot: the latest and how many.
fn plan(
    schedule: &Schedule,
    misfire: Misfire,
    cursor: &mut DateTime<Utc>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> (Vec<Due>, Option<(DateTime<Utc>, u64)>) {
    let edge = now - grace - chrono::Duration::milliseconds(1);
    let late = latest_due(schedule, *cursor, edge);
    let mut times = Vec::new();
    let mut t = late.map_or(*cursor, |(at, _)| at).max(*cursor);
    while let Some(next) = schedule.next_after(t) {
        if next > now || times.len() >= 10 {
            break;
        }
        times.push((next, "schedule"));
        t = next;
    }
    *cursor = t;
    let mut skipped = None;
    if let Some((at, count)) = late {
        match misfire {
            Misfire::RunOnce if times.is_empty() => times.push((at, "misfire")),
            Misfire::RunOnce => {}
            Misfire::Skip => skipped = Some((at, count)),
        }
    }
    (times, skipped)
}

/// The latest scheduled time in `(after, now]` and how many there are.
fn latest_due(
    schedule: &Schedule,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, u64)> {
    if let Schedule::Every(period) = schedule {
        let p = period.as_millis() as i64;
        let latest = now.timestamp_millis().div_euclid(p) * p;
        let first = (after.timestamp_millis().div_euclid(p) + 1) * p;
        if latest < first {
            return None;
        }
        return Some((
            from_ts(latest as f64 / 1000.0),
            ((latest - first) / p + 1) as u64,
        ));
    }
    let mut t = after;
    let mut latest = None;
    let mut count = 0;
    while let Some(next) = schedule.next_after(t) {
        if next > now {
            break;
        }
        t = next;
        latest = Some(next);
        count += 1;
        if count >= 100_000 {
            // Far behind (a clock jump): what is left is forgotten.
            return Some((t, count));
        }
    }
    latest.map(|l| (l, count))
}

/// The enabled jobs as last loaded (registered in the metrics).
fn enabled_jobs(app: &App) -> Vec<Arc<JobSpec>> {
    let jobs: Vec<Arc<JobSpec>> = app
        .jobs()
        .iter()
        .filter(|j| j.enabled)
        .cloned()
        .map(Arc::new)
        .collect();
    app.metrics
        .coord
        .register_jobs(jobs.iter().map(|j| j.name.as_str()));
    jobs
}

/// One run to claim and execute.
#[derive(Debug, Clone)]
struct Planned {
    job: Arc<JobSpec>,
    at: DateTime<Utc>,
    attempt: i32,
    trigger: &'static str,
}

/// The scheduler task.
pub struct Scheduler {
    app: Arc<App>,
    jobs: Vec<Arc<JobSpec>>,
    /// Per job: every scheduled time up to here has been considered.
    cursors: HashMap<String, DateTime<Utc>>,
    http: reqwest::Client,
    runs: JoinSet<()>,
    /// Retries of abandoned runs, found by the built-in job.
    retry_tx: mpsc::UnboundedSender<Planned>,
    retry_rx: mpsc::UnboundedReceiver<Planned>,
    /// Changes to the configured jobs (SIGHUP).
    reloaded: tokio::sync::watch::Receiver<u64>,
}

impl Scheduler {
    pub fn new(app: Arc<App>) -> Self {
        // Subscribed before reading the jobs: a reload from now on is seen.
        let reloaded = app.jobs_reloaded.subscribe();
        let jobs = enabled_jobs(&app);
        // A redirect is the app's answer, a failure (3xx is not success):
        // followed, it would turn the POST into a GET, or carry the job's
        // headers to another host.
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client without TLS builds");
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Self {
            retry_tx,
            retry_rx,
            reloaded,
            app,
            jobs,
            cursors: HashMap::new(),
            http,
            runs: JoinSet::new(),
        }
    }

    /// Runs until `cancel`; then lets running jobs finish for up to
    /// [`SHUTDOWN_GRACE`].
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut term_rx = self.app.leadership.subscribe();
        // Schedules follow the database's clock: wait (a little) for the
        // first heartbeat to measure it.
        let started = Instant::now();
        while !self.app.leadership.observed() && started.elapsed() < Duration::from_secs(10) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let mut term = *term_rx.borrow_and_update();
        let mut reloaded = self.reloaded.clone();
        match self.runner().abandon_own_runs().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                runs = n,
                "runs left running by this host's previous process marked abandoned"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark the runs of this host's previous process abandoned; tandem.mark-stale-hosts will not")
            }
        }
        self.init_cursors(|_| true).await;
        let mut check_queue = true;
        let mut last_queue_check = Instant::now();
        loop {
            self.app
                .metrics
                .coord
                .scheduler_last_tick
                .set(Utc::now().timestamp_millis() as f64 / 1000.0);
            if check_queue || last_queue_check.elapsed() >= QUEUE_CHECK {
                check_queue = false;
                last_queue_check = Instant::now();
                self.take_queued().await;
            }
            let now = self.app.leadership.now_db();
            self.fire_due(now);
            let next = self
                .jobs
                .iter()
                .filter_map(|j| j.schedule.next_after(self.cursors[&j.name]))
                .min();
            let sleep = next
                .map(|n| (n - now).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(sleep) => {}
                _ = self.app.sync.jobs_queued.notified() => check_queue = true,
                changed = term_rx.changed() => {
                    if changed.is_err() { break; }
                    let new = *term_rx.borrow_and_update();
                    if new != 0 && new != term {
                        // A new term: plan the leader jobs from what the
                        // previous leader claimed, and take their queue.
                        self.init_cursors(|j| j.run_on == RunOn::Leader).await;
                        check_queue = true;
                    }
                    term = new;
                }
                Some(_) = self.runs.join_next(), if !self.runs.is_empty() => {}
                Some(p) = self.retry_rx.recv() => self.spawn(p),
                Ok(()) = reloaded.changed() => self.reload().await,
            }
        }
        if !self.runs.is_empty() {
            tracing::info!(
                running = self.runs.len(),
                "waiting for running jobs to finish"
            );
            let wait = async { while self.runs.join_next().await.is_some() {} };
            if tokio::time::timeout(SHUTDOWN_GRACE, wait).await.is_err() {
                tracing::warn!("jobs still running at shutdown were stopped");
                self.runs.abort_all();
            }
        }
    }

    /// Takes the reloaded jobs: runs under way go on; a new or changed job
    /// is planned from its claimed history, as at start.
    async fn reload(&mut self) {
        let old: HashMap<String, Arc<JobSpec>> = self
            .jobs
            .iter()
            .map(|j| (j.name.clone(), j.clone()))
            .collect();
        self.jobs = enabled_jobs(&self.app);
        let fresh: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| {
                old.get(&j.name)
                    .is_none_or(|o| format!("{o:?}") != format!("{j:?}"))
            })
            .map(|j| j.name.clone())
            .collect();
        let names: Vec<&str> = self.jobs.iter().map(|j| j.name.as_str()).collect();
        self.cursors.retain(|n, _| names.contains(&n.as_str()));
        self.init_cursors(|j| fresh.contains(&j.name)).await;
        tracing::info!(jobs = self.jobs.len(), new_or_changed = ?fresh, "jobs reloaded");
    }

    /// Sets where each matching job's schedule resumes: from the latest
    /// claimed time (so that `run-once` sees what was missed, and times
    /// still within the job's `misfire_grace` run late), but never earlier
    /// than `misfire_grace` ago for `skip` jobs; a job never claimed starts
    /// [`DEFAULT_MISFIRE_GRACE`] ago (not a longer grace ago: it did not exist then).
    async fn init_cursors(&mut self, which: impl Fn(&JobSpec) -> bool) {
        let now = self.app.leadership.now_db();
        let names: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| which(j))
            .map(|j| j.name.clone())
            .collect();
        let claimed = match self.last_claimed(&names).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the job history; scheduling from now");
                HashMap::new()
            }
        };
        let ago = |d: Duration| now - chrono::Duration::from_std(d).expect("at most a day");
        // Misfires older than this are forgotten even with `run-once`.
        let horizon = now - chrono::Duration::days(8);
        for job in self.jobs.iter().filter(|j| which(j)) {
            let recent = ago(job.misfire_grace);
            let cursor = match (job.misfire, claimed.get(&job.name)) {
                (Misfire::RunOnce, Some(last)) if *last < recent => (*last).max(horizon),
                (_, Some(last)) if *last > recent => *last,
                (_, Some(_)) => recent,
                (_, None) => ago(DEFAULT_MISFIRE_GRACE),
            };
            self.cursors.insert(job.name.clone(), cursor);
        }
    }

    async fn last_claimed(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, DateTime<Utc>>, DbError> {
        let app = &self.app;
        app.metrics.db_queries.with_label_values(&["jobs"]).inc();
        let rows = app
            .db
            .query(&app.queries.last_scheduled, &[&names, &app.config.host_id])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), from_ts(r.get(1))))
            .collect())
    }

    /// Starts the runs that are due.
    fn fire_due(&mut self, now: DateTime<Utc>) {
        let mut planned = Vec::new();
        for job in &self.jobs {
            let cursor = self
                .cursors
                .get_mut(&job.name)
                .expect("every job has a cursor");
            // Without a term, a leader job's cursor stays where it is: if the
            // term comes back unchanged (a renewal answered after the local
            // deadline, with the lease never lost), the times in between are
            // then planned (as misfires past their grace) instead of lost.
            // A new term starts from the latest claimed time anyway.
            if job.run_on == RunOn::Leader && self.app.leadership.term().is_none() {
                continue;
            }
            let grace = chrono::Duration::from_std(job.misfire_grace).expect("at most a day");
            let (times, skipped) = plan(&job.schedule, job.misfire, cursor, now, grace);
            if let Some((at, count)) = skipped {
                tracing::info!(job = %job.name, missed = count, latest = %at, "skipping missed scheduled times (misfire = \"skip\")");
            }
            for (at, trigger) in times {
                planned.push(Planned {
                    job: job.clone(),
                    at,
                    attempt: 0,
                    trigger,
                });
            }
        }
        for p in planned {
            self.spawn(p);
        }
    }

    fn runner(&self) -> Runner {
        Runner {
            app: self.app.clone(),
            http: self.http.clone(),
            jobs: self.jobs.clone(),
            retry_tx: self.retry_tx.clone(),
        }
    }

    fn spawn(&mut self, p: Planned) {
        let runner = self.runner();
        self.runs.spawn(async move { runner.run(p, None).await });
    }

    /// Takes queued manual runs of the jobs this host may run now.
    async fn take_queued(&mut self) {
        let leader = self.app.leadership.term();
        let names: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| j.run_on != RunOn::Leader || leader.is_some())
            .map(|j| j.name.clone())
            .collect();
        let leader_jobs: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| j.run_on == RunOn::Leader && leader.is_some())
            .map(|j| j.name.clone())
            .collect();
        loop {
            let app = &self.app;
            app.metrics.db_queries.with_label_values(&["jobs"]).inc();
            let token = leader.unwrap_or(0);
            let row = match app
                .db
                .query(
                    &app.queries.take_queued,
                    &[&names, &leader_jobs, &app.config.host_id, &token],
                )
                .await
            {
                Ok(rows) => rows.into_iter().next(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look for queued runs");
                    return;
                }
            };
            let Some(row) = row else { return };
            let id: i64 = row.get(0);
            let name: String = row.get(1);
            let Some(job) = self.jobs.iter().find(|j| j.name == name).cloned() else {
                continue;
            };
            let runner = self.runner();
            let p = Planned {
                job: job.clone(),
                at: from_ts(row.get(2)),
                attempt: 0,
                trigger: "manual",
            };
            let token: i64 = row.get(3);
            self.runs
                .spawn(async move { runner.run(p, Some((id, token))).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> DateTime<Utc> {
        from_ts(1_699_999_200.0 + secs) // a multiple of an hour
    }

    #[test]
    fn plans_on_time_runs_and_misfires() {
        let every = Schedule::Every(Duration::from_millis(500));
        let grace = chrono::Duration::seconds(1);
        // On time: the one due run.
        let mut cursor = at(0.0);
        let (times, skipped) = plan(&every, Misfire::Skip, &mut cursor, at(0.6), grace);
        assert_eq!(times, vec![(at(0.5), "schedule")]);
        assert!(skipped.is_none());
        assert_eq!(cursor, at(0.5));
        // Woke 0.9 s late: both times still within the grace run.
        let (times, _) = plan(&every, Misfire::Skip, &mut cursor, at(1.9), grace);
        assert_eq!(times, vec![(at(1.0), "schedule"), (at(1.5), "schedule")]);
        // Down for 10 s: skip forgets the old times, runs the on-time ones.
        let (times, skipped) = plan(&every, Misfire::Skip, &mut cursor, at(12.2), grace);
        assert_eq!(times, vec![(at(11.5), "schedule"), (at(12.0), "schedule")]);
        assert_eq!(skipped, Some((at(11.0), 19)));
        // run-once: with no on-time run, the latest missed time runs once.
        let hourly = Schedule::Every(Duration::from_secs(3600));
        let mut cursor = at(0.0);
        let (times, skipped) = plan(
            &hourly,
            Misfire::RunOnce,
            &mut cursor,
            at(3.0 * 3600.0 + 60.0),
            grace,
        );
        assert_eq!(times, vec![(at(3.0 * 3600.0), "misfire")]);
        assert!(skipped.is_none());
        assert_eq!(cursor, at(3.0 * 3600.0));
        let (times, _) = plan(
            &hourly,
            Misfire::RunOnce,
            &mut cursor,
            at(3.0 * 3600.0 + 61.0),
            grace,
        );
        assert!(times.is_empty());
    }

    #[test]
    fn a_longer_misfire_grace_runs_late_times_on_time() {
        let every = Schedule::Every(Duration::from_secs(1));
        let grace = chrono::Duration::seconds(30);
        // Down for 5 s: every time is within the grace, nothing is skipped.
        let mut cursor = at(0.0);
        let (times, skipped) = plan(&every, Misfire::Skip, &mut cursor, at(5.2), grace);
        let want: Vec<Due> = (1..=5).map(|s| (at(s as f64), "schedule")).collect();
        assert_eq!(times, want);
        assert!(skipped.is_none());
        // Down for 40 s: the times older than 30 s are skipped; the rest run
        // late, at most 10 per wake-up, the next wake-up going on from there.
        let mut cursor = at(0.0);
        let (times, skipped) = plan(&every, Misfire::Skip, &mut cursor, at(40.5), grace);
        let want: Vec<Due> = (11..=20).map(|s| (at(s as f64), "schedule")).collect();
        assert_eq!(times, want);
        assert_eq!(skipped, Some((at(10.0), 10)));
        let (times, skipped) = plan(&every, Misfire::Skip, &mut cursor, at(40.6), grace);
        assert_eq!(times.first(), Some(&(at(21.0), "schedule")));
        assert!(skipped.is_none());
    }
}
