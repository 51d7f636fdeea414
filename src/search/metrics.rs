//! Metrics of the search indexes, labelled by index name (from the config,
//! so the set is bounded).

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::metrics::counter_vec;

pub struct SearchMetrics {
    pub documents: IntGaugeVec,
    pub queries: IntCounterVec,
    pub query_duration: HistogramVec,
    pub lag: GaugeVec,
    pub apply_to_searchable: HistogramVec,
    pub commits: IntCounterVec,
    pub rebuilds: IntCounterVec,
    pub rebuild_duration: HistogramVec,
    pub rebuilding: IntGaugeVec,
    pub skipped: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["index"])
            .expect("valid metric"),
    )
}

impl SearchMetrics {
    pub fn new(registry: &Registry) -> Self {
        let fast = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Self {
            documents: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tandem_search_documents",
                        "Documents in each search index (as last committed).",
                    ),
                    &["index"],
                )
                .expect("valid metric"),
            ),
            queries: counter_vec(
                registry,
                "tandem_search_queries_total",
                "Searches by index and outcome (ok, bad_request, error).",
                &["index", "outcome"],
            ),
            query_duration: histogram_vec(
                registry,
                "tandem_search_query_duration_seconds",
                "Time to answer a search, inside the daemon, by index.",
                fast.clone(),
            ),
            lag: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "tandem_search_lag_seconds",
                        "Age of the oldest change applied to the cache directory but not yet searchable, by index (0 when none).",
                    ),
                    &["index"],
                )
                .expect("valid metric"),
            ),
            apply_to_searchable: histogram_vec(
                registry,
                "tandem_search_apply_to_searchable_seconds",
                "Time from a batch being applied to the cache directory to its changes being searchable, by index.",
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            commits: counter_vec(
                registry,
                "tandem_search_commits_total",
                "Index commits, by index.",
                &["index"],
            ),
            rebuilds: counter_vec(
                registry,
                "tandem_search_rebuilds_total",
                "Index rebuilds from the local cache directory, by index and reason (missing, corrupt, schema_changed, cold_boot, pruned, replay: missed changes include a clear or too many keys, requested).",
                &["index", "reason"],
            ),
            rebuild_duration: histogram_vec(
                registry,
                "tandem_search_rebuild_duration_seconds",
                "Duration of index rebuilds, by index.",
                vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0],
            ),
            rebuilding: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tandem_search_rebuilding",
                        "1 while an index is being rebuilt (searches answer from the previous index meanwhile).",
                    ),
                    &["index"],
                )
                .expect("valid metric"),
            ),
            skipped: counter_vec(
                registry,
                "tandem_search_skipped_documents_total",
                "Cached values not indexed (not_json, bad_field: a field's value has the wrong type and was left out), by index and reason.",
                &["index", "reason"],
            ),
        }
    }

    /// Creates an index's series, so they show before the first event.
    pub fn register_index(&self, index: &str) {
        self.documents.with_label_values(&[index]);
        for outcome in ["ok", "bad_request", "error"] {
            self.queries.with_label_values(&[index, outcome]);
        }
        self.query_duration.with_label_values(&[index]);
        self.lag.with_label_values(&[index]);
        self.apply_to_searchable.with_label_values(&[index]);
        self.commits.with_label_values(&[index]);
        self.rebuild_duration.with_label_values(&[index]);
        self.rebuilding.with_label_values(&[index]);
        for reason in [
            "missing",
            "corrupt",
            "schema_changed",
            "cold_boot",
            "pruned",
            "replay",
            "requested",
        ] {
            self.rebuilds.with_label_values(&[index, reason]);
        }
        for reason in ["not_json", "bad_field"] {
            self.skipped.with_label_values(&[index, reason]);
        }
    }
}
