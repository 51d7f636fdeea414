//! Metrics of shared uploads.

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::metrics::{counter, counter_vec, histogram, int_gauge};

pub struct UploadMetrics {
    /// Uploads stored by this host, by way in (`http`, `watch`).
    pub stored: IntCounterVec,
    pub stored_bytes: IntCounter,
    /// Uploads fetched from the store into the local copies.
    pub fetched: IntCounter,
    pub fetched_bytes: IntCounter,
    pub fetch_duration: Histogram,
    /// Store operations that failed, by operation.
    pub store_errors: IntCounterVec,
    pub checksum_mismatches: IntCounter,
    pub local_bytes: IntGauge,
    pub local_files: IntGauge,
    pub evicted: IntCounter,
    pub expired: IntCounter,
    pub abandoned: IntCounter,
    /// Watched files that could not be stored (each attempt).
    pub watch_failures: IntCounter,
    /// Watched files waiting for a retry.
    pub watch_pending: IntGauge,
}

impl UploadMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            stored: counter_vec(
                registry,
                "tandem_uploads_stored_total",
                "Uploads this host stored in the object store, by way in (http, watch).",
                &["via"],
            ),
            stored_bytes: counter(
                registry,
                "tandem_uploads_stored_bytes_total",
                "Bytes of the uploads this host stored.",
            ),
            fetched: counter(
                registry,
                "tandem_uploads_fetched_total",
                "Uploads fetched from the object store into this host's local copies.",
            ),
            fetched_bytes: counter(
                registry,
                "tandem_uploads_fetched_bytes_total",
                "Bytes fetched from the object store.",
            ),
            fetch_duration: histogram(
                registry,
                "tandem_uploads_fetch_duration_seconds",
                "Time to fetch and verify an upload from the object store.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
            store_errors: counter_vec(
                registry,
                "tandem_uploads_store_errors_total",
                "Object store operations that failed, by operation (put, get, delete).",
                &["op"],
            ),
            checksum_mismatches: counter(
                registry,
                "tandem_uploads_checksum_mismatches_total",
                "Fetched uploads whose bytes did not match their sha256 (never served).",
            ),
            local_bytes: int_gauge(
                registry,
                "tandem_uploads_local_bytes",
                "Bytes of this host's local copies of uploads.",
            ),
            local_files: int_gauge(
                registry,
                "tandem_uploads_local_files",
                "Local copies of uploads on this host.",
            ),
            evicted: counter(
                registry,
                "tandem_uploads_evicted_total",
                "Local copies removed to keep under uploads.local_cache_size (least recently used first).",
            ),
            expired: counter(
                registry,
                "tandem_uploads_expired_total",
                "Uploads deleted by the expiry job after their ttl (counted on the host that ran it).",
            ),
            abandoned: counter(
                registry,
                "tandem_uploads_abandoned_total",
                "Unfinished uploads of dead or restarted hosts cleaned by the expiry job.",
            ),
            watch_failures: counter(
                registry,
                "tandem_uploads_watch_failures_total",
                "Attempts to store a file from the watched directory that failed (retried with backoff).",
            ),
            watch_pending: int_gauge(
                registry,
                "tandem_uploads_watch_pending",
                "Files in the watched directory waiting for a retry.",
            ),
        }
    }
}
