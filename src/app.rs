//! The state shared by the HTTP handlers and the background tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use crate::cache::CacheDir;
use crate::config::Config;
use crate::coord::leader::Leadership;
use crate::db::{self, queries::Queries};
use crate::metrics::Metrics;
use crate::search::Search;
use crate::sync::SyncShared;
use crate::uploads::Uploads;

/// Everything a handler or task needs.
pub struct App {
    pub config: Config,
    pub db: db::Shared,
    pub queries: Queries,
    pub sync: Arc<SyncShared>,
    pub metrics: Arc<Metrics>,
    pub cache: CacheDir,
    pub leadership: Leadership,
    pub search: Arc<Search>,
    pub uploads: Arc<Uploads>,
    pub started_at: SystemTime,
    pub started: Instant,
    shutting_down: AtomicBool,
}

impl App {
    pub fn new(
        config: Config,
        db: db::Shared,
        sync: Arc<SyncShared>,
        metrics: Arc<Metrics>,
        cache: CacheDir,
        search: Arc<Search>,
        uploads: Arc<Uploads>,
    ) -> Self {
        let queries = Queries::new(&config.database.schema);
        let leadership =
            Leadership::new(&config.host_id, config.leader.eligible, config.leader.lease);
        Self {
            leadership,
            config,
            db,
            queries,
            sync,
            metrics,
            cache,
            search,
            uploads,
            started_at: SystemTime::now(),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Whether a load balancer should send traffic here; `Err` says why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        self.sync.ready(self.config.sync.max_lag)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
