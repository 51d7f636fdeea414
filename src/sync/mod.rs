//! Keeping the local cache equal to the committed truth.
//!
//! One task ([`Syncer`]) owns the sync connection: it LISTENs for wake-ups,
//! reads the log page by page ([`read`]), feeds the applier thread
//! ([`apply`]) and cold-boots when needed ([`coldboot`]). Other parts see its
//! progress through [`SyncShared`].

pub mod apply;
pub mod coldboot;
pub mod lag;
pub mod position;
pub mod read;
pub mod record;
mod shared;
pub mod snapshot;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_postgres::{Client, Notification};
use tokio_util::sync::CancellationToken;

pub use coldboot::ColdBootReason;
pub use shared::{SyncShared, SyncStatus};

use apply::Applier;
use position::{LocalState, Position};
use read::ReadError;

use crate::db::{self, Backoff, DbError, render};
use crate::metrics::Metrics;
use crate::search::Search;

/// A sync session failed; the task reconnects after a backoff.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    ColdBoot(#[from] coldboot::ColdBootError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error("the sync connection closed")]
    Closed,
}

impl From<tokio_postgres::Error> for SessionError {
    fn from(e: tokio_postgres::Error) -> Self {
        SessionError::Read(e.into())
    }
}

impl SessionError {
    fn stage(&self) -> &'static str {
        match self {
            SessionError::Read(_) | SessionError::Closed => "read",
            SessionError::ColdBoot(_) => "cold_boot",
            SessionError::Apply(_) => "apply",
        }
    }
}

/// Settings of the sync task.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    pub host_id: String,
    pub schema: String,
    pub poll_interval: Duration,
    pub batch_size: u32,
    /// How often an idle host persists (and so publishes) its position.
    pub persist_interval: Duration,
    pub connect_timeout: Duration,
}

/// The sync task.
pub struct Syncer {
    settings: SyncSettings,
    pg: tokio_postgres::Config,
    shared: Arc<SyncShared>,
    metrics: Arc<Metrics>,
    applier: Applier,
    search: Arc<Search>,
    /// The durable local state (what the disk says).
    state: Option<LocalState>,
    /// Whether the state file existed but could not be read.
    state_corrupt: bool,
    /// The in-memory position (may be ahead of `state` when idle).
    position: Option<Position>,
    last_persist: Instant,
    /// Transactions other hosts wait on: report once applied.
    wanted_acks: Vec<(u64, Instant)>,
    /// An ack request already covered by the persisted position came in:
    /// report once, after the notifications at hand are all handled (a
    /// backlog of them after a long read costs one round trip, not one each).
    report_due: bool,
    log_channel: String,
    ack_channel: String,
    ackreq_channel: String,
    leader_channel: String,
    jobs_channel: String,
    locks_channel: String,
}

/// A page whose commit is queued in the applier.
struct InFlight {
    result: tokio::sync::oneshot::Receiver<Result<apply::Applied, apply::ApplyError>>,
    new_state: Option<LocalState>,
    next: Position,
    rows: i64,
    started: Instant,
    read_took: Duration,
}

/// The statements of one session.
struct Session {
    page: tokio_postgres::Statement,
    report: tokio_postgres::Statement,
    with_system_id: bool,
}

