//! Prometheus metrics: one struct, registered into an explicit registry.
//! Labels are bounded sets only (op, reason, route, status class, trigger).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric tandem exports.
pub struct Metrics {
    registry: Registry,
    pub applied_ops: IntCounterVec,
    pub batches: IntCounter,
    pub batch_duration: Histogram,
    pub pending_rows: IntGauge,
    pub lag_seconds: Gauge,
    pub oldest_xact_age: Gauge,
    pub cold_boots: IntCounterVec,
    pub cold_boot_duration: Histogram,
    pub cache_entries: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_duration: prometheus::HistogramVec,
    pub db_up: IntGauge,
    pub db_reconnects: IntCounterVec,
    pub db_queries: IntCounterVec,
    pub polls: IntCounterVec,
    pub ready: IntGauge,
    pub hosts: IntGaugeVec,
    pub pruned_rows: IntCounter,
    pub skipped_rows: IntCounter,
    pub position_xmin: IntGauge,
    pub last_applied: Gauge,
    pub sync_errors: IntCounterVec,
    pub read_cache: IntCounterVec,
    pub read_cache_bytes: IntGauge,
    pub heartbeats: IntCounterVec,
    /// Leader, jobs and locks.
    pub coord: crate::coord::metrics::CoordMetrics,
    pub search: crate::search::metrics::SearchMetrics,
    pub uploads: crate::uploads::metrics::UploadMetrics,
    pub events: crate::events::metrics::EventMetrics,
}

pub(crate) fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

pub(crate) fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

pub(crate) fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

pub(crate) fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

