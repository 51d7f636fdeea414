//! What the sync task shares with the rest of the daemon: the applied
//! position (what `?wait=local` waits on), ack wake-ups, status, lag,
//! resync requests, and its last sign of life (for the watchdog).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};

use super::ColdBootReason;
use super::lag::LagTracker;
use super::position::Position;
use super::snapshot::Snapshot;

/// Progress of the sync task, for the API, heartbeats and readiness.
pub struct SyncShared {
    /// The applied position (what `?wait=local` waits on).
    pub(super) applied: watch::Sender<Option<Snapshot>>,
    /// Bumped on every ack notification (what `?wait=cluster` waits on).
    pub(super) acks: watch::Sender<u64>,
    status: Mutex<SyncStatus>,
    pub(super) lag: Mutex<LagTracker>,
    pub(super) resync_requested: AtomicBool,
    pub(super) resync: Notify,
    /// Last sign of life of the sync task (for the systemd watchdog).
    alive: Mutex<Instant>,
    /// Woken when a leader released its lease (clean shutdown elsewhere),
    /// so that this host tries to take over at once.
    pub leader_released: Notify,
    /// Woken when a manual job run was queued (or notifications may have
    /// been missed while reconnecting).
    pub jobs_queued: Notify,
    /// Woken (all waiters) when an app lock was released anywhere.
    pub lock_released: Notify,
}

/// A snapshot of the sync task's state.
#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub connected: bool,
    pub last_error: Option<String>,
    pub generation: String,
    pub cold_booting: Option<ColdBootReason>,
    /// Caught up at least once since start (the readiness latch).
    pub caught_up_once: bool,
    /// The position last written to disk (and published to the cluster).
    pub persisted: Option<Position>,
    pub last_batch: Option<SystemTime>,
    pub last_cold_boot: Option<(ColdBootReason, SystemTime)>,
}

impl SyncShared {
    pub fn new() -> Self {
        Self {
            applied: watch::channel(None).0,
            acks: watch::channel(0).0,
            status: Mutex::new(SyncStatus::default()),
            lag: Mutex::new(LagTracker::default()),
            resync_requested: AtomicBool::new(false),
            resync: Notify::new(),
            alive: Mutex::new(Instant::now()),
            leader_released: Notify::new(),
            jobs_queued: Notify::new(),
            lock_released: Notify::new(),
        }
    }

    /// The sync task is alive and not stuck.
    pub fn touch(&self) {
        *self.alive.lock().expect("not poisoned") = Instant::now();
    }

    /// Whether the sync task showed life within `d`.
    pub fn alive_within(&self, d: Duration) -> bool {
        self.alive.lock().expect("not poisoned").elapsed() < d
    }

    pub fn status(&self) -> SyncStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut SyncStatus)) {
        f(&mut self.status.lock().expect("not poisoned"));
    }

    /// Watches the applied position.
    pub fn applied(&self) -> watch::Receiver<Option<Snapshot>> {
        self.applied.subscribe()
    }

    /// Whether this host has applied transaction `tx`.
    pub fn has_applied(&self, tx: u64) -> bool {
        self.applied
            .borrow()
            .as_ref()
            .is_some_and(|s| s.is_visible(tx))
    }

    /// Watches ack notifications from other hosts.
    pub fn acks(&self) -> watch::Receiver<u64> {
        self.acks.subscribe()
    }

    /// The current lag.
    pub fn lag(&self) -> Duration {
        self.lag.lock().expect("not poisoned").lag(Instant::now())
    }

    /// Records that there are committed rows unread as of `at`.
    pub fn observe_pending(&self, at: Instant) {
        self.lag.lock().expect("not poisoned").observe(at);
    }

    /// Asks for a cold boot at the next opportunity.
    pub fn request_resync(&self) {
        self.resync_requested.store(true, Ordering::SeqCst);
        self.resync.notify_one();
    }

    /// Whether this host is ready: caught up once, not cold-booting, and not
    /// known to be behind by more than `max_lag`.
    pub fn ready(&self, max_lag: Duration) -> Result<(), String> {
        let status = self.status();
        if let Some(reason) = status.cold_booting {
            return Err(format!("cold-booting ({})", reason.as_str()));
        }
        if !status.caught_up_once {
            return Err("not caught up yet since start".into());
        }
        let lag = self.lag();
        if lag > max_lag {
            return Err(format!(
                "behind: committed changes unapplied for {:.1}s (sync.max_lag is {:.1}s)",
                lag.as_secs_f64(),
                max_lag.as_secs_f64()
            ));
        }
        Ok(())
    }
}

impl Default for SyncShared {
    fn default() -> Self {
        Self::new()
    }
}