impl Syncer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: SyncSettings,
        pg: tokio_postgres::Config,
        shared: Arc<SyncShared>,
        metrics: Arc<Metrics>,
        applier: Applier,
        state: Result<Option<LocalState>, String>,
        generation: String,
        search: Arc<Search>,
    ) -> Self {
        let state_corrupt = state.is_err();
        if let Err(why) = &state {
            tracing::warn!(error = %why, "ignoring the local position; this host will cold-boot");
        }
        let state = state.ok().flatten();
        shared.update(|s| {
            s.generation = generation;
            s.persisted = state.as_ref().map(|st| st.position.clone());
        });
        Self {
            log_channel: db::channel(&settings.schema, "log"),
            ack_channel: db::channel(&settings.schema, "ack"),
            ackreq_channel: db::channel(&settings.schema, "ackreq"),
            leader_channel: db::channel(&settings.schema, "leader"),
            jobs_channel: db::channel(&settings.schema, "jobs"),
            locks_channel: db::channel(&settings.schema, "locks"),
            settings,
            pg,
            shared,
            metrics,
            applier,
            search,
            position: None,
            state,
            state_corrupt,
            last_persist: Instant::now(),
            wanted_acks: Vec::new(),
            report_due: false,
        }
    }

    /// Runs until cancelled. `first` is an already open connection to use
    /// for the first session.
    pub async fn run(
        mut self,
        mut first: Option<(Client, mpsc::UnboundedReceiver<Notification>)>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while !cancel.is_cancelled() {
            self.shared.touch();
            let conn = match first.take() {
                Some(c) => Ok(c),
                None => db::connect(&self.pg, self.settings.connect_timeout).await,
            };
            let result = match conn {
                Ok((client, notes)) => {
                    if backoff.failures() > 0 {
                        self.metrics
                            .db_reconnects
                            .with_label_values(&["sync"])
                            .inc();
                    }
                    self.shared.update(|s| s.connected = true);
                    let r = self.session(client, notes, &mut backoff, &cancel).await;
                    if r.is_ok() {
                        break;
                    }
                    r
                }
                Err(e) => {
                    self.metrics
                        .sync_errors
                        .with_label_values(&["connect"])
                        .inc();
                    Err(SessionError::Read(ReadError::Db(e)))
                }
            };
            if let Err(e) = result {
                if let SessionError::Apply(a) = &e
                    && a.lost_durability
                {
                    // After a failed fsync the disk's contents are unknown:
                    // rebuild rather than trust them.
                    tracing::error!(error = %a, "the cache directory may not be durable; this host will cold-boot");
                    self.state = None;
                    self.state_corrupt = true;
                    self.position = None;
                }
                let delay = backoff.failed();
                if !matches!(
                    e,
                    SessionError::Read(ReadError::Db(DbError::Unavailable(_)))
                        | SessionError::Closed
                ) {
                    self.metrics
                        .sync_errors
                        .with_label_values(&[e.stage()])
                        .inc();
                }
                if backoff.failures() <= 1 || !matches!(e, SessionError::Read(_)) {
                    tracing::warn!(error = %e, retry_in = ?delay, "sync interrupted");
                } else {
                    tracing::debug!(error = %e, retry_in = ?delay, "sync still interrupted");
                }
                self.shared.update(|s| {
                    s.connected = false;
                    s.last_error = Some(e.to_string());
                });
                let until = tokio::time::Instant::now() + delay;
                while tokio::time::Instant::now() < until {
                    // Backing off is alive, not stuck (the systemd watchdog).
                    self.shared.touch();
                    let step = until.min(tokio::time::Instant::now() + Duration::from_secs(1));
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep_until(step) => {}
                    }
                }
            }
        }
        // Stopping: make the last committed position durable.
        if let Some(state) = self.state.clone()
            && let Err(e) = self.applier.persist_now(state).await
        {
            tracing::warn!(error = %e, "cannot persist the position at shutdown");
        }
    }

    async fn session(
        &mut self,
        mut client: Client,
        mut notes: mpsc::UnboundedReceiver<Notification>,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        client
            .batch_execute(&format!(
                "LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {};",
                self.log_channel,
                self.ack_channel,
                self.ackreq_channel,
                self.leader_channel,
                self.jobs_channel,
                self.locks_channel
            ))
            .await?;
        // Notifications sent while disconnected are lost: look again.
        self.shared.jobs_queued.notify_one();
        let session = Session {
            page: client
                .prepare(&render(read::PAGE, &self.settings.schema))
                .await?,
            report: client
                .prepare(&render(
                    "SELECT {schema}.report($1, $2)",
                    &self.settings.schema,
                ))
                .await?,
            with_system_id: coldboot::can_read_system_id(&client).await?,
        };
        let remote =
            coldboot::remote(&client, &self.settings.schema, session.with_system_id).await?;
        let generation = self.applier.generation().await;
        let reason = if self.shared.resync_requested.swap(false, Ordering::SeqCst) {
            Some(ColdBootReason::Requested)
        } else if self.state_corrupt && self.state.is_none() {
            Some(ColdBootReason::CorruptState)
        } else if self
            .position
            .as_ref()
            .is_some_and(|p| coldboot::furthest_xmax(p) > remote.snapshot.xmax())
        {
            // This process read further than it persisted (empty reads move
            // the position without writing it): that too must not be from
            // the database's future.
            Some(ColdBootReason::DatabaseChanged)
        } else {
            coldboot::needed(self.state.as_ref(), &generation, &remote)
        };
        if let Some(reason) = reason {
            self.cold_boot(&mut client, &session, reason).await?;
        } else if self.position.is_none() {
            self.position = self.state.as_ref().map(|s| s.position.clone());
        }
        // Before any new batch: indexes behind the cache directory catch up
        // with it (a cold boot rebuilds them instead).
        if self.search.replay_pending() {
            if let Some(state) = &self.state
                && reason.is_none()
            {
                self.metrics
                    .db_queries
                    .with_label_values(&["search_replay"])
                    .inc();
                self.search
                    .replay(&client, &self.settings.schema, state)
                    .await
                    .map_err(ReadError::Db)?;
            } else {
                self.search.forget_replay();
            }
        }
        self.shared.update(|s| s.last_error = None);
        backoff.succeeded();

        let mut trigger = "reconnect";
        loop {
            self.catch_up(&mut client, &session, trigger, cancel)
                .await?;
            let mut read = false;
            // Fixed per wait, so that notifications that need no read (acks)
            // do not postpone the backstop poll.
            let backstop = tokio::time::Instant::now() + self.settings.poll_interval;
            while !read {
                self.shared.touch();
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    note = notes.recv() => {
                        let Some(note) = note else { return Err(SessionError::Closed) };
                        read |= self.on_notification(note);
                        while let Ok(note) = notes.try_recv() {
                            read |= self.on_notification(note);
                        }
                        if std::mem::take(&mut self.report_due) {
                            self.report(&client, &session).await?;
                        }
                        trigger = "notify";
                    }
                    _ = tokio::time::sleep_until(backstop) => {
                        read = true;
                        trigger = "backstop";
                    }
                    _ = self.shared.resync.notified() => {
                        if self.shared.resync_requested.swap(false, Ordering::SeqCst) {
                            self.cold_boot(&mut client, &session, ColdBootReason::Requested).await?;
                        }
                        read = true;
                        trigger = "resync";
                    }
                }
            }
        }
    }

    /// Handles a notification; true when the log should be read.
    fn on_notification(&mut self, note: Notification) -> bool {
        let channel = note.channel();
        if channel == self.log_channel {
            self.shared.observe_pending(Instant::now());
            return true;
        }
        if channel == self.ack_channel {
            self.shared.acks.send_modify(|n| *n = n.wrapping_add(1));
            return false;
        }
        if channel == self.leader_channel {
            self.shared.leader_released.notify_one();
            return false;
        }
        if channel == self.jobs_channel {
            self.shared.jobs_queued.notify_one();
            return false;
        }
        if channel == self.locks_channel {
            self.shared.lock_released.notify_waiters();
            return false;
        }
        if channel == self.ackreq_channel
            && let Ok(tx) = note.payload().parse::<u64>()
        {
            let persisted = self.state.as_ref().map(|s| &s.position.done);
            if persisted.is_some_and(|p| p.is_visible(tx)) {
                self.report_due = true;
            } else {
                self.wanted_acks
                    .push((tx, Instant::now() + Duration::from_secs(300)));
            }
            return true;
        }
        false
    }

    /// Publishes the persisted position at once (answering ack requests).
    async fn report(&mut self, client: &Client, session: &Session) -> Result<(), SessionError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let applied = state.position.done.to_string();
        self.metrics.db_queries.with_label_values(&["report"]).inc();
        client
            .execute(&session.report, &[&self.settings.host_id, &applied])
            .await?;
        Ok(())
    }

    /// Reads pages until caught up. While page N is being committed by the
    /// applier, page N+1 is already read (its rows queue up behind the
    /// commit); N's bookkeeping happens once its commit is confirmed.
    /// `self.position` only ever holds a committed position, so any error
    /// re-reads from there.
    async fn catch_up(
        &mut self,
        client: &mut Client,
        session: &Session,
        first_trigger: &'static str,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        let mut trigger = first_trigger;
        let mut in_flight: Option<InFlight> = None;
        let mut read_from = self
            .position
            .clone()
            .expect("a position exists after the session starts");
        loop {
            if cancel.is_cancelled() {
                if let Some(f) = in_flight.take() {
                    self.finish(client, session, f).await?;
                }
                return Ok(());
            }
            self.shared.touch();
            let started = Instant::now();
            if read_from.pending.is_none() {
                // A new delta: it ends at this read's snapshot, so it covers
                // what was observed before now. (Later pages of the same
                // delta read only up to that snapshot.)
                self.shared
                    .lag
                    .lock()
                    .expect("not poisoned")
                    .read_started(started);
            }
            self.metrics.polls.with_label_values(&[trigger]).inc();
            self.metrics.db_queries.with_label_values(&["read"]).inc();
            let read = read::read_page(
                client,
                &session.page,
                &read_from,
                self.settings.batch_size,
                &self.applier,
            )
            .await;
            // The previous page first: its commit was queued before this
            // page's rows.
            if let Some(f) = in_flight.take()
                && let Err(e) = self.finish(client, session, f).await
            {
                self.applier.abort().await;
                return Err(e);
            }
            let meta = match read {
                Ok(meta) => meta,
                Err(e) => {
                    self.applier.abort().await;
                    return Err(e.into());
                }
            };
            self.metrics.skipped_rows.inc_by(meta.skipped);
            let state = self.state.as_ref().expect("state exists with a position");
            let reason = if meta.schema_id != state.identity.schema_id {
                Some(ColdBootReason::DatabaseChanged)
            } else if meta.pruned_below > read_from.done.xmin() {
                Some(ColdBootReason::Pruned)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.applier.abort().await;
                self.cold_boot(client, session, reason).await?;
                read_from = self
                    .position
                    .clone()
                    .expect("a cold boot sets the position");
                trigger = "cold_boot";
                continue;
            }
            let next = read::next_position(&read_from, &meta, self.settings.batch_size);
            let changed = meta.rows > 0 || next.pending != read_from.pending;
            // Every change of position is written; it is also fsynced at most
            // once per persist interval (see `StateFile::store`).
            let durable = self.last_persist.elapsed() >= self.settings.persist_interval;
            let persist = changed || durable;
            if durable {
                self.last_persist = Instant::now();
            }
            let new_state = persist.then(|| LocalState {
                position: next.clone(),
                ..state.clone()
            });
            let result = self.applier.commit_later(new_state.clone(), durable).await;
            let more = next.pending.is_some();
            read_from = next.clone();
            in_flight = Some(InFlight {
                result,
                new_state,
                next,
                rows: meta.rows,
                started,
                read_took: started.elapsed(),
            });
            if !more {
                let f = in_flight.take().expect("just set");
                self.finish(client, session, f).await?;
                self.shared.lag.lock().expect("not poisoned").caught_up();
                self.shared.update(|s| s.caught_up_once = true);
                return Ok(());
            }
            trigger = "more";
        }
    }

    /// Completes a page whose commit was queued: on success, moves the
    /// committed position forward and tells waiters.
    async fn finish(
        &mut self,
        client: &Client,
        session: &Session,
        f: InFlight,
    ) -> Result<(), SessionError> {
        let applied = f.result.await.expect("the applier answers every commit")?;
        tracing::trace!(
            read_ms = f.read_took.as_secs_f64() * 1e3,
            commit_ms = (f.started.elapsed() - f.read_took).as_secs_f64() * 1e3,
            rows = f.rows,
            "page timings"
        );
        let persisted = f.new_state.is_some();
        if let Some(st) = f.new_state {
            self.shared
                .update(|s| s.persisted = Some(st.position.clone()));
            self.state = Some(st);
        }
        let done_changed = self.position.as_ref().is_none_or(|p| p.done != f.next.done);
        self.position = Some(f.next.clone());
        if done_changed {
            self.shared.applied.send_replace(Some(f.next.done.clone()));
            self.metrics.position_xmin.set(f.next.done.xmin() as i64);
        }
        self.record_batch(&applied, f.rows, f.started);
        if !self.wanted_acks.is_empty() && persisted {
            self.answer_acks(client, session).await?;
        }
        Ok(())
    }

    fn record_batch(&self, applied: &apply::Applied, rows: i64, started: Instant) {
        let m = &self.metrics;
        m.cache_entries.set(applied.entries as i64);
        if rows == 0 {
            return;
        }
        m.applied_ops
            .with_label_values(&["put"])
            .inc_by(applied.puts);
        m.applied_ops
            .with_label_values(&["delete"])
            .inc_by(applied.deletes);
        m.applied_ops
            .with_label_values(&["clear"])
            .inc_by(applied.clears);
        m.batches.inc();
        m.batch_duration.observe(started.elapsed().as_secs_f64());
        let now = SystemTime::now();
        m.last_applied.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.shared.update(|s| s.last_batch = Some(now));
        tracing::debug!(
            rows,
            puts = applied.puts,
            deletes = applied.deletes,
            clears = applied.clears,
            "applied batch"
        );
    }

    async fn answer_acks(
        &mut self,
        client: &Client,
        session: &Session,
    ) -> Result<(), SessionError> {
        let now = Instant::now();
        let done = self.state.as_ref().map(|s| s.position.done.clone());
        let before = self.wanted_acks.len();
        self.wanted_acks.retain(|(tx, expires)| {
            *expires > now && !done.as_ref().is_some_and(|d| d.is_visible(*tx))
        });
        let answered = self.wanted_acks.len() < before;
        if answered {
            self.report(client, session).await?;
        }
        Ok(())
    }

    async fn cold_boot(
        &mut self,
        client: &mut Client,
        session: &Session,
        reason: ColdBootReason,
    ) -> Result<(), SessionError> {
        tracing::info!(
            reason = reason.as_str(),
            "cold boot: rebuilding the cache from the database"
        );
        self.metrics
            .cold_boots
            .with_label_values(&[reason.as_str()])
            .inc();
        self.shared.update(|s| s.cold_booting = Some(reason));
        let started = Instant::now();
        // Keep pruning away from the rows this cold boot will still read.
        let protect = render(
            "SELECT {schema}.protect($1, make_interval(secs => $2::float8))",
            &self.settings.schema,
        );
        let interval = self.settings.persist_interval.as_secs_f64();
        client
            .execute(protect.as_str(), &[&self.settings.host_id, &interval])
            .await?;
        let shared = self.shared.clone();
        let alive = move || shared.touch();
        let result = coldboot::run(
            client,
            &self.settings.schema,
            session.with_system_id,
            &self.applier,
            &alive,
            &self.metrics.skipped_rows,
        )
        .await;
        self.shared.update(|s| s.cold_booting = None);
        let (state, entries) = match result {
            Ok(r) => r,
            Err(e) => {
                // Without a usable state the next session cold-boots again.
                if reason == ColdBootReason::Requested {
                    self.shared.resync_requested.store(true, Ordering::SeqCst);
                }
                return Err(e.into());
            }
        };
        let took = started.elapsed();
        self.metrics.cold_boot_duration.observe(took.as_secs_f64());
        self.metrics.cache_entries.set(entries as i64);
        tracing::info!(
            reason = reason.as_str(),
            entries,
            generation = %state.generation,
            position = %state.position.done,
            seconds = took.as_secs_f64(),
            "cold boot done"
        );
        self.shared
            .applied
            .send_replace(Some(state.position.done.clone()));
        self.metrics
            .position_xmin
            .set(state.position.done.xmin() as i64);
        self.shared.update(|s| {
            s.generation = state.generation.clone();
            s.persisted = Some(state.position.clone());
            s.last_cold_boot = Some((reason, SystemTime::now()));
        });
        self.position = Some(state.position.clone());
        self.state = Some(state);
        self.state_corrupt = false;
        self.last_persist = Instant::now();
        Ok(())
    }
}