pub(crate) fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Metrics {
    /// Creates the metrics in a fresh registry (with process metrics).
    pub fn new(host: &str) -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        let build = IntGaugeVec::new(
            Opts::new("tandem_build_info", "Build information; always 1."),
            &["version", "host"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), host])
            .set(1);
        registry.register(Box::new(build)).expect("unique metric");

        let fast = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let metrics = Self {
            applied_ops: counter_vec(
                &registry,
                "tandem_sync_applied_ops_total",
                "Keys refreshed in the local cache, by operation (put: written, delete: removed, clear: caches cleared). Several log rows naming one key in a batch refresh it once.",
                &["op"],
            ),
            batches: counter(
                &registry,
                "tandem_sync_batches_total",
                "Batches (pages of log rows) applied.",
            ),
            batch_duration: histogram(
                &registry,
                "tandem_sync_batch_duration_seconds",
                "Time to read and apply one batch (page of log rows), from the start of its read to its commit being confirmed; the directory fsync and the position write follow in the background.",
                fast.clone(),
            ),
            pending_rows: int_gauge(
                &registry,
                "tandem_sync_pending_rows",
                "Committed log rows not yet applied here (as of the last heartbeat).",
            ),
            lag_seconds: gauge(
                &registry,
                "tandem_sync_lag_seconds",
                "How long this host has known of committed changes it has not applied; 0 when caught up.",
            ),
            oldest_xact_age: gauge(
                &registry,
                "tandem_db_oldest_transaction_age_seconds",
                "Age of the oldest open transaction in the database (it holds back pruning).",
            ),
            cold_boots: counter_vec(
                &registry,
                "tandem_sync_cold_boots_total",
                "Cold boots (full rebuilds of the cache from the database), by reason.",
                &["reason"],
            ),
            cold_boot_duration: histogram(
                &registry,
                "tandem_sync_cold_boot_duration_seconds",
                "Time taken by cold boots.",
                vec![0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            cache_entries: int_gauge(
                &registry,
                "tandem_cache_entries",
                "Entries in the local cache directory.",
            ),
            http_requests: counter_vec(
                &registry,
                "tandem_http_requests_total",
                "HTTP requests, by route and status class.",
                &["route", "status"],
            ),
            http_duration: {
                let h = prometheus::HistogramVec::new(
                    HistogramOpts::new(
                        "tandem_http_request_duration_seconds",
                        "HTTP request duration, by route.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
                        30.0,
                    ]),
                    &["route"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            db_up: int_gauge(
                &registry,
                "tandem_db_up",
                "1 when the shared database connection is up, 0 when the database is unreachable.",
            ),
            db_reconnects: counter_vec(
                &registry,
                "tandem_db_reconnects_total",
                "Database reconnections, by connection (sync, shared).",
                &["conn"],
            ),
            db_queries: counter_vec(
                &registry,
                "tandem_db_queries_total",
                "Queries sent to the database by the background tasks, by kind.",
                &["kind"],
            ),
            polls: counter_vec(
                &registry,
                "tandem_sync_polls_total",
                "Reads of the log, by trigger (notify, backstop, reconnect, more, cold_boot, resync).",
                &["trigger"],
            ),
            ready: int_gauge(
                &registry,
                "tandem_ready",
                "1 when this host is ready (caught up), else 0.",
            ),
            hosts: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tandem_cluster_hosts",
                        "Hosts in the registry, by state (live, stale, stopped).",
                    ),
                    &["state"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            pruned_rows: counter(
                &registry,
                "tandem_log_pruned_rows_total",
                "Log rows deleted by pruning on this host.",
            ),
            skipped_rows: counter(
                &registry,
                "tandem_sync_skipped_rows_total",
                "Log rows and entries read that name an invalid cache or key (skipped; the log names each).",
            ),
            position_xmin: int_gauge(
                &registry,
                "tandem_sync_position_xmin",
                "The xmin of this host's applied position (a transaction id).",
            ),
            last_applied: gauge(
                &registry,
                "tandem_sync_last_batch_timestamp_seconds",
                "Unix time of the last applied batch.",
            ),
            sync_errors: counter_vec(
                &registry,
                "tandem_sync_errors_total",
                "Sync failures, by stage (connect, read, apply, cold_boot).",
                &["stage"],
            ),
            read_cache: counter_vec(
                &registry,
                "tandem_http_read_cache_total",
                "GET /v1/cache reads answered from the in-memory copy (hit) or from the file (miss).",
                &["result"],
            ),
            read_cache_bytes: int_gauge(
                &registry,
                "tandem_http_read_cache_bytes",
                "Memory held by in-memory copies of small values (api.read_cache_size).",
            ),
            heartbeats: counter_vec(
                &registry,
                "tandem_heartbeats_total",
                "Heartbeats, by outcome (ok, error).",
                &["outcome"],
            ),
            coord: crate::coord::metrics::CoordMetrics::new(&registry),
            search: crate::search::metrics::SearchMetrics::new(&registry),
            uploads: crate::uploads::metrics::UploadMetrics::new(&registry),
            events: crate::events::metrics::EventMetrics::new(&registry),
            registry,
        };
        for op in ["put", "delete", "clear"] {
            metrics.applied_ops.with_label_values(&[op]);
        }
        for reason in crate::sync::ColdBootReason::ALL {
            metrics.cold_boots.with_label_values(&[reason.as_str()]);
        }
        for result in ["hit", "miss"] {
            metrics.read_cache.with_label_values(&[result]);
        }
        for state in ["live", "stale", "stopped"] {
            metrics.hosts.with_label_values(&[state]);
        }
        metrics
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

impl crate::db::ConnObserver for Metrics {
    fn connected(&self, up: bool) {
        self.db_up.set(i64::from(up));
    }

    fn reconnected(&self) {
        self.db_reconnects.with_label_values(&["shared"]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_prefix() {
        let m = Metrics::new("h1");
        m.applied_ops.with_label_values(&["put"]).inc();
        let text = m.render();
        assert!(text.contains("tandem_sync_applied_ops_total{op=\"put\"} 1"));
        assert!(text.contains("tandem_build_info{"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                name.starts_with("tandem_") || name.starts_with("process_"),
                "{name}"
            );
        }
    }
}
