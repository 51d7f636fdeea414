//! Metrics of the leader lease, the scheduler and the lock API. Job names
//! label some of them: they come from the config, so the set is bounded.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

use crate::metrics::{counter, counter_vec, gauge, int_gauge};

pub struct CoordMetrics {
    pub is_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub fencing_token: IntGauge,
    pub job_runs: IntCounterVec,
    pub job_duration: HistogramVec,
    pub job_last_success: GaugeVec,
    pub scheduler_last_tick: Gauge,
    pub lock_acquisitions: IntCounterVec,
    pub version_bumps: IntCounter,
}

impl CoordMetrics {
    pub fn new(registry: &Registry) -> Self {
        let job_duration = HistogramVec::new(
            HistogramOpts::new(
                "tandem_job_duration_seconds",
                "Duration of the job runs this host ran, by job.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0,
            ]),
            &["job"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(job_duration.clone()))
            .expect("unique metric");
        let job_last_success = GaugeVec::new(
            Opts::new(
                "tandem_job_last_success_timestamp_seconds",
                "Unix time of the last successful run of each job on this host.",
            ),
            &["job"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(job_last_success.clone()))
            .expect("unique metric");
        Self {
            is_leader: int_gauge(
                registry,
                "tandem_leader",
                "1 while this host holds the leader lease, else 0.",
            ),
            leader_changes: counter(
                registry,
                "tandem_leader_changes_total",
                "Changes of leader this host has seen (including its own terms starting and ending).",
            ),
            fencing_token: int_gauge(
                registry,
                "tandem_leader_fencing_token",
                "The fencing token of the current leader term, as this host last saw it.",
            ),
            job_runs: counter_vec(
                registry,
                "tandem_job_runs_total",
                "Job runs this host claimed or refused, by job and outcome (succeeded, failed, timed_out, skipped, abandoned).",
                &["job", "outcome"],
            ),
            job_duration,
            job_last_success,
            scheduler_last_tick: gauge(
                registry,
                "tandem_scheduler_last_tick_timestamp_seconds",
                "Unix time the scheduler last woke up; it wakes at least every 5s, so an old value means it stopped.",
            ),
            lock_acquisitions: counter_vec(
                registry,
                "tandem_lock_acquisitions_total",
                "Lock requests through this host, by outcome (acquired: at once, waited: after waiting for another holder, busy: still held by another when the request ended).",
                &["outcome"],
            ),
            version_bumps: counter(
                registry,
                "tandem_version_bumps_total",
                "Version counter bumps made through this host.",
            ),
        }
    }

    /// Creates the series of every job, so they show before the first run.
    pub fn register_jobs<'a>(&self, jobs: impl Iterator<Item = &'a str>) {
        for job in jobs {
            for outcome in ["succeeded", "failed", "timed_out", "skipped", "abandoned"] {
                self.job_runs.with_label_values(&[job, outcome]);
            }
            self.job_duration.with_label_values(&[job]);
        }
        for outcome in ["acquired", "waited", "busy"] {
            self.lock_acquisitions.with_label_values(&[outcome]);
        }
    }
}
