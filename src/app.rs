//! The state shared by the HTTP handlers and the background tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use crate::cache::CacheDir;
use crate::config::jobs::JobSpec;
use crate::config::{Config, Secret};
use crate::coord::leader::Leadership;
use crate::db::{self, queries::Queries};
use crate::events::Hub;
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
    pub events: Arc<Hub>,
    /// What `SIGHUP` reloads (the rest of `config` needs a restart).
    live: RwLock<Live>,
    /// Bumped when the jobs are reloaded.
    pub jobs_reloaded: tokio::sync::watch::Sender<u64>,
    pub started_at: SystemTime,
    pub started: Instant,
    shutting_down: AtomicBool,
}

/// The settings a reload replaces.
struct Live {
    jobs: Arc<Vec<JobSpec>>,
    token: Option<Secret>,
}

/// What [`App::new`] is made of.
pub struct Parts {
    pub config: Config,
    pub db: db::Shared,
    pub sync: Arc<SyncShared>,
    pub metrics: Arc<Metrics>,
    pub cache: CacheDir,
    pub search: Arc<Search>,
    pub uploads: Arc<Uploads>,
    pub events: Arc<Hub>,
}

impl App {
    pub fn new(p: Parts) -> Self {
        let queries = Queries::new(&p.config.database.schema);
        let live = Live {
            jobs: Arc::new(p.config.jobs.clone()),
            token: p.config.api.token.clone(),
        };
        let leadership = Leadership::new(
            &p.config.host_id,
            p.config.leader.eligible,
            p.config.leader.lease,
        );
        Self {
            leadership,
            config: p.config,
            db: p.db,
            queries,
            sync: p.sync,
            metrics: p.metrics,
            cache: p.cache,
            search: p.search,
            uploads: p.uploads,
            events: p.events,
            live: RwLock::new(live),
            jobs_reloaded: tokio::sync::watch::Sender::new(0),
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

    /// The jobs as last loaded.
    pub fn jobs(&self) -> Arc<Vec<JobSpec>> {
        self.live.read().expect("not poisoned").jobs.clone()
    }

    /// When this process started, in seconds since the epoch by this host's
    /// clock: what heartbeats and uploads name this run of the process by.
    pub fn started_secs(&self) -> f64 {
        self.started_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// The API token as last loaded.
    pub fn token(&self) -> Option<Secret> {
        self.live.read().expect("not poisoned").token.clone()
    }

    /// Replaces the jobs (a reload) and tells the scheduler.
    pub fn set_jobs(&self, jobs: Vec<JobSpec>) {
        self.live.write().expect("not poisoned").jobs = Arc::new(jobs);
        self.jobs_reloaded.send_modify(|n| *n += 1);
    }

    pub fn set_token(&self, token: Option<Secret>) {
        self.live.write().expect("not poisoned").token = token;
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
